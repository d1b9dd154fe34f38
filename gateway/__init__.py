"""The ingress process: the mesh core plus edge concerns (client auth, rate limits, admin)."""
