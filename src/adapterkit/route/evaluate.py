"""Score a router on labelled prompts: routing accuracy, the confusion matrix (table + PNG), the
fallback rate, end-to-end task accuracy with the router's choice vs the oracle adapter (the adapter
of the prompt's own task, each with its classification head), and the routing time per prompt.

An item is (text, oracle adapter, label or None). A prompt routed to the fallback with no adapter
counts as a routing miss and, end to end, as a wrong answer (the bare base has no task head); a row
routed to several adapters runs with all of them (weighted) and answers with the top one's head.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ConfigError
from ..core.heads import ClassificationHead
from ..train.classification import encode_texts, hidden_states
from .common import Decision, check_output_path

FALLBACK = "(fallback)"


@dataclass(frozen=True)
class Item:
    text: Any                   # the prompt: a text, or an image (path, data URL or PIL image) for an image router
    oracle: str                 # the adapter that should serve it
    label: str | None = None    # the task label (end-to-end accuracy), if known
    task: str | None = None


@dataclass
class RouteReport:
    router: str
    kind: str
    n: int
    routing_accuracy: float
    fallback_rate: float
    labels: list[str]                           # confusion rows: oracle adapters
    columns: list[str]                          # confusion columns: routed top adapter, then FALLBACK
    confusion: list[list[int]]
    per_adapter_accuracy: dict[str, float]
    end_to_end: dict[str, Any] = field(default_factory=dict)     # auto, oracle, ratio, n
    route_ms_per_prompt: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def routed_column(d: Decision) -> str:
    return FALLBACK if d.fallback or d.top is None else d.top


def confusion(items: Sequence[Item], decisions: Sequence[Decision], adapters: Sequence[str]):
    labels = sorted({it.oracle for it in items}, key=lambda n: (adapters.index(n) if n in adapters else len(adapters), n))
    columns = list(adapters) + [FALLBACK]
    matrix = [[0] * len(columns) for _ in labels]
    for it, d in zip(items, decisions):
        matrix[labels.index(it.oracle)][columns.index(routed_column(d))] += 1
    return labels, columns, matrix


def _heads(rt: Any) -> dict[str, ClassificationHead]:
    return {n: a.head for n, a in rt.adapters.items() if isinstance(a.head, ClassificationHead)}


@torch.no_grad()
def evaluate_router(router: Any, rt: Any, items: Sequence[Item], *, batch_size: int = 32,
                    max_length: int = 128) -> RouteReport:
    """rt: an AdapterRuntime on the router's base with the router's adapters attached (and the
    oracle adapters, if other)."""
    if not items:
        raise ConfigError("no items to evaluate the router on")
    heads = _heads(rt)
    e2e = all(it.label is not None for it in items) and all(it.oracle in heads for it in items)
    decisions: list[Decision] = []
    auto_pred: list[str | None] = []
    oracle_pred: list[str | None] = []
    route_s = 0.0
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        texts = [it.text for it in chunk]
        batch = _inputs(rt, texts, max_length)
        t0 = time.perf_counter()
        if router.kind == "gate":
            with router.routing(rt) as trace:
                hidden = hidden_states(rt.model, batch)            # per-token gated forward
            ds = router.summarize(trace, batch["attention_mask"])
            route_s += time.perf_counter() - t0
        else:
            ds = router.route(texts)
            route_s += time.perf_counter() - t0
            if e2e:
                with rt.batch([d.adapters or None for d in ds]):
                    hidden = hidden_states(rt.model, batch)
        decisions.extend(ds)
        if e2e:
            mask = batch["attention_mask"]
            for i, d in enumerate(ds):
                top = None if d.fallback and not d.adapters else d.top
                head = heads.get(top) if top else None
                auto_pred.append(_argmax(head, hidden[i:i + 1], mask[i:i + 1]) if head else None)
            with rt.batch([it.oracle for it in chunk]):
                hidden = hidden_states(rt.model, batch)
            for i, it in enumerate(chunk):
                oracle_pred.append(_argmax(heads[it.oracle], hidden[i:i + 1], mask[i:i + 1]))
    labels, columns, matrix = confusion(items, decisions, router.names)
    right = [routed_column(d) == it.oracle for it, d in zip(items, decisions)]
    per = {}
    for name in labels:
        mine = [r for r, it in zip(right, items) if it.oracle == name]
        per[name] = sum(mine) / len(mine)
    report = RouteReport(router.name, router.kind, len(items), sum(right) / len(items),
                         sum(d.fallback for d in decisions) / len(items), labels, columns, matrix, per,
                         route_ms_per_prompt=1000 * route_s / len(items))
    if e2e:
        auto = sum(p == it.label for p, it in zip(auto_pred, items)) / len(items)
        oracle = sum(p == it.label for p, it in zip(oracle_pred, items)) / len(items)
        report.end_to_end = {"auto": auto, "oracle": oracle, "ratio": auto / oracle if oracle else None, "n": len(items)}
    return report


def _inputs(rt: Any, items: Sequence[Any], max_length: int) -> dict[str, torch.Tensor]:
    """The model inputs of a chunk: token ids, or an image base's pixels (one position per image)."""
    if getattr(rt, "processor", None) is None:
        return encode_texts(rt.tokenizer, items, max_length)
    from ..vision.images import pixels

    return {"pixel_values": pixels(items, rt.processor), "attention_mask": torch.ones(len(items), 1, dtype=torch.long)}


def _argmax(head: ClassificationHead, hidden: torch.Tensor, mask: torch.Tensor) -> str:
    return head.labels[int(head.logits(hidden, mask).argmax(-1))]


PLOT_FIX = "pass --plot PATH in a folder you can write to"


def plot_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def check_plot_path(path: str | Path) -> Path:
    """Refuse, before any work, a plot path that cannot be written (or no matplotlib to draw it)."""
    if not plot_available():
        raise ConfigError("the confusion-matrix plot needs matplotlib: pip install matplotlib")
    return check_output_path(path, "plot", PLOT_FIX)


def plot_confusion(report: RouteReport, path: str | Path) -> Path:
    """Row-normalised confusion matrix as a PNG (written atomically). Raises ConfigError (not a bare
    OSError) if the file cannot be written."""
    try:
        return _plot(report, Path(path))
    except OSError as exc:
        raise ConfigError(f"cannot write the plot {path} ({exc.strerror or exc}); {PLOT_FIX}") from exc


def _plot(report: RouteReport, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = torch.tensor(report.confusion, dtype=torch.float32)
    norm = m / m.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(report.columns), 1.0 + 0.7 * len(report.labels)))
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(report.columns)), report.columns, rotation=30, ha="right")
    ax.set_yticks(range(len(report.labels)), report.labels)
    ax.set_xlabel("routed to")
    ax.set_ylabel("oracle adapter")
    for i in range(len(report.labels)):
        for j in range(len(report.columns)):
            ax.text(j, i, str(report.confusion[i][j]), ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_title(f"{report.router} ({report.kind})\nrouting accuracy {report.routing_accuracy:.3f}", fontsize=10)
    fig.tight_layout()
    tmp = None
    try:                                   # the figure is closed even when the folder cannot be written
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".png", dir=path.parent)
        os.close(fd)
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path
