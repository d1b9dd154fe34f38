"""The runtime every meshserve gRPC server shares: health, reflection, limits, errors, shutdown."""
