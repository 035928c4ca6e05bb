"""The training progress bar: step, loss, tokens per second and ETA (rich); silent when disabled."""

from __future__ import annotations

from typing import Any


class TrainProgress:
    """A rich progress bar with loss and ETA; silent when disabled."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled

    def __enter__(self) -> "TrainProgress":
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._p = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                               TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
                               TimeRemainingColumn())
            self._p.start()
            self._task = self._p.add_task("train", total=self.total, loss=float("nan"), tps=0.0)
        return self

    def update(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self._p.update(self._task, completed=record["step"] + 1, loss=record["loss"],
                           tps=record["tokens_per_s"] or 0.0)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._p.stop()
