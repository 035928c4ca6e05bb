"""The head-only baseline: a linear head fitted on the frozen base's pooled features (a linear probe).

It answers "what does the adapter add over the base?": same examples, same head and pooling, but
the base's representations stay as they are. Features are computed once (no gradients through the
base), then the head is fitted by full-batch AdamW on them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..core.base import Base, to_device
from ..core.heads import ClassificationHead
from .classification import classifier_collate, hidden_states


@torch.no_grad()
def pooled_features(model: torch.nn.Module, collate: Callable[[list[Any]], dict], head: ClassificationHead,
                    examples: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
    """[N, H] float32 pooled hidden states of the model as it runs now (adapters as active), on the host
    (the probe is fitted there). collate: the base's (texts or images)."""
    device = next(model.parameters()).device
    feats = []
    for start in range(0, len(examples), batch_size):
        batch = to_device(collate(list(examples[start:start + batch_size])), device)
        feats.append(head.pool(hidden_states(model, batch), batch["attention_mask"]).float().cpu())
    return torch.cat(feats)


def fit_probe(base: Base, examples: Sequence[Any], pooling: str, max_length: int, *, steps: int = 300,
              lr: float = 1e-2, seed: int = 0) -> ClassificationHead:
    """A ClassificationHead over the frozen base (no adapter), fitted on `examples` (.text or .image, .label)."""
    labels = sorted({e.label for e in examples})
    head = ClassificationHead.create(labels, base.model.config.hidden_size, pooling, seed)
    was_training = base.model.training
    base.model.eval()
    try:
        x = pooled_features(base.model, classifier_collate(base, head, max_length), head, examples)
    finally:
        base.model.train(was_training)
    y = head.label_ids([e.label for e in examples])
    weight, bias = head.weight.clone().requires_grad_(True), head.bias.clone().requires_grad_(True)
    opt = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x @ weight.t() + bias, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    head.weight, head.bias = weight.detach(), bias.detach()
    return head
