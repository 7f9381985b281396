"""Where examples/train_lenet.py's time goes: TensorBoard logging, torch.profiler runs, and
tuned-against-untuned step timings.

Every measurement here runs on copies of the trained model with their own optimizer, so profiling
and comparing never change the model that was evaluated and saved.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
import warnings
from pathlib import Path

import lenet_data
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, schedule
from torch.utils.tensorboard import SummaryWriter

import autotune

PROFILE_WAIT, PROFILE_WARMUP, PROFILE_ACTIVE = 1, 1, 3
OUR_PREFIX = "autotune::"


# ---------------------------------------------------------------- steps on copies of the model

def _step(model, optimizer, x, y) -> None:
    optimizer.zero_grad()
    F.nll_loss(model(x), y).backward()
    optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def adadelta(model: torch.nn.Module, lr: float, *, flat: bool = False) -> torch.optim.Optimizer:
    """The example's optimizer. Untuned: torch's Adadelta with foreach=True, all parameters in a
    few multi-tensor ops (torch's default only on GPUs: on the CPU its per-parameter loop cost
    LeNet's step as much as its convolutions). flat (the tuned run): the same update over one flat
    buffer of all parameters (autotune.flat_optimizer), a few whole-buffer ops."""
    if flat:
        return autotune.flat_optimizer(model.parameters(), torch.optim.Adadelta, lr=lr)
    return torch.optim.Adadelta(model.parameters(), lr=lr, foreach=True)


# --compare's modes: (layers patched, flat optimizer). "flat optimizer" is torch's layers with the
# tuned run's optimizer: how much of the tuned step's gain is the optimizer's.
MODES = {"untuned": (False, False), "tuned": (True, True), "flat optimizer": (False, True)}


def copies(model: torch.nn.Module, device: torch.device, lr: float,
           modes: tuple[str, ...] = ("untuned", "tuned"), example: torch.Tensor | None = None) -> dict[str, tuple]:
    """Copies of `model` (same weights) per mode, each with its own Adadelta. With `example` (a
    batch), the tuned copy keeps torch's own modules where every product is cached as torch's
    (autotune.patch), as the step check timed it."""
    plain = autotune.LeNet5().to(device)
    plain.load_state_dict(model.state_dict())  # state_dict keys are the same patched or not
    out = {}
    for name in modes:
        patched, flat = MODES[name]
        m = copy.deepcopy(plain)
        if patched:
            autotune.patch(m, example)
        out[name] = (m, adadelta(m, lr, flat=flat))
    return out


def fixed_batches(data, batch_size: int, count: int, device: torch.device, seed: int) -> list[tuple]:
    """`count` normalized batches (repeated where the data set holds fewer), reused across modes."""
    generator = torch.Generator().manual_seed(seed)
    out = [(data.normalize(x).to(device), y.to(device))
           for x, y in lenet_data.batches(data.train, batch_size, limit=count, generator=generator)]
    return [out[i % len(out)] for i in range(count)]


def _timed_steps(model, optimizer, batches, device) -> list[float]:
    times = []
    for x, y in batches:
        start = time.perf_counter()
        _step(model, optimizer, x, y)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------- --compare

COMPARE_BLOCK_STEPS = 16


def compare_tuned(model, data, args, device, *, steps: int = COMPARE_BLOCK_STEPS) -> dict:
    """Median step time of tuned and untuned copies, timed in alternating blocks on the same data.

    Alternating (ABBA) blocks spread the drift of a shared, throttling machine over both modes,
    so the ratio means more than two back-to-back runs would. A block is 16 steps of one mode
    (fewer when --compare-steps is small, so there are two blocks at least): training runs one
    model step after step, and the first steps after a switch run on caches the other modes
    filled. Measured at batch 16, one thread: the tuned step's 1st, 2nd, 3rd and 4th step in a
    block took 2.94, 2.77, 2.70, 2.67 ms, torch's layers with the same optimizer 2.93, 2.90,
    2.88, 2.85 (the tuned layers' kernels stream their data and warm up over a few steps); with
    blocks of 4 the median was a warming step.
    """
    steps = max(1, min(steps, args.compare_steps // 2))
    blocks = max(2, -(-args.compare_steps // steps))
    batches = fixed_batches(data, args.batch_size, steps, device, args.seed)
    pairs = copies(model, device, args.lr, tuple(MODES), example=batches[0][0])
    for m, opt in pairs.values():  # the first steps select (maybe benchmark) kernels: not timed
        _timed_steps(m, opt, batches[:2], device)
    times: dict[str, list[float]] = {name: [] for name in pairs}
    for block in range(blocks):
        order = list(pairs) if block % 2 == 0 else list(reversed(pairs))
        for name in order:
            times[name] += _timed_steps(*pairs[name], batches, device)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    ratio = ms["tuned"] / ms["untuned"]
    flat_ratio = ms["flat optimizer"] / ms["untuned"]
    print(f"compare (batch {args.batch_size}, {blocks * steps} steps each, interleaved): tuned "
          f"{ms['tuned']:.2f} ms/step, untuned {ms['untuned']:.2f} ms/step, "
          f"ratio tuned/untuned {ratio:.3f} (torch's layers with the flat optimizer alone: "
          f"{ms['flat optimizer']:.2f} ms/step, {flat_ratio:.3f})")
    return {"batch_size": args.batch_size, "tuned_ms": ms["tuned"], "untuned_ms": ms["untuned"],
            "ratio": ratio, "flat_optimizer_ms": ms["flat optimizer"], "flat_optimizer_ratio": flat_ratio,
            "steps": blocks * steps}


# ---------------------------------------------------------------- --compare-batch-sizes

def compare_batch_sizes(model, data, args, device, *, steps: int = 6) -> list[dict]:
    """Per batch size and mode: median step time, samples/s and the top operator by self time."""
    rows = []
    for batch_size in args.compare_batch_sizes:
        batches = fixed_batches(data, batch_size, steps, device, args.seed)
        for mode, (m, opt) in copies(model, device, args.lr, example=batches[0][0]).items():
            _timed_steps(m, opt, batches[:2], device)  # kernel selection happens here
            ms = 1e3 * statistics.median(_timed_steps(m, opt, batches, device))
            with profile(activities=_activities(device)) as prof:
                for x, y in batches[:PROFILE_ACTIVE]:
                    _step(m, opt, x, y)
                _sync(device)
            top = max(prof.key_averages(), key=lambda e: _self_us(e, device))
            rows.append({"batch": batch_size, "mode": mode, "step_ms": ms,
                         "samples_per_s": batch_size / ms * 1e3, "top_op": top.key,
                         "top_self_ms": _self_us(top, device) / 1e3 / PROFILE_ACTIVE})
    # ratio tuned/untuned step time on each tuned row (< 1: the tuned kernels are faster)
    for row in rows:
        untuned = next((r for r in rows if r["batch"] == row["batch"] and r["mode"] == "untuned"), None)
        row["ratio"] = (row["step_ms"] / untuned["step_ms"]
                        if row["mode"] == "tuned" and untuned and untuned["step_ms"] else None)
    print(format_table(rows, ("batch", "mode", "step_ms", "ratio", "samples_per_s", "top_op", "top_self_ms")))
    print("ratio: tuned / untuned median step time (< 1: tuned is faster)")
    return rows


def _activities(device: torch.device) -> list:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def _self_us(event, device: torch.device) -> float:
    return event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total


# ---------------------------------------------------------------- --profile

def profile_steps(model, data, args, device) -> dict:
    """torch.profiler over wait/warmup/active training steps: top-10 table and a Chrome trace."""
    # Kineto (torch's profiler library) logs STAGE/USDT/ERROR lines to stderr on every run (on a
    # CPU-only machine an "ERROR ... gpuGetDeviceCount failed"); level 6 silences them. It reads the
    # variable when the profiler first starts, so setting it here is early enough; a user's own
    # KINETO_LOG_LEVEL wins.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    out = Path(args.profile_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Every layer patched, even those on torch's ops (labelled autotune::<op>:vendor): the profile
    # names each layer's choice.
    m, opt = copies(model, device, args.lr)["tuned" if args.tuned else "untuned"]
    total = PROFILE_WAIT + PROFILE_WARMUP + PROFILE_ACTIVE
    batches = fixed_batches(data, args.batch_size, total, device, args.seed)
    result: dict = {}

    def ready(prof) -> None:
        events = prof.key_averages()
        table = events.table(sort_by="self_cpu_time_total", row_limit=10)
        ours = [e for e in events if e.key.startswith(OUR_PREFIX)]
        text = (f"top 10 operators by self CPU time, {PROFILE_ACTIVE} training steps at batch "
                f"{args.batch_size} ({'tuned' if args.tuned else 'untuned'})\n{table}\n"
                f"our kernels ({OUR_PREFIX}<op>:<algorithm>; CPU time includes the ops they call)\n"
                + _ours_table(ours))
        if device.type == "cuda":
            text += "\nby self device time\n" + events.table(sort_by="self_device_time_total", row_limit=10)
        (out / "profile.txt").write_text(text)
        prof.export_chrome_trace(str(out / "trace.json"))
        print(text)
        result.update(table=str(out / "profile.txt"), trace=str(out / "trace.json"),
                      our_kernels=sorted(e.key for e in ours), top=_top_rows(events, 10),
                      steps=PROFILE_ACTIVE, batch_size=args.batch_size,
                      mode="tuned" if args.tuned else "untuned")

    with profile(activities=_activities(device), on_trace_ready=ready,
                 schedule=schedule(wait=PROFILE_WAIT, warmup=PROFILE_WARMUP, active=PROFILE_ACTIVE,
                                   repeat=1)) as prof:
        for x, y in batches:
            _step(m, opt, x, y)
            _sync(device)
            prof.step()
    print(f"profile: table {out / 'profile.txt'}, Chrome trace {out / 'trace.json'} "
          "(open in chrome://tracing or ui.perfetto.dev)")
    return result


def _top_rows(events, limit: int) -> list[dict]:
    """The `limit` operators with the most self CPU time, as rows of numbers (ms over all steps)."""
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:limit]
    return [{"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "self_cpu_pct": 100 * e.self_cpu_time_total / total, "cpu_total_ms": e.cpu_time_total / 1e3}
            for e in top]


def _ours_table(events) -> str:
    if not events:
        return "  (none: the model runs on torch's own layers; use --tuned)\n"
    rows = [{"name": e.key, "calls": e.count, "cpu_total_ms": e.cpu_time_total / 1e3,
             "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in sorted(events, key=lambda e: e.key)]
    return format_table(rows, ("name", "calls", "cpu_total_ms", "self_cpu_ms")) + "\n"


# ---------------------------------------------------------------- TensorBoard

def open_writer(log_dir: str, model, data, device) -> SummaryWriter:
    writer = SummaryWriter(log_dir)
    # Trace an untuned copy: the graph is the same network, and tracing the tuned layers would
    # run kernel selection inside the JIT tracer.
    plain = autotune.LeNet5().to(device)
    plain.load_state_dict(model.state_dict())
    example = data.normalize(data.train.images[:1]).to(device)
    with warnings.catch_warnings():
        # add_graph has only the JIT tracer, which torch now calls deprecated; the graph is fine.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        writer.add_graph(plain, example)
    return writer


def log_choices(writer: SummaryWriter, choices: list[dict]) -> None:
    """The kernel choices as one text table and one bar figure (kernel ms per problem, coloured by
    algorithm), not one-dot scalars per problem."""
    if not choices:
        writer.add_text("kernels/choices", "torch's own layers (run with --tuned)")
        return
    columns = ("problem", "algorithm", "knobs", "source", "kernel_ms")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in choices]
    writer.add_text("kernels/choices", "\n".join(lines))
    timed = [row for row in choices if row["kernel_ms"] is not None]
    if timed:
        writer.add_figure("kernels/choice_times", _choices_figure(timed), 0)


def _choices_figure(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algorithms = sorted({row["algorithm"] for row in rows})
    colours = {a: plt.cm.tab10(i % 10) for i, a in enumerate(algorithms)}
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.2))
    ax.barh(range(len(rows)), [row["kernel_ms"] for row in rows],
            color=[colours[row["algorithm"]] for row in rows])
    ax.set_yticks(range(len(rows)), [row["problem"].replace(" stride 1", "").replace(" dil 1", "")
                                     for row in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("kernel ms (as timed when chosen)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[a]) for a in algorithms], labels=algorithms,
              fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- plain-text tables

def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def format_table(rows: list[dict], columns: tuple[str, ...]) -> str:
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
