"""OpenTelemetry for the mesh: setup, W3C trace propagation over gRPC, mesh metrics, log correlation."""
