"""Progress bars (tqdm, on stderr) for every step that takes more than a second or so.

One helper, so every bar looks and behaves alike: it writes to stderr (stdout stays clean for
`--json`), it is shown on a terminal and off otherwise (tqdm's own `disable=None`), and
$AUTOTUNE_PROGRESS forces it either way: 1 writes every step of every bar even when stderr is a
file or a pipe (for logs, and for tests that read the counts), 0 shows none. A caller that must
stay silent (`--json`, `--no-progress`) passes enabled=False.
"""

from __future__ import annotations

import os
import sys

from autotune.errors import AutotuneError

PROGRESS_ENV = "AUTOTUNE_PROGRESS"
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def forced() -> bool | None:
    """True or False when $AUTOTUNE_PROGRESS says so, else None (a terminal decides)."""
    text = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if not text:
        return None
    if text in _ON or text in _OFF:
        return text in _ON
    raise AutotuneError(f"{PROGRESS_ENV} must be 1 or 0 (on or off), got {text!r}")


def bar(*, desc: str, unit: str, total: int | None = None, initial: int = 0, enabled: bool | None = None,
        delay: float = 0.0, leave: bool = False, bar_format: str | None = None, miniters: int | None = None):
    """A tqdm bar on stderr. enabled: False never shows it; True or None shows it on a terminal,
    or wherever $AUTOTUNE_PROGRESS=1. delay: seconds before it appears (a short step stays
    silent). total=None counts without a total (the count is not known in advance)."""
    from tqdm.auto import tqdm

    env = forced()
    show = False if enabled is False or env is False else (True if env else None)
    # Forced on, every update is written at once: a log (or a test) gets the final counts.
    eager = {"delay": 0.0, "mininterval": 0.0, "miniters": 0} if show else {"delay": delay, "miniters": miniters}
    return tqdm(total=total, initial=min(initial, total) if total is not None else initial, desc=desc,
                unit=unit, leave=leave, dynamic_ncols=True, file=sys.stderr, bar_format=bar_format,
                disable=None if show is None else not show, **eager)


class Burst:
    """A bar over a run of measurements whose number is not known in advance, such as the shapes
    the first training step meets for the first time: opened at the first measurement, shown
    only once the run has lasted `delay` seconds, closed when the caller sees the run is over."""

    def __init__(self, *, desc: str, unit: str, delay: float = 1.0) -> None:
        self.desc, self.unit, self.delay = desc, unit, delay
        self.enabled: bool | None = None
        self._bar = None

    @property
    def open(self) -> bool:
        return self._bar is not None

    def begin(self, what: str) -> None:
        """`what` is being measured now (shown beside the count of those done)."""
        if self._bar is None:
            # No total to show a fraction of: the count, the time, and what is being measured.
            # miniters=0: a new name is drawn even when the count has not moved.
            self._bar = bar(desc=self.desc, unit=self.unit, enabled=self.enabled, delay=self.delay,
                            bar_format="{desc}: {n_fmt} {unit} [{elapsed}{postfix}]", miniters=0)
        self._bar.set_postfix_str(what, refresh=False)
        self._bar.update(0)  # draws, once the delay has passed

    def end(self) -> None:
        """The measurement begun last is done."""
        if self._bar is not None:
            self._bar.set_postfix_str("", refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
