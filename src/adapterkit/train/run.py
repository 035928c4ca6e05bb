"""Train a classification adapter for a task end to end: data -> trainer -> metrics -> store.

`train_classifier` refuses a stored name (unless overwrite) and a name another process is training
(the run lock) before any work, trains adapter + head with a progress bar (loss, tokens/s, ETA),
scores the validation split and stores the adapter with its task, labels, metrics and lineage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from ..core.adapter import Adapter
from ..core.base import Base
from ..errors import ConfigError
from ..core.heads import ClassificationHead
from ..core.runtime import AdapterRuntime
from ..store import AdapterStore
from .classification import check_modality, classifier_collate, loss_fn, predict_proba, token_lengths
from .fit import finish, fit, method_info, run_lock, start_run
from .probe import fit_probe
from .progress import RowProgress
from .defaults import selection_rows
from .trainer import TrainConfig, dist_rank_world

POOLING = {"causal-lm": "last", "encoder": "mean", "image": "mean"}      # image: its pooled features, one position


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


HEAD_INITS = ("random", "probe", "previous", "source")


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
    resume: bool = False,
    log_path: str | None = None,
    select_rows: int | None = None, method: str = "lora", method_options: dict[str, Any] | None = None,
    compatible_with: Adapter | None = None, compat_weight: float = 1.0, head_init: str = "random",
) -> tuple[Adapter, dict[str, float]]:
    """select_rows: validation rows (a seeded sample) of the best-checkpoint checks (None: all).
    compatible_with: the version users have now; the new one keeps its correct predictions (compatible.py).
    head_init: "random", or "probe": the head starts as the linear probe on the frozen base's features
    (train/probe.py), then trains with the adapter (LP-FT, Kumar et al. 2022), or "previous": as the head of the
    adapter the run continues (method_options["continue_from"]; an update of the same task that starts
    where the old version stands, tensors and head), or "source" (a composition): as the head of its first
    source trained on the run's labels (the target's own few-shot adapter among ScaLearn's sources)."""
    if head_init not in HEAD_INITS:
        raise ConfigError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}")
    check_modality(base.kind, train_examples, "the training examples")
    check_modality(base.kind, eval_examples, "the evaluation examples")
    with run_lock(store, name):      # one run per name: a second trainer fails here
        # the probe reads the base before the adapter is attached
        probe = fit_probe(base, train_examples, POOLING[base.kind], max_length, seed=config.seed) \
            if head_init == "probe" and not resume else None
        adapter = start_run(base, name, task=task, store=store, config=config, r=r, alpha=alpha, targets=targets,
                            overwrite=overwrite, resume=resume, method=method,
                            options=method_options)
        labels = sorted({e.label for e in train_examples})
        if probe is not None:
            head = probe
        elif head_init == "previous":
            head = previous_head(store, method_options, labels)
        elif head_init == "source":
            index, head = source_head(store, method, method_options, labels)
            if (method_options or {}).get("omega_init") == "source" and not resume:
                start_at_source(adapter, index)
        else:
            head = ClassificationHead.create(labels, base.model.config.hidden_size, POOLING[base.kind], config.seed)
        adapter.head = head.to(base.device)                  # trains beside the base
        adapter.meta.labels = labels
        lengths = ([1] * len(train_examples) if base.kind == "image"       # an image is one unit
                   else token_lengths(base.tokenizer, [e.text for e in train_examples]))
        truncated = sum(n > max_length for n in lengths)      # collate cuts these to max_length
        info = {"objective": "classification", **method_info(adapter), "head_init": head_init,
                **({"omega_init": method_options["omega_init"]} if (method_options or {}).get("omega_init") else {}),
                "targets": list(adapter.config.target_modules), "max_length": max_length, "labels": labels}
        checks = selection_rows(eval_examples, select_rows, config.seed)        # best-checkpoint rows
        score = (lambda rt: evaluate(rt, adapter, checks, max_length)["accuracy"]) if eval_examples else None
        rows, collate, loss = train_examples, classifier_collate(base, adapter.head, max_length), loss_fn(adapter.head)
        if compatible_with is not None:              # MUSCLE: distil the old version where it was right
            from ..merge.common import content_fingerprint
            from .compatible import CompatRow, compat_collate, compat_loss, old_targets

            probs, right = old_targets(base, compatible_with, train_examples, labels, max_length)
            rows = [CompatRow(e, i) for i, e in enumerate(train_examples)]
            collate, loss = compat_collate(collate, probs, right), compat_loss(adapter.head, compat_weight)
            info["compatible_with"] = {"name": compatible_with.name,
                                       "fingerprint": content_fingerprint(compatible_with),
                                       "weight": compat_weight, "old_right": round(float(right.float().mean()), 4)}
        rt, result = fit(base, adapter, rows, collate,
                         loss, config, store=store, resume=resume, log_path=log_path,
                         progress=progress, extra_params=[adapter.head.weight, adapter.head.bias], evaluate=score,
                         lengths=lengths, run_info=info,
                         sft=(method_options or {}) if method == "sparse" else None, eval_name="validation accuracy")
        metrics = evaluate(rt, adapter, eval_examples, max_length, progress and dist_rank_world()[0] == 0) \
            if eval_examples else {}
        finish(store, adapter, metrics, {**asdict(config), **info, "train_examples": len(train_examples),
                                         "truncated_examples": truncated, "best_step": result.best_step}, overwrite)
        return adapter, metrics


def previous_head(store: AdapterStore, options: dict[str, Any] | None, labels: list[str]) -> ClassificationHead:
    """head_init "previous": a copy of the continued adapter's head, which must have the run's labels."""
    name = (options or {}).get("continue_from")
    if not name:
        raise ConfigError("--head-init previous starts the head as the head of the adapter the run continues: add "
                          "--continue-from NAME (the version being updated), or leave --head-init out")
    old = store.get(name).head
    if old is None or not hasattr(old, "labels"):
        raise ConfigError(f"--head-init previous: {name!r} has no classification head to start from; leave "
                          "--head-init out (a random head)")
    if list(old.labels) != list(labels):
        raise ConfigError(f"--head-init previous: {name!r}'s labels {list(old.labels)} differ from this run's "
                          f"{labels}; its head can start only a run of the same labels (leave --head-init out)")
    return ClassificationHead(list(old.labels), old.pooling, old.weight.detach().float().clone(),
                              old.bias.detach().float().clone())


def source_head(store: AdapterStore, method: str, options: dict[str, Any] | None,
                labels: list[str]) -> tuple[int, ClassificationHead]:
    """head_init "source": (its index, a copy of the head) of the first of a composition's sources (in --sources
    order) whose classification head has the run's labels."""
    from ..methods import get_method

    if not getattr(get_method(method), "composes", False):
        raise ConfigError(f"--head-init source starts the head as a composition source's head; this run trains "
                          f"{method}, which has no sources: add --method scalearn or fusion, or leave --head-init out")
    given = (options or {}).get("sources") or ()
    names = [n.strip() for n in (given.split(",") if isinstance(given, str) else given) if n.strip()]
    seen = []
    for index, name in enumerate(names):
        head = store.get(name).head
        if head is not None and hasattr(head, "labels"):
            if list(head.labels) == list(labels):
                return index, ClassificationHead(list(head.labels), head.pooling, head.weight.detach().float().clone(),
                                          head.bias.detach().float().clone())
            seen.append(f"{name} {list(head.labels)}")
    raise ConfigError(f"--head-init source: no source has a classification head with this run's labels {labels} "
                      f"({'; '.join(seen) or 'none has a classification head'}); add a source trained on the "
                      "task (e.g. a few-shot adapter of it), or leave --head-init out (a random head)")


def start_at_source(adapter: Adapter, index: int) -> None:
    """omega_init "source": ScaLearn's ω [N, d] = 1 for source `index`, 0 for the others at every site, so the
    composition starts as that source alone (its change exactly) and learns what the others add."""
    if adapter.config.type != "scalearn":
        raise ConfigError(f"--omega-init sets ScaLearn's ω; {adapter.method.an_adapter} has none: leave it out")
    with torch.no_grad():
        for parts in adapter.tensors.values():
            parts["omega"].zero_()
            parts["omega"][index] = 1.0


@dataclass(frozen=True)
class Scored:
    """Per-row results of a classification adapter on labelled examples."""
    labels: list[str]               # the head's labels: the columns of probs
    gold: list[str]                 # [N]
    predicted: list[str]            # [N]
    probs: torch.Tensor             # [N, L] softmax over labels

    def metrics(self) -> dict[str, float]:
        return classification_metrics(self.predicted, self.gold, self.labels)


def score(rt: AdapterRuntime, adapter: Adapter, examples: Sequence[Any], max_length: int = 128,
          progress: bool = False) -> Scored:
    """Classify every example (a progress bar over the rows when `progress`)."""
    head = adapter.head
    if not isinstance(head, ClassificationHead):
        raise ConfigError(f"adapter {adapter.name!r} has no classification head; it cannot classify")
    gold = [e.label for e in examples]
    head.label_ids(gold)                                 # labels unseen in training: a clear error
    check_modality("image" if getattr(rt, "processor", None) is not None else "text", examples, "the examples")
    with RowProgress(len(examples), progress) as bar:
        predicted, probs = predict_proba(rt, adapter.name, head, examples, classifier_collate(rt, head, max_length),
                                         on_batch=bar.advance)
    return Scored(list(head.labels), gold, predicted, probs)


def evaluate(rt: AdapterRuntime, adapter: Adapter, examples: Sequence[Any], max_length: int = 128,
             progress: bool = False) -> dict[str, float]:
    """accuracy, macro_f1 and n of a classification adapter on labelled examples."""
    return score(rt, adapter, examples, max_length, progress).metrics()
