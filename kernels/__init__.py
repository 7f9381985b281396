"""Kernel code: one module per (backend, op family), each with a module-level `KERNELS` list.

The contract (`KernelSpec`) and the registry that loads these modules by name live in
autotune/registry.py; modules here import the core, never the other way round.
"""
