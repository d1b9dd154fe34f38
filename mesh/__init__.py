"""The mesh core shared by gateway and sidecar, and the runtime every server uses."""
