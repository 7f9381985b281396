"""`autotune report`: the cache, the Optuna studies and a training summary as pictures.

Writes `OUT/index.html` with PNG figures (matplotlib, Agg backend) and the same numbers as
`report.json` and `shapes.csv`:
- speed-up over torch's op per cached shape (torch ms / chosen ms and torch ms / best own ms);
- best-so-far time against configs measured, one panel per study in `studies.db`;
- achieved GFLOP/s per cached shape against this CPU's peak (numpy sgemm 2048^3, measured now)
  and its memory bandwidth (a large copy): a roofline;
- with `--summary PATH` (train_lenet.py --summary-json): step times tuned vs untuned, losses,
  accuracy.
Every file is written atomically (temp file + os.replace); nothing is written before the input
has been checked.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autotune import device as devices
from autotune.cache import STUDIES_FILE, Cache
from autotune.entry import Entry
from autotune.errors import AutotuneError
from autotune.report import problem_text

MAX_STUDY_PANELS = 12


# numbers ---------------------------------------------------------------------------------------
def cpu_peak_gflops(seconds: float = 2.0, n: int = 2048) -> float:
    """This CPU's float32 peak as numpy's BLAS reaches it: the best of repeated 2048^3 sgemms, on
    BLAS's own thread count and on one thread (on a shared machine a busy core stalls the
    multi-threaded run, and the single-threaded one can be the faster)."""
    from threadpoolctl import threadpool_limits

    best = _sgemm_gflops(seconds / 2, n)
    with threadpool_limits(limits=1, user_api="blas"):
        return max(best, _sgemm_gflops(seconds / 2, n))


def _sgemm_gflops(seconds: float, n: int) -> float:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=out)  # warm up
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def cpu_bandwidth_gbs(seconds: float = 0.5, mib: int = 256) -> float:
    """Memory bandwidth as a large numpy copy sees it (bytes read + written per second)."""
    src = np.ones(mib * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def tensor_bytes(problem) -> int:
    """Bytes of the op's inputs and output (each touched once: the roofline's minimum traffic)."""
    size = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}.get(problem.dtype, 4)
    return size * sum(math.prod(shape) for shape in (*problem.input_shapes(), problem.output_shape()))


def shape_rows(entries: Sequence[Entry]) -> list[dict]:
    """One row of numbers per cached shape, sorted by op then shape."""
    rows = []
    for e in sorted(entries, key=lambda e: (e.op, problem_text(e.problem), devices.label(e.device))):
        flops = e.problem.flops()
        nbytes = tensor_bytes(e.problem)
        own = e.best_own
        rows.append({
            "op": e.op, "problem": problem_text(e.problem), "describe": e.problem.describe(),
            "device": devices.label(e.device), "threads": e.threads,
            "chosen": e.algorithm, "chosen_ms": e.median_ms, "torch_ms": e.vendor_ms,
            "own_algorithm": own.algorithm if own else None, "own_ms": own.median_ms if own else None,
            "speedup_chosen": e.vendor_ms / e.median_ms if e.vendor_ms and e.median_ms else None,
            "speedup_own": e.vendor_ms / own.median_ms if e.vendor_ms and own and own.median_ms else None,
            "flops": flops, "bytes": nbytes, "intensity": flops / nbytes if nbytes else None,
            "gflops_chosen": flops / e.median_ms / 1e6 if e.median_ms else None,
            "gflops_torch": flops / e.vendor_ms / 1e6 if e.vendor_ms else None,
        })
    return rows


# figures ---------------------------------------------------------------------------------------
def pyplot():
    """matplotlib's pyplot on the Agg backend (no display; also used by examples/lenet_report.py)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return buffer.getvalue()


def speedup_figure(rows: list[dict]) -> bytes | None:
    rows = [r for r in rows if r["speedup_chosen"]]
    if not rows:
        return None
    plt = pyplot()
    height = 0.38
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.5 * len(rows) + 0.3 * len({r["op"] for r in rows})))
    y, labels, ticks, op_rows = 0.0, [], [], []
    for op in dict.fromkeys(r["op"] for r in rows):
        group = [r for r in rows if r["op"] == op]
        op_rows.append((y - 0.7, op))
        for r in group:
            # Bars grow from 1 (torch's time): right is faster than torch, left is slower.
            for offset, value, algorithm, colour, label, text in (
                (-height / 2, r["speedup_chosen"], r["chosen"], "tab:blue", "torch / chosen", "black"),
                (height / 2, r["speedup_own"], r["own_algorithm"], "tab:orange", "torch / best own", "0.35"),
            ):
                if not value:
                    continue
                ax.barh(y + offset, value - 1, height, left=1, color=colour, label=label if not ticks else None)
                if abs(value - 1) < 0.01:  # torch's op itself: a bar of length zero, mark it
                    ax.plot(1, y + offset, marker="D", markersize=5, color=colour)
                name = "vendor (torch's op)" if algorithm == "vendor" else algorithm
                ax.text(max(value, 1) * 1.03, y + offset, f"{name} {value:.2f}x", va="center", fontsize=8,
                        color=text)
            ticks.append(y)
            labels.append(r["problem"])
            y += 1
        y += 0.6
    values = [v for r in rows for v in (r["speedup_chosen"], r["speedup_own"]) if v]
    lo, hi = min(min(values), 1.0), max(max(values), 1.0)
    ax.set_xscale("log")
    ax.set_xlim(lo / 1.6, hi * 3.5)
    ax.axvline(1.0, color="black", linewidth=0.8)
    for y_op, op in op_rows:
        ax.text(lo / 1.55, y_op + 0.15, op, fontweight="bold", fontsize=9, va="center")
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set_ylim(max(ticks) + 0.8, -1.2)
    ax.set_xlabel("speed-up over torch's op (torch ms / our ms; > 1: faster than torch)")
    ax.set_title("Speed-up over torch per cached shape (label: algorithm)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", which="both", alpha=0.3)
    return png_bytes(fig)


def studies_figure(histories: list[dict]) -> bytes | None:
    histories = [h for h in histories if any(t["median_ms"] for t in h["trials"])][:MAX_STUDY_PANELS]
    if not histories:
        return None
    plt = pyplot()
    cols = min(3, len(histories))
    nrows = -(-len(histories) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    algorithms = sorted({t["algorithm"] for h in histories for t in h["trials"]})
    colours = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(algorithms)}
    seen: set[str] = set()
    for ax, h in zip(axes.flat, histories, strict=False):
        best, xs, ys = float("inf"), [], []
        for i, t in enumerate(h["trials"], start=1):
            if t["median_ms"]:
                label = t["algorithm"] if t["algorithm"] not in seen else None
                seen.add(t["algorithm"])
                ax.scatter(i, t["median_ms"], s=14, alpha=0.6, color=colours[t["algorithm"]], label=label)
                best = min(best, t["median_ms"])
            if best < float("inf"):
                xs.append(i)
                ys.append(best)
        ax.step(xs, ys, where="post", color="black", linewidth=1.4)
        failed = sum(1 for t in h["trials"] if not t["median_ms"])
        ax.set_yscale("log")
        ax.set_title(_wrap(h["name"]), fontsize=7)
        ax.set_xlabel(f"configs measured ({failed} failed)" if failed else "configs measured", fontsize=8)
        ax.set_ylabel("ms (black: best so far)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(histories):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.legend(loc="upper center", ncol=min(8, len(algorithms)), fontsize=8, bbox_to_anchor=(0.5, 0.0),
               title="each dot: one config measured, by algorithm (failed configs: no dot)", title_fontsize=8)
    return png_bytes(fig)


def _wrap(name: str, width: int = 48) -> str:
    parts, line = [], ""
    for piece in name.split("-"):
        if line and len(line) + len(piece) + 1 > width:
            parts.append(line + "-")
            line = piece
        else:
            line = f"{line}-{piece}" if line else piece
    return "\n".join([*parts, line])


def roofline_figure(rows: list[dict], peak: float, bandwidth: float | None) -> bytes | None:
    rows = [r for r in rows if r["gflops_chosen"] and r["intensity"]]
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    xs = np.array([r["intensity"] for r in rows])
    ridge = peak / bandwidth if bandwidth else xs.min()
    lo, hi = min(xs.min() / 3, ridge / 4), max(xs.max() * 3, ridge * 3)
    grid = np.geomspace(lo, hi, 200)
    roof = np.minimum(peak, grid * bandwidth) if bandwidth else np.full_like(grid, peak)
    ax.plot(grid, roof, color="black", linewidth=1.2,
            label=f"roof: peak {peak:.0f} GFLOP/s (numpy sgemm 2048³)"
            + (f", {bandwidth:.1f} GB/s (copy)" if bandwidth else ""))
    ops = list(dict.fromkeys(r["op"] for r in rows))
    markers = dict(zip(ops, "osD^v<>", strict=False))
    for op in ops:
        group = [r for r in rows if r["op"] == op]
        ax.scatter([r["intensity"] for r in group], [r["gflops_chosen"] for r in group], marker=markers[op],
                   color="tab:blue", s=40, label=f"{op}: chosen", zorder=3)
        torch_pts = [r for r in group if r["gflops_torch"]]
        ax.scatter([r["intensity"] for r in torch_pts], [r["gflops_torch"] for r in torch_pts],
                   marker=markers[op], facecolors="none", edgecolors="tab:red", s=40, label=f"{op}: torch",
                   zorder=3)
    for r in rows:
        ax.annotate(f"{r['problem']} ({100 * r['gflops_chosen'] / peak:.0f}%)", (r["intensity"], r["gflops_chosen"]),
                    fontsize=6.5, xytext=(4, 3), textcoords="offset points", color="0.25")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte of inputs + output)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title("Achieved GFLOP/s per cached shape against this CPU's roofline (% of peak)")
    achieved = [v for r in rows for v in (r["gflops_chosen"], r["gflops_torch"]) if v]
    ax.set_ylim(min(min(achieved), peak) / 4, max(max(achieved), peak) * 1.6)
    if max(achieved) > peak:
        ax.text(0.01, 0.01, "points above the roof were timed when this shared machine was quieter than\n"
                "during the peak measurement (or --peak-gflops X sets the peak)", transform=ax.transAxes,
                fontsize=7, color="0.3")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, which="both")
    return png_bytes(fig)


def training_figure(summary: dict) -> bytes | None:
    panels = []
    if summary.get("compare_batch_sizes"):
        panels.append("batches")
    elif summary.get("compare"):
        panels.append("compare")
    if summary.get("losses"):
        panels.append("loss")
    if any(e.get("test_accuracy") is not None for e in summary.get("epochs", [])):
        panels.append("accuracy")
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=True):
        if panel == "batches":
            rows = summary["compare_batch_sizes"]
            batches = sorted({r["batch"] for r in rows})
            x = np.arange(len(batches))
            for i, mode in enumerate(("untuned", "tuned")):
                ms = [next((r["step_ms"] for r in rows if r["batch"] == b and r["mode"] == mode), np.nan)
                      for b in batches]
                bars = ax.bar(x + (i - 0.5) * 0.38, ms, 0.38, label=mode, color=("tab:gray", "tab:blue")[i])
                ax.bar_label(bars, fmt="%.1f", fontsize=7)
            ax.set_xticks(x, [str(b) for b in batches])
            ax.set_xlabel("batch size")
            ax.set_ylabel("median step ms")
            ax.set_title("Training step time: tuned vs untuned", fontsize=9)
            ax.legend(fontsize=8)
        elif panel == "compare":
            c = summary["compare"]
            ax.bar(["untuned", "tuned"], [c["untuned_ms"], c["tuned_ms"]], color=["tab:gray", "tab:blue"])
            ax.set_ylabel("median step ms")
            ax.set_title(f"Step time at batch {c['batch_size']}", fontsize=9)
        elif panel == "loss":
            losses = np.array(summary["losses"], dtype=float)
            ax.plot(np.arange(1, len(losses) + 1), losses, color="tab:blue", linewidth=0.8, alpha=0.5)
            if len(losses) >= 20:
                k = max(5, len(losses) // 50)
                smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
                ax.plot(np.arange(k, len(losses) + 1), smooth, color="tab:blue", linewidth=1.6,
                        label=f"mean of {k}")
                ax.legend(fontsize=8)
            ax.set_xlabel("training step")
            ax.set_ylabel("train loss (NLL)")
            ax.set_title("Training loss", fontsize=9)
        else:
            epochs = [e for e in summary["epochs"] if e.get("test_accuracy") is not None]
            ax.plot([e["epoch"] for e in epochs], [100 * e["test_accuracy"] for e in epochs], marker="o")
            ax.set_xlabel("epoch")
            ax.set_ylabel("test accuracy %")
            ax.set_xticks([e["epoch"] for e in epochs])
            ax.set_title("Test accuracy", fontsize=9)
        ax.grid(alpha=0.3)
    mode = f"tuned, policy {summary.get('policy')}" if summary.get("tuned") else "torch kernels"
    fig.suptitle(f"train_lenet.py on {summary.get('dataset', '?')} ({summary.get('device', '?')}, {mode})",
                 fontsize=10)
    fig.tight_layout()
    return png_bytes(fig)


# files -----------------------------------------------------------------------------------------
def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` through a temp file and os.replace: readers never see half a file."""
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise AutotuneError(f"--out {out} is a file; give a folder for index.html and the figures")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise AutotuneError(f"cannot write the report under --out {out}: {existing} is not a writable folder")


def load_summary(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AutotuneError(f"--summary {path} does not exist (write it with train_lenet.py "
                            "--summary-json PATH)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AutotuneError(f"--summary {path} is not a readable JSON file: {exc}") from None
    if not isinstance(data, dict) or "epochs" not in data:
        raise AutotuneError(f"--summary {path} is not a train_lenet.py --summary-json file (no 'epochs')")
    return data


def build(cache_dir: Path, out: Path, *, summary_path: Path | None = None, peak_gflops: float | None = None,
          bandwidth_gbs: float | None = None) -> dict:
    """Write the report; returns what was written (paths relative to `out`) and the numbers."""
    if cache_dir.exists() and not cache_dir.is_dir():
        raise AutotuneError(f"--cache-dir {cache_dir} is not a folder")
    check_out(out)
    summary = load_summary(summary_path) if summary_path else None
    rows = shape_rows(list(Cache(cache_dir).entries().values()))
    histories = []
    studies = cache_dir / STUDIES_FILE
    if studies.is_file():
        from autotune.tuner import study_histories

        histories = study_histories(f"sqlite:///{studies.resolve()}")
    peak = peak_gflops if peak_gflops else (cpu_peak_gflops() if rows else None)
    bandwidth = bandwidth_gbs if bandwidth_gbs else (cpu_bandwidth_gbs() if rows else None)
    figures = {
        "speedup.png": ("Speed-up over torch's op", speedup_figure(rows)),
        "studies.png": ("Optuna studies: best time so far", studies_figure(histories)),
        "roofline.png": ("Achieved GFLOP/s against this CPU's roofline",
                         roofline_figure(rows, peak, bandwidth) if peak else None),
        "training.png": ("Training example", training_figure(summary) if summary else None),
    }
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (_, png) in figures.items():
        if png is not None:
            write_atomic(out / name, png)
            written.append(name)
    data = {"cache": str(Cache(cache_dir).path), "peak_gflops": peak, "bandwidth_gbs": bandwidth,
            "shapes": rows, "studies": histories, "training": summary}
    write_atomic(out / "report.json", json.dumps(data, indent=1))
    write_atomic(out / "shapes.csv", _csv(rows))
    study_rows = [{"study": h["name"], **t} for h in histories for t in h["trials"]]
    write_atomic(out / "studies.csv", _csv(study_rows))
    write_atomic(out / "index.html", _html(data, figures, written))
    return {"out": str(out), "index": str(out / "index.html"), "figures": written,
            "data": ["report.json", "shapes.csv", "studies.csv"], "shapes": len(rows), "studies": len(histories),
            "peak_gflops": peak}


def _html(data: dict, figures: dict, written: list[str]) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>kernel-autotune report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;border-bottom:1px solid #ddd;"
             "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}</style>",
             "</head><body><h1>kernel-autotune report</h1>",
             f"<p>cache <code>{e(data['cache'])}</code>; {len(data['shapes'])} cached shapes, "
             f"{len(data['studies'])} Optuna studies"]
    if data["peak_gflops"]:
        parts.append(f"; this CPU's peak {data['peak_gflops']:.0f} GFLOP/s (numpy sgemm 2048³)")
    parts.append(". Numbers: <a href='report.json'>report.json</a>, <a href='shapes.csv'>shapes.csv</a>, "
                 "<a href='studies.csv'>studies.csv</a>.</p>")
    for name, (title, _) in figures.items():
        if name in written:
            parts.append(f"<h2>{e(title)}</h2><img src='{name}' alt='{e(title)}'>")
    if not data["shapes"]:
        parts.append("<p>No cached shapes: run <code>autotune search ...</code> first.</p>")
    else:
        def num(v, fmt):
            return "-" if v is None else format(v, fmt)

        parts.append("<h2>Cached shapes</h2><table><tr><th>op</th><th>problem</th><th>device</th><th>chosen</th>"
                     "<th>ms</th><th>torch ms</th><th>speed-up</th><th>best own</th><th>own speed-up</th>"
                     "<th>GFLOP/s</th></tr>")
        for r in data["shapes"]:
            parts.append(f"<tr><td>{e(r['op'])}</td><td>{e(r['problem'])}</td><td>{e(r['device'])}</td>"
                         f"<td>{e(r['chosen'])}</td><td>{num(r['chosen_ms'], '.4f')}</td>"
                         f"<td>{num(r['torch_ms'], '.4f')}</td><td>{num(r['speedup_chosen'], '.2f')}x</td>"
                         f"<td>{e(r['own_algorithm'] or '-')}</td><td>{num(r['speedup_own'], '.2f')}x</td>"
                         f"<td>{num(r['gflops_chosen'], '.1f')}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "".join(parts)
