"""Endpoint selection: hash rings, simple balancers, outlier detection, load tracking."""
