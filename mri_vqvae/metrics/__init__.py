"""Measures of volumes and sets of volumes: pure functions over tensors (no I/O)."""
