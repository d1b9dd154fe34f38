"""Multi-process tests of the whole request path: registry, gateway, sidecars, workers."""
