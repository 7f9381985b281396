"""Evaluate candidates in a separate process, so a bad one cannot take the search down with it.

On a GPU a candidate can do worse than raise: an illegal memory access poisons the CUDA context
for the rest of the process, and a kernel can hang. `IsolatedEvaluator` runs
`autotune.measure.evaluate` in a long-lived worker process (started with 'spawn', so it gets a
fresh CUDA context) and waits at most `timeout_s` per candidate. If the worker dies the candidate
is CRASHED; if it does not answer in time it is killed and the candidate is TIMEOUT. Either way
the next candidate gets a fresh worker.

Only plain data crosses the pipe, as JSON: the problem (problem_to_dict), the kernel's
(op, algorithm) name and the knobs go in; the Outcome comes back as a dict. The worker finds the
kernel itself: in the `kernel_modules` it was given (modules with a `KERNELS` list, how tests
bring kernels of their own without registering anything), then in the registry.

    evaluate = IsolatedEvaluator(device="cuda", timeout_s=60)
    try:
        outcome = evaluate(problem, spec, knobs)    # same signature as the in-process evaluator
    finally:
        evaluate.close()
"""

from __future__ import annotations

import contextlib
import importlib
import json
import multiprocessing
import signal
import threading
import time
from collections.abc import Sequence

from autotune import registry
from autotune.measure import Outcome, Status
from autotune.problem import Problem, problem_from_dict, problem_to_dict

# Importing torch, triton and the kernels and creating a CUDA context takes seconds; that is not
# the candidate's time, so the worker reports when it is ready and this bounds the wait for it.
DEFAULT_START_TIMEOUT_S = 120.0


def _spec_name(spec) -> tuple[str, str]:
    """A KernelSpec or an (op, algorithm) pair, as the pair."""
    if isinstance(spec, tuple):
        return spec
    return spec.op, spec.algorithm


# ---------------------------------------------------------------------------------------------
# The worker process


def _find_spec(op: str, algorithm: str, device: str, kernel_modules: Sequence[str]):
    for name in kernel_modules:
        for spec in importlib.import_module(name).KERNELS:
            if spec.op == op and spec.algorithm == algorithm:
                return spec
    return registry.get(op, algorithm, device)


def _evaluate_request(request: dict, device: str, kernel_modules: Sequence[str], options: dict) -> dict:
    from autotune.measure import evaluate

    try:
        problem = problem_from_dict(request["problem"])
        spec = _find_spec(request["op"], request["algorithm"], device, kernel_modules)
        outcome = evaluate(problem, spec, request["knobs"], device=device, **options)
    except Exception as exc:  # noqa: BLE001 - a failure outside the kernel run is still a result
        outcome = Outcome(status=Status.CRASHED, message=f"{type(exc).__name__}: {exc}"[:500])
    return Outcome.as_dict(outcome)


def _serve(conn, device: str, kernel_modules: list[str], options: dict, threads: int | None = None) -> None:
    """Worker main loop: one JSON request in, one JSON outcome out, until told to stop."""
    import torch  # import (and on a GPU, create the context) before saying ready

    if threads:
        torch.set_num_threads(threads)
    if device == "cuda":
        torch.cuda.init()
    conn.send_bytes(b'"ready"')
    while True:
        try:
            request = json.loads(conn.recv_bytes())
        except EOFError:
            return
        if request is None:
            return
        reply = _evaluate_request(request, device, kernel_modules, options)
        # A CUDA error such as an illegal address is sticky: every later candidate in this
        # process would fail too. Say so, and exit; the parent starts a fresh worker.
        healthy = device != "cuda" or reply["status"] != Status.CRASHED.value or _cuda_healthy()
        reply["worker_exiting"] = not healthy
        conn.send_bytes(json.dumps(reply).encode())
        if not healthy:
            return


def _cuda_healthy() -> bool:
    import torch

    try:
        torch.cuda.synchronize()
        return torch.ones(1, device="cuda").add_(1).item() == 2.0
    except Exception:  # noqa: BLE001 - any failure here means the context is gone
        return False


# ---------------------------------------------------------------------------------------------
# The parent side


class IsolatedEvaluator:
    """`evaluate(problem, spec, knobs) -> Outcome`, run in a worker process with a timeout.

    seed and rep_ms are passed on to autotune.measure.evaluate. Call close() (or use `with`) to
    stop the worker.
    """

    def __init__(self, *, device: str, timeout_s: float = 60.0,
                 start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
                 kernel_modules: Sequence[str] = (), seed: int = 0, rep_ms: float | None = None,
                 threads: int | None = None):
        self.device = device
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.kernel_modules = list(kernel_modules)
        self.options = {"seed": seed, **({"rep_ms": rep_ms} if rep_ms is not None else {})}
        # torch's CPU thread count for the worker's timings (the parent's --threads; a spawned
        # process would otherwise start with torch's default).
        self.threads = threads
        self._context = multiprocessing.get_context("spawn")
        self._process = None
        self._conn = None

    def __call__(self, problem: Problem, spec, knobs) -> Outcome:
        op, algorithm = _spec_name(spec)
        request = {"problem": problem_to_dict(problem), "op": op, "algorithm": algorithm,
                   "knobs": dict(knobs)}
        self._ensure_started()
        try:
            self._conn.send_bytes(json.dumps(request).encode())
        except (BrokenPipeError, OSError):
            return self._lost(Status.CRASHED, "the worker was gone before the candidate was sent")
        started = time.monotonic()
        if not self._conn.poll(self.timeout_s):
            return self._lost(Status.TIMEOUT, f"no answer within {self.timeout_s:g} s; worker killed")
        try:
            reply = json.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            self._process.join(timeout=5)
            code = self._process.exitcode
            elapsed = time.monotonic() - started
            return self._lost(Status.CRASHED, f"the worker died (exit code {code}) after {elapsed:.1f} s")
        if reply.get("worker_exiting"):
            self._stop()
        return Outcome.from_dict(reply)

    def close(self) -> None:
        """Ask the worker to stop; kill it if it does not."""
        if self._process is None:
            return
        try:
            self._conn.send_bytes(b"null")
        except (BrokenPipeError, OSError):
            pass
        self._process.join(timeout=5)
        self._stop()

    def __enter__(self) -> IsolatedEvaluator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten close() must not leave a worker behind (it would hold the GPU).
        if getattr(self, "_process", None) is not None:
            self._stop()

    # -- worker lifetime

    def _ensure_started(self) -> None:
        if self._process is not None and self._process.is_alive():
            return
        self._stop()
        parent, child = self._context.Pipe(duplex=True)
        self._process = self._context.Process(
            target=_serve, args=(child, self.device, self.kernel_modules, self.options, self.threads),
            name="autotune-worker", daemon=True,
        )
        # Ctrl-C reaches the whole process group: the worker starts with SIGINT ignored (spawn
        # keeps that across exec, and Python then installs no handler), so only the search prints
        # one line and stops it, instead of the worker printing a traceback first.
        with _sigint_ignored():
            self._process.start()
        child.close()  # so that a dead worker shows up as EOF on our end
        self._conn = parent
        if not parent.poll(self.start_timeout_s):
            self._stop()
            raise RuntimeError(f"the evaluation worker did not start within {self.start_timeout_s:g} s")
        try:
            parent.recv_bytes()
        except EOFError:
            code = self._process.exitcode
            self._stop()
            raise RuntimeError(f"the evaluation worker failed to start (exit code {code})") from None

    def _lost(self, status: Status, message: str) -> Outcome:
        """The worker cannot be trusted any more: kill it; the next call starts a fresh one."""
        self._stop()
        return Outcome(status=status, message=message)

    def _stop(self) -> None:
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(timeout=5)
        if self._conn is not None:
            self._conn.close()
        self._process = None
        self._conn = None


@contextlib.contextmanager
def _sigint_ignored():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
