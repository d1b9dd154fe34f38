"""Benchmarks: each prints a table and is never run as a test (`make bench`)."""
