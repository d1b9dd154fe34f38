"""The data service: immutable, versioned datasets streamed to trainers as batches of raw tensors."""
