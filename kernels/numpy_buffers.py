"""Buffers the NumPy kernels keep between calls, per thread (kernels/numpy_conv.py, numpy_pool.py).

Not a kernel module (no KERNELS list, not in the registry's MODULES): it counts towards the cache
hash of each module that imports it.

At LeNet's sizes allocating, zeroing and building strided views cost as much as the arithmetic
(a batch-1 conv forward went from ~27 to ~12 µs with kept buffers). Geometries whose buffers
exceed WORKSPACE_BYTES allocate per call; at most WORKSPACES are kept. (Kept buffers do not
make a kernel as fast in a training step as alone: there our pool and conv kernels still run
~2x slower, and raising glibc's mmap and trim thresholds to 1 GB changed nothing, so page
faults are not why.)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

WORKSPACE_BYTES = 8 << 20
WORKSPACES = 64
_local = threading.local()


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Zero-copy NumPy view of a CPU tensor. .numpy() refuses tensors that require grad, so those
    are detached first; only those: detach() costs ~0.6 us, a tenth of a batch-1 GEMM's call."""
    return tensor.detach().numpy() if tensor.requires_grad else tensor.numpy()


def workspace(key: tuple, build: Callable[[], tuple[object, int]]):
    """What build() returns for `key` ((value, bytes owned)), built once per thread when small."""
    kept = getattr(_local, "kept", None)
    if kept is None:
        kept = _local.kept = OrderedDict()
    value = kept.get(key)
    if value is None:
        value, size = build()
        if size <= WORKSPACE_BYTES:
            kept[key] = value
            if len(kept) > WORKSPACES:
                kept.popitem(last=False)
    return value


def scratch(tag: str, shape: tuple, dtype, *, zero_key: tuple | None = None) -> np.ndarray:
    """A buffer of `shape` kept between calls. Uninitialised, unless `zero_key` is given: then it
    starts zeroed and callers with the same zero_key write the same region every call, so the
    rest stays zero (e.g. dy widened with zero garbage columns)."""
    if zero_key is None:
        return workspace((tag, shape, np.dtype(dtype).str), lambda: (np.empty(shape, dtype), nbytes(shape, dtype)))
    return workspace((tag, shape, np.dtype(dtype).str, zero_key),
                     lambda: (np.zeros(shape, dtype), nbytes(shape, dtype)))


def nbytes(shape: tuple, dtype) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize
