"""Istio-style routing configuration parsed into frozen, validated objects."""
