#!/usr/bin/env python
"""Train the seed's LeNet-5 on MNIST or Fashion-MNIST, on torch's kernels or on tuned ones.

The loop is pytorch/examples' mnist: Adadelta (lr 1.0), StepLR (gamma 0.7), normalized inputs.
With --tuned, autotune.patch swaps the conv, linear and max-pool layers for autotune's, which pick
a kernel for each layer and each pass (forward, grad input, grad weight) the way cuDNN does, and
keep the choice in a cache that survives the process: a second run finds every choice there.

    python examples/train_lenet.py --tuned --epochs 1            # benchmark, then train
    python examples/train_lenet.py --tuned --epochs 1            # again: all from the cache
    python examples/train_lenet.py --tuned --compare --limit-batches 200
    python examples/train_lenet.py --tuned --profile --tensorboard runs/lenet
    python examples/train_lenet.py --epochs 0 --compare-batch-sizes 1,16,64
    python examples/train_lenet.py --tuned --epochs 1 --limit-batches 50 --report lab   # lab/index.html

Exit status 2 with one line on stderr for bad flags or missing data.

On a busy CPU, start it with OMP_NUM_THREADS=1 (or --threads 1 for torch alone): torch's OpenMP
threads and NumPy's BLAS threads spin-waiting for each other can cost more than the step itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import StepLR

import autotune

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this file
import lenet_data  # noqa: E402
import lenet_perf  # noqa: E402
import lenet_report  # noqa: E402

POLICIES = ("cached", "benchmark", "tune")  # autotune.policy() names
SOURCES = ("cache", "benchmark", "tune", "default")  # how autotune.stats() counts selections


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(f"{self.prog}: {message} (see --help)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="train_lenet.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tuned", action="store_true", help="run the layers on autotune's kernels")
    p.add_argument("--policy", choices=POLICIES, default="benchmark",
                   help="what to do for a shape not in the cache (default: benchmark)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--test-batch-size", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1.0, help="Adadelta learning rate")
    p.add_argument("--gamma", type=float, default=0.7, help="StepLR decay per epoch")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dataset", choices=("auto", "mnist", "fashion-mnist"), default="auto")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--no-download", action="store_true", help="never try the internet for data")
    p.add_argument("--cache-dir", default=os.environ.get("AUTOTUNE_CACHE_DIR") or "results",
                   help="tuning cache (default: $AUTOTUNE_CACHE_DIR or results/)")
    p.add_argument("--limit-batches", type=_positive, default=None, metavar="N",
                   help="at most N train batches per epoch and N test batches")
    p.add_argument("--dry-run", action="store_true", help="one train and one test batch per epoch")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=_positive, default=None, metavar="N",
                   help="torch CPU threads (default: torch's); 1 keeps steps steady on a busy machine. "
                   "NumPy's BLAS has its own pool: start with OMP_NUM_THREADS=N to set both")
    p.add_argument("--tensorboard", metavar="DIR", help="write TensorBoard events to DIR")
    p.add_argument("--profile", action="store_true", help="profile a few training steps")
    p.add_argument("--profile-dir", default="runs/profile", help="where --profile writes")
    p.add_argument("--compare", action="store_true", help="time tuned against untuned steps")
    p.add_argument("--compare-steps", type=_positive, default=32, metavar="N",
                   help="timed steps per mode for --compare")
    p.add_argument("--compare-batch-sizes", type=_sizes, metavar="1,16,64",
                   help="profile tuned and untuned steps at these batch sizes")
    p.add_argument("--save-model", nargs="?", const="lenet5.pt", metavar="PATH",
                   help="save the trained state_dict (default path lenet5.pt)")
    p.add_argument("--summary-json", metavar="PATH", help="write losses, accuracy, choices as JSON")
    p.add_argument("--report", metavar="DIR", help="write DIR/index.html: environment, network graph, "
                   "loss and accuracy, profiler top 10, batch sizes 1/16/64 tuned vs untuned")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they show on a terminal, or where AUTOTUNE_PROGRESS=1)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "test_batch_size"):
        if getattr(args, name) < (0 if name == "epochs" else 1):
            raise UsageError(f"train_lenet.py: --{name.replace('_', '-')} must be positive, "
                             f"got {getattr(args, name)}")
    if args.epochs == 0 and not (args.compare or args.compare_batch_sizes or args.profile):
        raise UsageError("train_lenet.py: --epochs 0 trains nothing; use it with --compare, "
                         "--compare-batch-sizes or --profile")
    for name in ("lr", "gamma"):
        if not getattr(args, name) > 0:
            raise UsageError(f"train_lenet.py: --{name} must be positive, got {getattr(args, name)}")
    if args.tensorboard and os.path.exists(args.tensorboard) and not os.path.isdir(args.tensorboard):
        raise UsageError(f"train_lenet.py: --tensorboard {args.tensorboard} is a file; give a folder")
    if args.report and os.path.exists(args.report) and not os.path.isdir(args.report):
        raise UsageError(f"train_lenet.py: --report {args.report} is a file; give a folder")
    if args.dry_run:
        if args.limit_batches not in (None, 1):
            raise UsageError("train_lenet.py: --dry-run runs one batch; leave out --limit-batches")
        args.limit_batches = 1
    return args


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,16,64, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive batch sizes like 1,16,64, got {text!r}")
    return sizes


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("train_lenet.py: --device cuda, but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def build_model(seed: int, device: torch.device, tuned: bool, batch_size: int | None = None) -> torch.nn.Module:
    """LeNet-5; tuned: on autotune's layers, except those whose every product at `batch_size`
    is cached as torch's op (they stay torch's own modules: autotune.patch)."""
    torch.manual_seed(seed)
    model = autotune.LeNet5().to(device)
    if not tuned:
        return model
    example = None if batch_size is None else torch.zeros(batch_size, 1, 28, 28, device=device)
    return autotune.patch(model, example)


def train_step(model, optimizer, x, y) -> tuple[float, float]:
    """One optimizer step; returns the loss and the batch accuracy."""
    optimizer.zero_grad()
    output = model(x)
    loss = F.nll_loss(output, y)
    loss.backward()
    optimizer.step()
    accuracy = (output.argmax(dim=1) == y).float().mean()
    return loss.item(), accuracy.item()


def train_epoch(epoch, model, optimizer, data, args, device, writer, step0) -> dict:
    model.train()
    generator = torch.Generator().manual_seed(args.seed + epoch)
    count = lenet_data.num_batches(len(data.train), args.batch_size, args.limit_batches)
    losses, step_times = [], []
    bar = autotune.progress_bar(total=count, desc=f"epoch {epoch}", unit="batch", enabled=_progress(args),
                                leave=True)
    start = time.perf_counter()
    for i, (images, labels) in enumerate(lenet_data.batches(
            data.train, args.batch_size, limit=args.limit_batches, generator=generator)):
        x, y = data.normalize(images).to(device), labels.to(device)
        t0 = time.perf_counter()
        loss, accuracy = train_step(model, optimizer, x, y)  # .item() waits for the GPU
        step_times.append(time.perf_counter() - t0)
        losses.append(loss)
        if writer is not None:
            writer.add_scalar("train/loss", loss, step0 + i)
            writer.add_scalar("train/accuracy", accuracy, step0 + i)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.update()
    _sync(device)
    seconds = time.perf_counter() - start
    bar.close()
    return {"epoch": epoch, "losses": losses, "train_loss": sum(losses) / max(len(losses), 1),
            "time_s": seconds, "steps": len(losses),
            # The median leaves out the first steps' kernel selection (benchmarking included).
            "step_ms_median": 1e3 * statistics.median(step_times) if step_times else None}


def _progress(args) -> bool | None:
    """Bars on a terminal (or where AUTOTUNE_PROGRESS=1 forces them), none with --no-progress."""
    return False if args.no_progress else None


@torch.no_grad()
def evaluate(model, data, args, device) -> dict:
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    count = lenet_data.num_batches(len(data.test), args.test_batch_size, args.limit_batches)
    # Shown only when the test pass lasts over a second (its first batch measures new shapes).
    with autotune.progress_bar(total=count, desc="test", unit="batch", enabled=_progress(args), delay=1.0) as bar:
        for images, labels in lenet_data.batches(data.test, args.test_batch_size, limit=args.limit_batches):
            x, y = data.normalize(images).to(device), labels.to(device)
            output = model(x)
            loss_sum += F.nll_loss(output, y, reduction="sum").item()
            correct += (output.argmax(dim=1) == y).sum().item()
            seen += len(y)
            bar.update()
    return {"test_loss": loss_sum / seen, "test_accuracy": correct / seen, "test_samples": seen}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def choice_table() -> list[dict]:
    """The kernel each problem runs on now (the memo of the current policy block)."""
    rows = []
    for problem, choice in autotune.chosen().items():
        rows.append({"problem": problem.describe(), "algorithm": choice.spec.algorithm,
                     "knobs": dict(choice.knobs), "source": choice.source,
                     "kernel_ms": choice.median_ms})
    return rows


def selections_since(before: dict[str, int]) -> dict[str, int]:
    now = autotune.stats()
    # "untrusted": measured on this run but refused by the noise guard (torch's op ran instead,
    # nothing was cached, so the next run measures those shapes again).
    return {k: now.get(k, 0) - before.get(k, 0) for k in ("memo", *SOURCES, "untrusted")}


def train(args, data, device) -> tuple[torch.nn.Module, dict]:
    model = build_model(args.seed, device, args.tuned, args.batch_size)
    optimizer = lenet_perf.adadelta(model, args.lr, flat=args.tuned)
    scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)
    writer = lenet_perf.open_writer(args.tensorboard, model, data, device) if args.tensorboard else None
    epochs, losses = [], []
    for epoch in range(1, args.epochs + 1):
        result = train_epoch(epoch, model, optimizer, data, args, device, writer, len(losses))
        losses.extend(result.pop("losses"))
        result.update(evaluate(model, data, args, device))
        scheduler.step()
        epochs.append(result)
        print(f"epoch {epoch}: train loss {result['train_loss']:.4f}, test loss "
              f"{result['test_loss']:.4f}, accuracy {100 * result['test_accuracy']:.2f}% "
              f"({result['test_samples']} images), {result['time_s']:.1f} s for {result['steps']} steps")
        if writer is not None:
            for key in ("train_loss", "test_loss", "test_accuracy", "time_s"):
                writer.add_scalar(f"epoch/{key}", result[key], epoch)
    if writer is not None:
        lenet_perf.log_choices(writer, choice_table())
        writer.close()
    return model, {"epochs": epochs, "losses": losses}


def print_summary(summary: dict) -> None:
    print()
    print(f"dataset {summary['dataset']} on {summary['device']}, "
          f"{'tuned kernels, policy ' + summary['policy'] if summary['tuned'] else 'torch kernels'}")
    for e in summary["epochs"]:
        print(f"  epoch {e['epoch']}: accuracy {100 * e['test_accuracy']:.2f}%, {e['time_s']:.2f} s for "
              f"{e['steps']} steps (median step {e['step_ms_median']:.2f} ms)")
    if summary["choices"]:
        print(lenet_perf.format_table(summary["choices"], ("problem", "algorithm", "knobs", "source",
                                                          "kernel_ms")))
    else:
        print("kernels: torch's own layers (use --tuned or --compare for autotune's)")
    sel = summary["selections"]
    print("selections: " + ", ".join(f"{k} {sel[k]}" for k in SOURCES) + f" (memo hits {sel['memo']})")


def warn_uncached(args, uncached: list[str]) -> None:
    """One line for every shape that ran torch's op for want of a cached entry, with the command
    that tunes them (instead of a warning per shape)."""
    if not uncached:
        return
    extra = (f" --threads {args.threads}" if args.threads else "") + (
        f" --cache-dir {args.cache_dir}" if args.cache_dir != "results" else "")
    sizes = sorted({args.batch_size, args.test_batch_size} if args.epochs else {args.batch_size})
    commands = " and ".join(f"`autotune search lenet --batch {n}{extra}`" for n in sizes)
    print(f"train_lenet.py: warning: {len(uncached)} shapes had no tuned kernel cached and ran torch's op; "
          f"tune them with {commands}, or use --policy benchmark", file=sys.stderr)


def run(args) -> dict:
    device = resolve_device(args.device)
    if args.threads:
        # On an oversubscribed CPU, OpenMP threads waiting on each other can cost more than the
        # LeNet step itself (seen here: 340 ms/step on 2 threads, 24 ms on 1, under load 5).
        torch.set_num_threads(args.threads)
    try:
        data = lenet_data.load(args.dataset, args.data_dir, download=not args.no_download)
    except lenet_data.NoDataError as e:
        raise UsageError(f"train_lenet.py: {e}") from None
    print(f"dataset: {data.note}; {len(data.train)} train / {len(data.test)} test images; "
          f"device {device}")
    summary = {"dataset": data.name, "device": str(device), "tuned": args.tuned, "policy": args.policy}
    before = autotune.stats()
    # One policy block around everything: the memo it holds is the per-layer table we report.
    with autotune.policy(args.policy, cache_dir=args.cache_dir, quiet=True, progress=_progress(args)):
        model, result = train(args, data, device)
        summary.update(result)
        summary["test_accuracy"] = result["epochs"][-1]["test_accuracy"] if result["epochs"] else None
        if args.profile:
            summary["profile"] = lenet_perf.profile_steps(model, data, args, device)
        if args.compare:
            summary["compare"] = lenet_perf.compare_tuned(model, data, args, device)
        if args.compare_batch_sizes:
            summary["compare_batch_sizes"] = lenet_perf.compare_batch_sizes(model, data, args, device)
        summary["choices"] = choice_table()
        summary["selections"] = selections_since(before)
        summary["uncached"] = [problem.describe() for problem, _ in autotune.uncached()]
        if args.report:  # inside the policy block: its profiling and comparison select kernels too
            summary["report"] = lenet_report.build(Path(args.report), summary, model, data, args, device)
    warn_uncached(args, summary["uncached"])
    if args.save_model:
        Path(args.save_model).parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.save_model)
        print(f"saved the model's state_dict to {args.save_model}")
    return summary


def main(argv: list[str] | None = None) -> int:
    threads = torch.get_num_threads()
    try:
        args = parse_args(argv)
        summary = run(args)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except autotune.AutotuneError as e:
        print(f"train_lenet.py: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests): leave as found
    print_summary(summary)
    if args.summary_json:
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary_json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
