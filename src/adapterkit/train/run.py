"""Train a classification adapter for a task end to end: data -> trainer -> metrics -> store.

`train_classifier` refuses a stored name before any work (unless overwrite), trains adapter + head
with a progress bar (loss, tokens/s, ETA), scores the validation split and stores the adapter with
its task, labels, metrics and lineage.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

from ..adapter import Adapter, create_adapter
from ..base import Base
from ..errors import ConfigError
from ..heads import ClassificationHead
from ..methods.lora import LoraConfig
from ..runtime import AdapterRuntime
from ..store import AdapterStore
from .classification import collate_fn, loss_fn, predict, token_lengths
from .trainer import TrainConfig, dist_rank_world, train

DEFAULT_TARGETS = {"causal-lm": ("q_proj", "k_proj", "v_proj", "o_proj"), "encoder": ("query", "key", "value")}
POOLING = {"causal-lm": "last", "encoder": "mean"}


def classification_metrics(predicted: Sequence[str], gold: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """accuracy and macro-F1 (F1 averaged over the label set; a label never predicted nor present
    counts as 0 only if it appears in gold)."""
    if len(predicted) != len(gold) or not gold:
        raise ConfigError(f"need as many predictions as gold labels (> 0), got {len(predicted)} and {len(gold)}")
    accuracy = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
    f1s = []
    for label in labels:
        tp = sum(p == label and g == label for p, g in zip(predicted, gold))
        fp = sum(p == label and g != label for p, g in zip(predicted, gold))
        fn = sum(p != label and g == label for p, g in zip(predicted, gold))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s), "n": len(gold)}


def train_classifier(
    base: Base,
    name: str,
    train_examples: Sequence[Any],
    eval_examples: Sequence[Any],
    *,
    task: str | None,
    store: AdapterStore,
    config: TrainConfig,
    r: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] | None = None,
    max_length: int = 128,
    overwrite: bool = False,
    progress: bool = True,
    log_path: str | None = None,
) -> tuple[Adapter, dict[str, float]]:
    store.check_free(name, overwrite)                # before any work
    labels = sorted({e.label for e in train_examples})
    lora = LoraConfig(r=r, alpha=alpha, target_modules=tuple(targets or DEFAULT_TARGETS[base.kind]))
    adapter = create_adapter(name, base.model, lora, seed=config.seed, fingerprint=base.fingerprint,
                             base_name=base.name, task=task)
    adapter.head = ClassificationHead.create(labels, base.model.config.hidden_size, POOLING[base.kind], config.seed)
    adapter.meta.labels = labels
    rt = AdapterRuntime.from_base(base)
    rt.add(adapter)
    collate = collate_fn(base.tokenizer, adapter.head, max_length)
    lengths = token_lengths(base.tokenizer, [e.text for e in train_examples])
    truncated = sum(n > max_length for n in lengths)      # collate cuts these to max_length
    score = (lambda: evaluate(rt, adapter, eval_examples, max_length)["accuracy"]) if eval_examples else None
    with TrainProgress(config.steps, progress and dist_rank_world()[0] == 0) as bar:
        result = train(rt, name, train_examples, collate, loss_fn(adapter.head), config,
                       extra_params=[adapter.head.weight, adapter.head.bias], on_step=bar.update, evaluate=score,
                       lengths=lengths, log_path=log_path)
    metrics = evaluate(rt, adapter, eval_examples, max_length) if eval_examples else {}
    adapter.meta.metrics = {f"validation_{k}": v for k, v in metrics.items()}
    adapter.meta.lineage = [{"op": "train", "inputs": [], "params": {
        **asdict(config), "method": "lora", "r": r, "alpha": alpha, "targets": list(lora.target_modules),
        "max_length": max_length, "train_examples": len(train_examples), "truncated_examples": truncated,
        "best_step": result.best_step}}]
    if dist_rank_world()[0] == 0:                   # under torchrun only rank 0 writes the store
        store.put(adapter, overwrite=overwrite)
    return adapter, metrics


def evaluate(rt: AdapterRuntime, adapter: Adapter, examples: Sequence[Any], max_length: int = 128) -> dict[str, float]:
    head = adapter.head
    if head is None:
        raise ConfigError(f"adapter {adapter.name!r} has no classification head; it cannot classify")
    head.label_ids([e.label for e in examples])          # labels unseen in training: a clear error
    if rt.tokenizer is None:
        raise ConfigError("the runtime has no tokenizer; build it with AdapterRuntime.from_base(base)")
    predicted = predict(rt, adapter.name, head, examples, collate_fn(rt.tokenizer, head, max_length))
    return classification_metrics(predicted, [e.label for e in examples], head.labels)


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
