"""The mesh services: inference, training and data workers."""
