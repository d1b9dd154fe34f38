"""The gateway's HTTP/2 relay: the data plane in front of its gRPC server."""
