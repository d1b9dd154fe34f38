"""The GPU execution path: a pure plan (instances, graph buckets, staging slots) and its CUDA shell."""
