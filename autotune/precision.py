"""Which float32 products may run on TF32 tensor cores: torch's own switches decide.

A float32 kernel may multiply on TF32 tensor cores (10-bit mantissas, ~1e-3 relative error)
instead of in IEEE float32: our Triton kernels through their `input_precision` knob, torch's op
through cuDNN/cuBLAS (`allow_tf32`). Whether that is acceptable is the user's call, and torch
already has the switches, so a GPU search follows them, as cuDNN's benchmark mode and
Inductor's GEMM templates do: matrix products (`gemm`) may use TF32 only when
`torch.backends.cuda.matmul.allow_tf32` is set (off by default; `torch.set_float32_matmul_precision
("high")` sets it), convolutions only when `torch.backends.cudnn.allow_tf32` is (on by default).
Where the switch is off, the TF32 value of every such knob is left out of the search and its
default is IEEE. The policy is part of the GPU's fingerprint, so results tuned under one policy
are never served under the other.
"""

from __future__ import annotations

import torch

# Knob name -> (the value that computes in TF32, the value that computes in IEEE float32).
TF32_KNOBS = {"input_precision": ("tf32", "ieee"), "allow_tf32": (True, False)}
MATMUL_OPS = ("gemm",)


def tf32_allowed(op: str) -> bool:
    """Whether torch's switch for this op's kind lets a float32 problem use TF32 now."""
    if op in MATMUL_OPS:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    return bool(torch.backends.cudnn.allow_tf32)


def policy() -> str:
    """The switches in a few words, for the GPU fingerprint: e.g. 'matmul ieee, conv tf32'."""
    matmul = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    conv = "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    return f"matmul {matmul}, conv {conv}"


def ieee_only(knobs: dict) -> dict:
    """knobs with every TF32 knob it has set to its IEEE value."""
    return {k: (TF32_KNOBS[k][1] if k in TF32_KNOBS else v) for k, v in knobs.items()}
