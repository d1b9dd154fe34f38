"""The training worker: jobs that train catalogue models, checkpoint, and publish versions."""
