"""What we run on, and the fingerprint that keys cached results to it.

A tuned config is only valid on the machine and software it was measured on: the fingerprint
names the GPU (name, compute capability, driver/CUDA) or the CPU (model, core count, BLAS), and
the versions of the libraries whose code we time.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import platform
from collections.abc import Iterator
from functools import cache

import numpy as np
import torch

from autotune import precision
from autotune.errors import DeviceError, UnknownNameError

DEVICE_CHOICES = ("auto", "cpu", "cuda")
# The CUDA compute capability (80 = sm_80) kernels are being compiled for without a GPU
# (`autotune compile-check`); None: whatever GPU this process has.
_COMPILE_TARGET: contextvars.ContextVar[int | None] = contextvars.ContextVar("compile_target", default=None)


@contextlib.contextmanager
def compiling_for(capability: int) -> Iterator[None]:
    """Within the block, kernels' checks and launchers target sm_<capability>: launchers only
    compile (nothing runs, CPU tensors stand in for CUDA ones) and checks use its limits."""
    token = _COMPILE_TARGET.set(capability)
    try:
        yield
    finally:
        _COMPILE_TARGET.reset(token)


def compile_target() -> int | None:
    """The capability set by compiling_for(), else None."""
    return _COMPILE_TARGET.get()


def cuda_capability() -> int | None:
    """The capability kernels are built for: compiling_for()'s, else this GPU's, else None."""
    target = _COMPILE_TARGET.get()
    if target is not None:
        return target
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return major * 10 + minor
    return None


def resolve(name: str = "auto") -> str:
    """'auto' picks cuda when a GPU and Triton are usable, else cpu."""
    if name not in DEVICE_CHOICES:
        raise UnknownNameError(f"unknown device {name!r}; choose auto, cpu or cuda")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() and _triton_version() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return name


@cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@cache
def _blas() -> str:
    try:
        info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{info.get('name', '?')} {info.get('version', '')}".strip()
    except Exception:  # noqa: BLE001 - older numpy has no dict mode; the name is informative only
        return "unknown"


@cache
def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def available_memory(kind: str) -> int:
    """Bytes a search can use now: free GPU memory, or the CPU's available RAM."""
    if kind == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return free
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def threads() -> int:
    return torch.get_num_threads()


def fingerprint(kind: str) -> dict[str, str | int]:
    """The hardware a result was measured on. Changing any field invalidates cached results.

    On the CPU it includes torch's thread count at the time of the call: a kernel tuned against
    torch on 2 threads is not the right choice on 1 (and `autotune show` prints it). On a GPU it
    includes torch's TF32 switches (autotune.precision): a choice tuned with TF32 allowed is not
    one to serve where the user asked for IEEE float32.
    """
    if kind == "cuda":
        return {**_fingerprint(kind, 0), "tf32": precision.policy()}
    return _fingerprint(kind, threads())


def machine_tag(kind: str) -> str:
    """Six hex digits naming this machine's hardware (the fingerprint less the thread count; on a
    GPU with the TF32 switches, whose searches measure different configs), so machines sharing
    one study database share a study only when their hardware and policy are the same."""
    fp = {k: v for k, v in fingerprint(kind).items() if k != "threads"}
    return hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:6]


def label(fp: dict) -> str:
    """A fingerprint in a few words, e.g. 'cpu 2 threads' or 'NVIDIA H200'."""
    if fp.get("kind") == "cuda":
        return str(fp.get("gpu", "cuda"))
    count = fp.get("threads")
    return f"cpu {count} thread{'s' if count != 1 else ''}" if count else "cpu"


@cache
def _fingerprint(kind: str, thread_count: int) -> dict[str, str | int]:
    if kind == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return {
            "kind": "cuda",
            "gpu": props.name,
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda or "unknown",
            "sms": props.multi_processor_count,
        }
    return {
        "kind": "cpu",
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "threads": thread_count,
        "blas": _blas(),
    }


@cache
def versions() -> dict[str, str]:
    """Library versions whose code is timed (a new torch may change oneDNN/cuDNN choices)."""
    out = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
    }
    triton = _triton_version()
    if triton:
        out["triton"] = triton
    return out
