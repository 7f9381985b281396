"""Plain-text tables for the terminal (no colour codes, so they paste into notes and logs)."""

from __future__ import annotations

from collections.abc import Sequence

from autotune.problem import POOL_OPS


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if value < 1 else f"{value:.3f}"


def ratio(torch_ms: float | None, ours_ms: float | None) -> str:
    """torch time / our time: above 1 means ours is faster."""
    if not torch_ms or not ours_ms:
        return "-"
    return f"{torch_ms / ours_ms:.2f}x"


def knobs_text(knobs: dict, width: int | None = None) -> str:
    """`name=value` pairs, sorted, space-separated (the one style of every table); cut to `width`
    characters with a trailing "…" when given."""
    text = " ".join(f"{k}={v}" for k, v in sorted(knobs.items())) or "-"
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def format_pairs(rows: Sequence[tuple[str, object]]) -> str:
    """A two-column key/value block."""
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def problem_text(problem) -> str:
    """A problem in a few characters for tables (the op is its own column): conv
    `64x3x32x32 k6x5x5 p2` (stride, padding, dilation only where not 1/0/1), gemm `256x256x256`
    (`nt`-style layout only where transposed), max-pool `16x6x28x28 w2`; the dtype only when not
    float32."""
    if problem.op == "gemm":
        text = f"{problem.m}x{problem.n}x{problem.k}"
        if problem.trans_a or problem.trans_b:
            text += " " + ("t" if problem.trans_a else "n") + ("t" if problem.trans_b else "n")
    elif problem.op in POOL_OPS:
        text = f"{problem.n}x{problem.c}x{problem.h}x{problem.w} w{problem.window}"
    else:
        text = f"{problem.n}x{problem.c}x{problem.h}x{problem.w} k{problem.k}x{problem.r}x{problem.s}"
        for name, value, default in (("s", problem.stride, 1), ("p", problem.padding, 0), ("d", problem.dilation, 1)):
            if value != default:
                text += f" {name}{value}"
    return text if problem.dtype == "float32" else f"{text} {problem.dtype}"
