"""Placeholder: being written."""
KERNELS: list = []
