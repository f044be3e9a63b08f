"""Benchmarks: each runs the project's path next to a baseline (a plain loop, plain decoding, the
device's peak) and prints the figures side by side."""
