"""Evaluation of training checkpoints: retrieval, matching and captioning metrics on held-out data."""
