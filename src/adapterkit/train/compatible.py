"""Compatible updates (MUSCLE, Echterhoff et al. 2024): `train ... --compatible-with OLD` trains the new
version of a classifier with an extra loss that keeps the old version's correct predictions.

  loss = CE(new logits, gold) + weight · mean_rows[ old_right · KL(p_old || p_new) ]

p_old: the old adapter's softmax on the row (computed once, before training, on the training rows);
old_right: whether the old adapter's prediction was the gold label. Rows the old version got wrong
learn from the labels alone, so the update can fix them (positive flips) while the distillation term
holds the rows users already saw answered right (fewer negative flips).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import ConfigError
from .classification import logits


@dataclass(frozen=True)
class CompatRow:
    """A training row and its index into the old adapter's targets."""

    text: str
    label: str
    index: int


def old_targets(base: Any, old: Any, examples: Sequence[Any], labels: Sequence[str],
                max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_old [N, L] over `labels`, old_right [N] bool) of the old classifier on the training rows."""
    from ..core.runtime import AdapterRuntime
    from .classification import collate_fn, predict_proba

    if old.head is None or not hasattr(old.head, "labels"):
        raise ConfigError(f"--compatible-with {old.name!r}: it has no classification head, so it has no "
                          "predictions to stay compatible with")
    if list(old.head.labels) != list(labels):
        raise ConfigError(f"--compatible-with {old.name!r}: its labels {list(old.head.labels)} differ from this "
                          f"run's {list(labels)}; an update keeps its task's labels")
    rt = AdapterRuntime.from_base(base)
    rt.add(old)
    predicted, probs = predict_proba(rt, old.name, old.head, examples, collate_fn(base.tokenizer, old.head,
                                                                                   max_length))
    right = torch.tensor([p == e.label for p, e in zip(predicted, examples)])
    return probs, right


def compat_collate(collate: Callable[[list[Any]], dict], probs: torch.Tensor,
                   right: torch.Tensor) -> Callable[[list[CompatRow]], dict]:
    """The run's collate plus "old_probs" [B, L] and "old_right" [B] of each row."""
    def run(rows: list[CompatRow]) -> dict:
        idx = torch.tensor([r.index for r in rows])
        return {**collate(rows), "old_probs": probs[idx], "old_right": right[idx]}
    return run


def compat_loss(head: Any, weight: float) -> Callable[[torch.nn.Module, dict], torch.Tensor]:
    def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        z = logits(model, head, batch)
        ce = torch.nn.functional.cross_entropy(z, batch["labels"])
        log_new = torch.log_softmax(z.float(), -1)
        p_old = batch["old_probs"].to(log_new)
        kl = (p_old * (torch.log(p_old.clamp_min(1e-12)) - log_new)).sum(-1)          # [B]
        keep = batch["old_right"].to(kl)
        return ce + weight * (kl * keep).sum() / max(len(kl), 1)
    return loss
