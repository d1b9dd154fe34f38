"""The registry's store fixtures (embedded noida-db, a fresh index prefix per test)."""

from tests.registry.conftest import es, indices, store_url

__all__ = ["es", "indices", "store_url"]
