"""The inference worker: Open Inference Protocol (Triton/KServe v2 gRPC) on PyTorch."""
