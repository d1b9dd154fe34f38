"""The ``meshserve`` command line."""
