"""A small CNN for tests/test_models.py, found by `autotune search model small_cnn:build`: every
conv geometry the layer path handles (bias or not, stride 2, padding, dilation 2, 1x1) and linears."""

from torch import nn


def build() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=2, dilation=2),
        nn.Conv2d(6, 4, 1),
        nn.Conv2d(4, 4, 3, groups=2, padding=1),  # grouped: patch() leaves it to torch
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )


def mlp() -> nn.Module:
    """Two linear layers, `small_cnn:mlp` with --shape 3x2x2: a handful of GEMM problems, quick to
    share out between workers (tests/test_many_workers.py)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))
