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
    """A training row (text or image example: its fields read through) and its index into the old adapter's
    targets."""

    example: Any
    index: int

    def __getattr__(self, name: str) -> Any:          # .text / .image / .label of the example
        if name == "example":                          # not set yet (copy, unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.example, name)


def old_targets(base: Any, old: Any, examples: Sequence[Any], labels: Sequence[str],
                max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_old [N, L] over `labels`, old_right [N] bool) of the old classifier on the training rows."""
    from ..core.runtime import AdapterRuntime
    from .classification import classifier_collate, predict_proba

    if old.head is None or not hasattr(old.head, "labels"):
        raise ConfigError(f"--compatible-with {old.name!r}: it has no classification head, so it has no "
                          "predictions to stay compatible with")
    if list(old.head.labels) != list(labels):
        raise ConfigError(f"--compatible-with {old.name!r}: its labels {list(old.head.labels)} differ from this "
                          f"run's {list(labels)}; an update keeps its task's labels")
    rt = AdapterRuntime.from_base(base)
    rt.add(old)
    predicted, probs = predict_proba(rt, old.name, old.head, examples, classifier_collate(base, old.head,
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


class CompatLMLoss:
    """Causal-LM updates: the LM loss plus, on the completion tokens the old version predicted right (its
    argmax was the gold next token), KL(p_old || p_new), summed and divided by the completion tokens. The
    old version is attached (frozen) in the training runtime as `teacher`; fit() calls bind(runtime)."""

    def __init__(self, teacher: str, weight: float) -> None:
        self.teacher, self.weight, self.rt = teacher, weight, None

    def bind(self, rt: Any) -> None:
        self.rt = rt

    def __call__(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        from .causal_lm import IGNORE

        rows = batch["input_ids"].shape[0]
        with torch.no_grad(), self.rt.batch([self.teacher] * rows):            # the old version's predictions
            old = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        out = model(**batch)
        gold = batch["labels"][:, 1:]
        keep = (gold != IGNORE) & (old.argmax(-1) == gold)                      # [B, L-1]
        if not bool(keep.any()):
            return out.loss
        p_old = old[keep].float().softmax(-1)                                   # [M, V]
        kl = (p_old * (p_old.clamp_min(1e-12).log() - out.logits[:, :-1][keep].float().log_softmax(-1))).sum()
        return out.loss + self.weight * kl / max(int((gold != IGNORE).sum()), 1)
