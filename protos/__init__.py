"""Protobuf contracts of meshserve and their generated Python stubs."""
