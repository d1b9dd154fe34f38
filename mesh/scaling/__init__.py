"""Elastic scaling: how many replicas a service needs, decided from the load it reports."""
