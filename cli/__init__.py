"""The ``meshserve`` command line: an assembly over everything (nothing in the core imports it).

Kept out of ``mesh/`` so that the core's import arrows stay visible: protos <- mesh core <-
{gateway, sidecar, workers, registry} <- cli.
"""
