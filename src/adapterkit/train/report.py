"""Reports of training and evaluation: a classifier's per-class report and confusion matrix (numbers
and rich tables), per-row predictions (JSONL), and the loss-curve PNG beside a training log.

Plots need matplotlib, an optional dependency: `plot_unavailable()` says why one cannot be drawn.
Files are written atomically (a temporary file in the same folder, then a rename).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .._atomic import atomic_write_text


@dataclass(frozen=True)
class ClassReport:
    labels: list[str]               # labels present in gold or predicted, in the head's order
    precision: list[float]          # per label: tp / predicted as it (0 when never predicted)
    recall: list[float]             # per label: tp / support (0 when support is 0)
    f1: list[float]                 # per label: 2tp / (2tp + fp + fn), as macro_f1 in classification_metrics
    support: list[int]              # gold rows per label
    confusion: list[list[int]]      # [gold label][predicted label] -> rows

    def macro(self) -> dict[str, float]:
        n = len(self.labels)
        return {"precision": sum(self.precision) / n, "recall": sum(self.recall) / n, "f1": sum(self.f1) / n}

    def to_dict(self) -> dict[str, Any]:
        return {"per_class": {label: {"precision": p, "recall": r, "f1": f, "support": s} for label, p, r, f, s
                              in zip(self.labels, self.precision, self.recall, self.f1, self.support)},
                "confusion": {"labels": self.labels, "matrix": self.confusion}}


def class_report(predicted: Sequence[str], gold: Sequence[str], labels: Sequence[str]) -> ClassReport:
    """Per-class precision, recall, F1 and support, and the confusion matrix. Labels that are neither
    in gold nor predicted are left out (macro_f1 leaves them out too)."""
    seen = set(gold) | set(predicted)
    used = [label for label in labels if label in seen] + sorted(seen - set(labels))
    index = {label: i for i, label in enumerate(used)}
    m = [[0] * len(used) for _ in used]
    for p, g in zip(predicted, gold):
        m[index[g]][index[p]] += 1
    precision, recall, f1, support = [], [], [], []
    for i in range(len(used)):
        tp, as_it, rows = m[i][i], sum(row[i] for row in m), sum(m[i])
        precision.append(tp / as_it if as_it else 0.0)
        recall.append(tp / rows if rows else 0.0)
        f1.append(2 * tp / (as_it + rows) if as_it + rows else 0.0)
        support.append(rows)
    return ClassReport(used, precision, recall, f1, support, m)


def report_tables(report: ClassReport) -> list[Any]:
    """Two rich tables: per-class numbers (with the macro average) and the confusion matrix."""
    from rich.markup import escape
    from rich.table import Table

    per = Table("label", "precision", "recall", "F1", "support", title="per-class report")
    for label, p, r, f, s in zip(report.labels, report.precision, report.recall, report.f1, report.support):
        per.add_row(escape(label), f"{p:.4f}", f"{r:.4f}", f"{f:.4f}", str(s))
    macro = report.macro()
    per.add_section()
    per.add_row("macro avg", f"{macro['precision']:.4f}", f"{macro['recall']:.4f}", f"{macro['f1']:.4f}",
                str(sum(report.support)))
    conf = Table("gold \\ predicted", *map(escape, report.labels), title="confusion matrix (rows: gold label)")
    for label, row in zip(report.labels, report.confusion):
        conf.add_row(escape(label), *map(str, row))
    return [per, conf]


def write_predictions(path: str | os.PathLike, texts: Sequence[str], gold: Sequence[str], predicted: Sequence[str],
                      labels: Sequence[str], probs: Sequence[Sequence[float]]) -> Path:
    """One JSON object per row: text, label (gold), predicted, probabilities {label: p} (the head's
    softmax over all its labels). Written atomically."""
    lines = (json.dumps({"text": t, "label": g, "predicted": p, "probabilities": dict(zip(labels, map(float, row)))},
                        ensure_ascii=False) + "\n" for t, g, p, row in zip(texts, gold, predicted, probs))
    atomic_write_text(path, "".join(lines))
    return Path(path)


def loss_plot_path(log_path: str | os.PathLike) -> Path:
    """The loss-curve PNG beside a training log: train_log.jsonl -> train_log.png."""
    p = Path(log_path)
    return p.with_name(p.name + ".png") if p.suffix in ("", ".png") else p.with_suffix(".png")


def plot_unavailable() -> str | None:
    """Why no plot can be drawn (matplotlib missing), or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed: pip install matplotlib"
    return None


def save_loss_plot(path: str | os.PathLike, losses: Sequence[float], evals: Sequence[tuple[int, float]] = (),
                   eval_name: str = "eval score", title: str | None = None) -> Path:
    """Training loss per step (x: steps done, 1..N) and, on a second axis, the eval metric at the
    steps it was measured. Raises ImportError without matplotlib, OSError when it cannot be written."""
    from matplotlib.figure import Figure        # no pyplot: no global backend or figure state
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(range(1, len(losses) + 1), losses, color="tab:blue", linewidth=1, label="training loss")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("training loss", color="tab:blue")
    if evals:
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in evals], [v for _, v in evals], "o-", color="tab:orange", label=eval_name)
        ax2.set_ylabel(eval_name, color="tab:orange")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


MAJORITY_MARGIN = 0.02      # accuracy within this of always answering the majority class: a warning
MACRO_F1_GAP = 0.15         # macro-F1 this far below accuracy: small classes are missed, a warning


def training_notes(name: str, params: dict[str, Any], metrics: dict[str, Any],
                   gold: Sequence[str] = ()) -> list[str]:
    """Lines for the console after training: how many examples were cut to max_length, and warnings
    when a classifier's validation result (or a causal LM's exact match, when its answers repeat, as
    labels do) is close to the majority alone or its macro-F1 is far below its accuracy (each with what
    to do). gold: the validation labels, or a causal LM's validation answers."""
    notes = []
    cut, total = int(params.get("truncated_examples") or 0), int(params.get("train_examples") or 0)
    if cut and total:
        notes.append(f"{cut} of {total} training examples ({cut / total:.0%}) were longer than --max-length "
                     f"{params.get('max_length')} tokens and were cut; a larger --max-length keeps more of each "
                     "(slower steps)")
    acc, f1 = metrics.get("accuracy"), metrics.get("macro_f1")
    # a causal LM whose answers repeat (labels as text) is judged the same way by its exact match
    exact = metrics.get("exact_match") if acc is None and gold and len(set(gold)) <= len(gold) / 3 else None
    score, what = (acc, "accuracy") if acc is not None else (exact, "exact match")
    if score is not None and gold:
        top, count = max(((label, list(gold).count(label)) for label in set(gold)), key=lambda lc: (lc[1], lc[0]))
        share = count / len(gold)
        if score <= share + MAJORITY_MARGIN:
            kind = "class" if acc is not None else "answer"
            notes.append(f"warning: validation {what} {score:.3f} is no better than always answering the majority "
                         f"{kind} {top!r} ({share:.3f}): the adapter learned little; train longer (--steps), on more "
                         "examples, or check the labels")
    if acc is not None and f1 is not None and acc - f1 > MACRO_F1_GAP:
        notes.append(f"warning: validation macro-F1 {f1:.3f} is far below accuracy {acc:.3f}: small classes are "
                     f"mostly missed; `adapterkit eval {name} --report` shows which (more --steps or examples of "
                     "those classes help)")
    return notes
