"""The discovery store: instances, leases, watches, the model catalog and config."""
