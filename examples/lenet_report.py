"""train_lenet.py --report DIR: one HTML page about the run that just finished.

`DIR/index.html` holds five sections, each from this run:
- the environment (CPU, GPU, OS, Python, library versions, CUDA);
- the network's data-flow graph, drawn with matplotlib from a torch.fx trace of the model with
  each node's output shape (torchview/graphviz are not needed);
- the training loss per step and the test accuracy per epoch;
- the profiler's top-10 operators by self CPU time (the --profile run's, or one made here);
- tuned against untuned step times at batch 1, 16 and 64 (or --compare-batch-sizes), with the
  ratio tuned/untuned.
Every file is written atomically (temp file + os.replace).
"""

from __future__ import annotations

import argparse
import html
import importlib.metadata
import os
import platform
from pathlib import Path

import lenet_perf
import torch

import autotune
from autotune import device
from autotune.report_html import png_bytes, pyplot, write_atomic

BATCH_SIZES = (1, 16, 64)
COMPARE_STEPS = 6
PACKAGES = ("torch", "torchvision", "numpy", "triton", "optuna", "matplotlib")


# ---------------------------------------------------------------- environment

def environment() -> list[tuple[str, str]]:
    cuda_built = torch.version.cuda
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        names = sorted({torch.cuda.get_device_name(i) for i in range(gpus)})
        gpu = f"{gpus} × {', '.join(names)}"
    else:
        gpu = "none"
    if cuda_built and gpus:
        cuda = cuda_built
    elif cuda_built:
        cuda = f"none (torch built for CUDA {cuda_built}, no GPU visible)"
    else:
        cuda = "none"
    rows = [("CPU", str(device.fingerprint("cpu")["cpu"])), ("vCPUs", f"{os.cpu_count()} (torch threads: {torch.get_num_threads()})"),
            ("GPU", gpu), ("OS", _os_name()), ("Python", platform.python_version()),
            ("autotune", autotune.__version__)]
    rows += [(name, _version(name)) for name in PACKAGES]
    rows.append(("CUDA", cuda))
    return rows


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return f"{line.split('=', 1)[1].strip(chr(34))} (kernel {platform.release()})"
    except OSError:
        pass
    return platform.platform()


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------- the network's graph

def graph_nodes(model: torch.nn.Module, example: torch.Tensor) -> list[dict]:
    """Every step of the forward pass in order: name, what it is and its output shape.

    torch.fx traces the untuned network (functional relu/pool/flatten included, which module hooks
    would miss) and ShapeProp runs it once on `example` to record each node's output shape.
    """
    from torch.fx import symbolic_trace
    from torch.fx.passes.shape_prop import ShapeProp

    traced = symbolic_trace(model)
    ShapeProp(traced).propagate(example)
    modules = dict(traced.named_modules())
    nodes = []
    for node in traced.graph.nodes:
        meta = node.meta.get("tensor_meta")
        shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
        if node.op == "placeholder":
            kind, text = "io", "input"
        elif node.op == "output":
            kind, text = "io", "output"
            shape = nodes[-1]["shape"] if nodes else None
        elif node.op == "call_module":
            module = modules[node.target]
            kind, text = _module_kind(module), _module_text(module)
        else:
            name = getattr(node.target, "__name__", str(node.target))
            kind = "pool" if "pool" in name else "act" if name in ("relu", "log_softmax", "softmax") else "shape"
            text = name + _call_args(node)
        params = (sum(p.numel() for p in modules[node.target].parameters())
                  if node.op == "call_module" else 0)
        nodes.append({"name": node.name, "kind": kind, "text": text, "shape": shape, "params": params})
    return nodes


def _module_kind(module: torch.nn.Module) -> str:
    if isinstance(module, torch.nn.Conv2d):
        return "conv"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    return "act"


def _module_text(module: torch.nn.Module) -> str:
    if isinstance(module, torch.nn.Conv2d):
        k = "×".join(map(str, module.kernel_size))
        pad = f", pad {module.padding[0]}" if any(module.padding) else ""
        return f"Conv2d {module.in_channels}→{module.out_channels}, {k}{pad}"
    if isinstance(module, torch.nn.Linear):
        return f"Linear {module.in_features}→{module.out_features}"
    return type(module).__name__


def _call_args(node) -> str:
    """The numbers that say what a functional call does (pool size, dim), not its default flags."""
    extra = [repr(a) for a in node.args[1:] if isinstance(a, int | float) and not isinstance(a, bool)]
    extra += [f"{k}={v!r}" for k, v in node.kwargs.items() if k == "dim"]
    return f"({', '.join(extra)})" if extra else ""


COLOURS = {"io": "#ffffff", "conv": "#cfe0f5", "linear": "#fbdcbf", "act": "#eeeeee", "pool": "#d6efd2",
           "shape": "#f3ead0"}


def graph_figure(nodes: list[dict], title: str) -> bytes:
    """Boxes in two columns (first half top to bottom, then the second), arrows along the data flow."""
    plt = pyplot()
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    per_col = -(-len(nodes) // 2)
    box_w, box_h, step, col_gap = 4.4, 0.72, 1.0, 1.2
    fig, ax = plt.subplots(figsize=(10, 0.62 * per_col + 1.0))
    centres = []
    for i, n in enumerate(nodes):
        col, row = divmod(i, per_col)
        x, y = col * (box_w + col_gap), -row * step
        centres.append((x, y))
        ax.add_patch(FancyBboxPatch((x - box_w / 2, y - box_h / 2), box_w, box_h,
                                    boxstyle="round,pad=0.02,rounding_size=0.12",
                                    facecolor=COLOURS[n["kind"]], edgecolor="0.3", linewidth=1))
        shape = "×".join(map(str, n["shape"])) if n["shape"] else "?"
        same = n["name"].rstrip("_0123456789") == n["text"].split("(")[0]  # relu_1 is a relu
        label = n["text"] if same else f"{n['name']}: {n['text']}"
        ax.text(x, y + 0.13, label, ha="center", va="center", fontsize=8.5, fontweight="bold")
        params = f" · {n['params']:,} params" if n["params"] else ""
        ax.text(x, y - 0.17, f"out {shape}{params}", ha="center", va="center", fontsize=8, color="0.25",
                family="monospace")
    for (x0, y0), (x1, y1) in zip(centres, centres[1:], strict=False):
        if x0 == x1:
            start, end = (x0, y0 - box_h / 2), (x1, y1 + box_h / 2)
        else:  # from the bottom of one column across and up to the top of the next
            mid = (x0 + x1) / 2
            ax.plot([x0 + box_w / 2, mid, mid], [y0, y0, y1], color="0.3", linewidth=1.1)
            start, end = (mid, y1), (x1 - box_w / 2, y1)
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color="0.3",
                                     linewidth=1.1, shrinkA=0, shrinkB=0))
    columns = 1 + (len(nodes) - 1) // per_col
    ax.set_xlim(-box_w / 2 - 0.2, (columns - 1) * (box_w + col_gap) + box_w / 2 + 0.2)
    ax.set_ylim(-(per_col - 1) * step - box_h / 2 - 0.2, box_h / 2 + 0.2)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    handles = [FancyBboxPatch((0, 0), 1, 1, facecolor=COLOURS[k], edgecolor="0.3", label=label)
               for k, label in (("conv", "convolution"), ("linear", "fully connected"), ("act", "activation"),
                                ("pool", "pooling"), ("shape", "reshape"))]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=5, fontsize=8,
              frameon=False)
    return png_bytes(fig)


# ---------------------------------------------------------------- loss and accuracy

def trend_figure(summary: dict) -> bytes | None:
    losses = summary.get("losses") or []
    epochs = [e for e in summary.get("epochs", []) if e.get("test_accuracy") is not None]
    if not losses and not epochs:
        return None
    import numpy as np

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": (2, 1)})
    y = np.asarray(losses, dtype=float)
    x = np.arange(1, len(y) + 1)
    left.plot(x, y, color="tab:blue", linewidth=0.8, alpha=0.45, label="each step")
    k = max(2, min(len(y) // 8, 25))
    if len(y) >= 2 * k:
        left.plot(x[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), color="tab:blue", linewidth=1.8,
                  label=f"mean of {k} steps")
    steps = 0
    for e in summary.get("epochs", [])[:-1]:  # epoch boundaries
        steps += e["steps"]
        left.axvline(steps + 0.5, color="0.6", linestyle=":", linewidth=1)
    left.set_xlabel("training step")
    left.set_ylabel("train loss (NLL)")
    left.set_title("Training loss", fontsize=9)
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    if epochs:
        xs, acc = [e["epoch"] for e in epochs], [100 * e["test_accuracy"] for e in epochs]
        right.plot(xs, acc, marker="o", color="tab:green")
        for xe, a, e in zip(xs, acc, epochs, strict=True):
            right.annotate(f"{a:.1f}%\n({e['test_samples']} images)", (xe, a), xytext=(0, 8),
                           textcoords="offset points", ha="center", fontsize=8)
        right.set_xticks(xs)
        right.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
        right.set_ylim(max(0, min(acc) - 15), min(100, max(acc) + 15))
    else:
        right.text(0.5, 0.5, "no test epoch", ha="center", va="center", transform=right.transAxes)
    right.set_xlabel("epoch")
    right.set_ylabel("test accuracy %")
    right.set_title("Test accuracy after each epoch", fontsize=9)
    right.grid(alpha=0.3)
    fig.tight_layout()
    return png_bytes(fig)


# ---------------------------------------------------------------- the page

def build(out: Path, summary: dict, model: torch.nn.Module, data, args: argparse.Namespace,
          device: torch.device) -> dict:
    """Profile and compare batch sizes where the run did not, draw the figures, write `out`."""
    out.mkdir(parents=True, exist_ok=True)
    profile = summary.get("profile")
    if not profile or "top" not in profile:
        profile = lenet_perf.profile_steps(model, data, _with(args, profile_dir=str(out / "profile")), device)
    rows = summary.get("compare_batch_sizes")
    if not rows:
        rows = lenet_perf.compare_batch_sizes(model, data, _with(args, compare_batch_sizes=list(BATCH_SIZES)),
                                              device, steps=COMPARE_STEPS)
    plain = autotune.LeNet5().to(device)
    plain.load_state_dict(model.state_dict())
    example = data.normalize(data.train.images[:1]).to(device)
    mode = f"tuned kernels, policy {summary['policy']}" if summary["tuned"] else "torch kernels"
    figures = {
        "graph.png": graph_figure(graph_nodes(plain, example),
                                  "LeNet-5 data flow: each box's output shape for one 1×28×28 image (torch.fx trace)"),
        "trends.png": trend_figure(summary),
    }
    written = []
    for name, png in figures.items():
        if png is not None:
            write_atomic(out / name, png)
            written.append(name)
    page = _html(summary, environment(), profile, rows, written, out, mode)
    write_atomic(out / "index.html", page)
    print(f"report: {out / 'index.html'}")
    return {"index": str(out / "index.html"), "figures": written, "profile": profile,
            "compare_batch_sizes": rows}


def _with(args: argparse.Namespace, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def _html(summary, env, profile, rows, written, out: Path, mode: str) -> str:
    e = html.escape
    final = summary.get("test_accuracy")
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>LeNet-5 seed lab</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px;margin:0.5em 0}td,th{padding:2px 10px;"
             "border-bottom:1px solid #ddd;text-align:right}td:first-child,th:first-child{text-align:left}"
             "td.l{text-align:left}img{max-width:100%}.note{color:#555;font-size:13px}</style></head><body>",
             "<h1>LeNet-5 seed lab: train_lenet.py result</h1>",
             f"<p>{e(summary['dataset'])} on {e(summary['device'])}, {e(mode)}; "
             f"{len(summary.get('losses', []))} training steps, epochs: {len(summary.get('epochs', []))}"
             + (f", final test accuracy {100 * final:.2f}%" if final is not None else "") + ".</p>"]

    parts.append("<h2 id='environment'>Environment</h2><table>")
    parts += [f"<tr><th>{e(k)}</th><td class='l'>{e(v)}</td></tr>" for k, v in env]
    parts.append("</table>")

    parts.append("<h2 id='graph'>Network data-flow graph</h2>")
    parts.append(_img("graph.png", "LeNet-5 data-flow graph", written))

    parts.append("<h2 id='trends'>Loss and accuracy</h2>")
    parts.append(_img("trends.png", "training loss and test accuracy", written))

    parts.append("<h2 id='profile'>Profiler: top-10 operators</h2>")
    top = profile.get("top", [])
    parts.append(f"<p class='note'>torch.profiler over {profile.get('steps', '?')} training steps at batch "
                 f"{profile.get('batch_size', '?')} ({e(str(profile.get('mode', '?')))}), by self CPU time"
                 + (f"; Chrome trace <a href='{e(_rel(profile['trace'], out))}'>trace.json</a>"
                    if profile.get("trace") else "") + ".</p>")
    parts.append("<table><tr><th>operator</th><th>calls</th><th>self CPU ms</th><th>self CPU %</th>"
                 "<th>CPU total ms</th></tr>")
    parts += [f"<tr><td>{e(r['name'])}</td><td>{r['calls']}</td><td>{r['self_cpu_ms']:.3f}</td>"
              f"<td>{r['self_cpu_pct']:.1f}</td><td>{r['cpu_total_ms']:.3f}</td></tr>" for r in top]
    parts.append("</table>")

    parts.append("<h2 id='batch-sizes'>Batch sizes: tuned vs untuned</h2>")
    parts.append("<p class='note'>Median training-step time per mode on copies of the trained model; "
                 "ratio = tuned ms / untuned ms (&lt; 1: the tuned kernels are faster). Top op: the "
                 "operator with the most self time over the profiled steps.</p>")
    parts.append("<table><tr><th>batch</th><th>untuned ms</th><th>tuned ms</th><th>ratio tuned/untuned</th>"
                 "<th>untuned samples/s</th><th>tuned samples/s</th><th>top op (tuned)</th></tr>")
    for batch in dict.fromkeys(r["batch"] for r in rows):
        u = next((r for r in rows if r["batch"] == batch and r["mode"] == "untuned"), None)
        t = next((r for r in rows if r["batch"] == batch and r["mode"] == "tuned"), None)
        ratio = t["step_ms"] / u["step_ms"] if t and u and u["step_ms"] else None
        parts.append(f"<tr><td>{batch}</td><td>{_num(u, 'step_ms', '.2f')}</td><td>{_num(t, 'step_ms', '.2f')}</td>"
                     f"<td><b>{'-' if ratio is None else format(ratio, '.3f')}</b></td>"
                     f"<td>{_num(u, 'samples_per_s', '.0f')}</td><td>{_num(t, 'samples_per_s', '.0f')}</td>"
                     f"<td class='l'>{e(t['top_op']) if t else '-'}</td></tr>")
    parts.append("</table></body></html>\n")
    return "".join(parts)


def _img(name: str, alt: str, written: list[str]) -> str:
    if name not in written:
        return "<p class='note'>(nothing to draw)</p>"
    return f"<img src='{name}' alt='{html.escape(alt)}'>"


def _num(row, key, fmt) -> str:
    return "-" if row is None or row.get(key) is None else format(row[key], fmt)


def _rel(path: str, out: Path) -> str:
    try:
        return os.path.relpath(path, out)
    except ValueError:
        return path
