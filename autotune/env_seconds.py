"""Durations a user may override through an environment variable (timeouts; tests use a few s)."""

from __future__ import annotations

import math
import os

from autotune.errors import AutotuneError


def seconds_from_env(name: str, default: float) -> float:
    """$name as a positive number of seconds, else `default`; anything else is the user's error."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise AutotuneError(f"{name} must be a positive number of seconds, got {text!r}")
    return seconds
