"""Benchmarks: each runs the project's path and a plain baseline side by side and prints ratios."""
