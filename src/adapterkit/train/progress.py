"""Progress displays for long work: training steps (loss, tokens/s, ETA) and rows scored (rows/s, ETA).

On an interactive terminal: a live rich bar. Otherwise (CI, `| tee`, a log file) a live bar shows
nothing until the end, so a plain line is printed instead each time another tenth of the work is done,
at least every EVERY_S seconds, and at the end. rich's TTY_INTERACTIVE=0/1 forces either mode.
Always on stderr (stdout stays clean for --json); nothing at all when disabled.
"""

from __future__ import annotations

import math
import time
from typing import Any

EVERY_S = 30.0          # plain lines: at most this long between two lines
TENTHS = 10             # plain lines: one each time another 1/TENTHS of the work is done


def clock(seconds: float | None) -> str:
    """H:MM:SS, or "?" when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


class _Display:
    """A live bar or periodic plain lines over `total` units. Subclasses give the bar's columns and
    fields (`_columns`, `_fields`) and a plain line's middle part (`_line`)."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, max(int(total), 0), enabled
        self.live, self.done = False, 0

    def __enter__(self) -> Any:
        if self.enabled:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False)     # made here: the current sys.stderr
            self.live = self._console.is_interactive
            if self.live:
                from rich.progress import Progress

                self._bar = Progress(*self._columns(), console=self._console)
                self._bar.start()
                self._task = self._bar.add_task(self.label, total=self.total, **self._fields())
            self._t0 = self._last_t = time.monotonic()
            self._base: int | None = None        # units done before the first update (a resumed run)
            self._tenth = 0
        return self

    def _show(self, done: int, advanced: int) -> None:
        """`done` units of `total` are done now, `advanced` of them since the last call."""
        if not self.enabled:
            return
        self.done = done
        if self._base is None:
            self._base = done - advanced
            self._tenth = self._tenths(self._base)
        if self.live:
            self._bar.update(self._task, completed=done, **self._fields())
            return
        now = time.monotonic()
        tenth = self._tenths(done)
        if tenth > self._tenth or now - self._last_t >= EVERY_S:
            self._tenth, self._last_t = tenth, now
            elapsed = now - self._t0
            rate = (done - self._base) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - done) / rate if rate > 0 else None
            pct = f" ({100 * done / self.total:.0f}%)" if self.total else ""
            self._console.print(f"{self.label} {done}/{self.total}{pct} {self._line(now)} elapsed {clock(elapsed)} "
                                f"ETA {clock(eta)}", markup=False, highlight=False, soft_wrap=True)

    def _tenths(self, done: int) -> int:
        return done * TENTHS // self.total if self.total else TENTHS

    def __exit__(self, *exc: Any) -> None:
        if self.enabled and self.live:
            self._bar.stop()

    def _columns(self) -> tuple:
        raise NotImplementedError

    def _fields(self) -> dict[str, Any]:
        return {}

    def _line(self, now: float) -> str:
        raise NotImplementedError


class TrainProgress(_Display):
    """Training steps: `update(record)` with each step's log record (step, loss, tokens_per_s, seconds).
    A plain line shows the mean loss and tokens/s (`unit`: "img" on an image base) over the steps since the
    previous line."""

    def __init__(self, total: int, enabled: bool, label: str = "train", unit: str = "tok") -> None:
        super().__init__(label, total, enabled)
        self.unit = unit
        self._loss, self._tps = float("nan"), 0.0
        self._losses: list[float] = []
        self._tokens = self._seconds = 0.0

    def _columns(self) -> tuple:
        from rich.progress import BarColumn, TextColumn, TimeRemainingColumn

        return (TextColumn(self.label), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn(f"{{task.fields[tps]:.0f}} {self.unit}/s"),
                TimeRemainingColumn())

    def _fields(self) -> dict[str, Any]:
        return {"loss": self._loss, "tps": self._tps}

    def update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._loss, self._tps = record["loss"], record["tokens_per_s"] or 0.0
        self._losses.append(record["loss"])
        self._tokens += self._tps * (record.get("seconds") or 0.0)
        self._seconds += record.get("seconds") or 0.0
        self._show(record["step"] + 1, 1)

    def _line(self, now: float) -> str:
        loss = sum(self._losses) / len(self._losses) if self._losses else float("nan")
        tps = self._tokens / self._seconds if self._seconds > 0 else 0.0
        self._losses, self._tokens, self._seconds = [], 0.0, 0.0
        return f"loss {loss:.4f} {tps:.0f} {self.unit}/s"


class RowProgress(_Display):
    """Rows scored (evaluation): `advance(n)` after each batch of n rows."""

    def __init__(self, total: int, enabled: bool, label: str = "eval") -> None:
        super().__init__(label, total, enabled)

    def _columns(self) -> tuple:
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        return (TextColumn(self.label), BarColumn(), TextColumn("{task.completed}/{task.total} rows"),
                TimeElapsedColumn(), TimeRemainingColumn())

    def advance(self, n: int) -> None:
        self._show(self.done + n, n)

    def _line(self, now: float) -> str:
        elapsed = now - self._t0
        return f"{(self.done - (self._base or 0)) / elapsed if elapsed > 0 else 0.0:.1f} rows/s"
