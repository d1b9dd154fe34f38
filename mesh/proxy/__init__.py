"""The mesh's one data plane: an HTTP/2 relay, the gateway's ingress and a sidecar's inbound."""
