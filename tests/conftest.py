"""Shared test set-up: an isolated cache dir, and quiet, deterministic dispatch state."""

import os

# The Triton interpreter must be chosen before triton is imported anywhere; without a GPU the
# Triton kernels are tested through it.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

import pytest

from autotune import dispatch


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test gets its own cache dir and a fresh dispatch memo."""
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path / "results"))
    monkeypatch.delenv("AUTOTUNE_PROGRESS", raising=False)  # bars follow the (captured) stderr: off
    dispatch.reset()
    dispatch.set_policy("cached")
    dispatch._state.cache_dir = None
    yield
    dispatch.reset()
