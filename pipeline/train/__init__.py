"""Training: the per-worker batch stream and its image augmentation."""
