"""Helpers run by tests, some in their own process (tritonclient)."""
