"""Mesh security: the CA, workload identities, mutual TLS, peer authentication, authorization."""
