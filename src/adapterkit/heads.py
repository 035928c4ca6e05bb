"""Task heads saved with an adapter: a classification head over the base's pooled hidden states.

Files beside the adapter: task_head.safetensors (weight [n_labels, hidden], bias [n_labels]) and
task_head.json (type, format_version, labels, pooling). PEFT ignores them, so the folder stays a
loadable PEFT adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, CorruptAdapterError
from .safetensors_io import read_tensors, write_tensors

HEAD_TENSORS, HEAD_JSON = "task_head.safetensors", "task_head.json"
POOLINGS = ("mean", "last")   # mean over tokens (encoders); last non-pad token (decoders)


@dataclass
class ClassificationHead:
    labels: list[str]
    pooling: str
    weight: torch.Tensor          # [n_labels, hidden]
    bias: torch.Tensor            # [n_labels]

    @classmethod
    def create(cls, labels: list[str], hidden: int, pooling: str, seed: int = 0) -> "ClassificationHead":
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; use one of {POOLINGS}")
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ConfigError(f"a classification head needs >= 2 distinct labels, got {labels}")
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randn(len(labels), hidden, generator=gen) * (1.0 / hidden ** 0.5)
        return cls(list(labels), pooling, weight, torch.zeros(len(labels)))

    def label_ids(self, labels: list[str]) -> torch.Tensor:
        index = {label: i for i, label in enumerate(self.labels)}
        unknown = sorted({label for label in labels if label not in index})
        if unknown:
            raise ConfigError(f"label(s) {unknown} are not in the task's labels {self.labels}; "
                              "evaluate on data whose labels the adapter was trained on")
        return torch.tensor([index[label] for label in labels])

    def logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H], attention_mask [B, T] (right padding) -> logits [B, n_labels]."""
        mask = attention_mask.to(hidden.dtype)
        if self.pooling == "mean":
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        else:
            last = attention_mask.sum(1).clamp(min=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0]), last]
        return pooled.to(self.weight.dtype) @ self.weight.t() + self.bias

    def save(self, folder: Path) -> None:
        write_tensors(folder / HEAD_TENSORS, {"weight": self.weight, "bias": self.bias})
        (folder / HEAD_JSON).write_text(json.dumps({"type": "adapterkit.classification_head", "format_version": 1,
                                                    "labels": self.labels, "pooling": self.pooling}), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> "ClassificationHead | None":
        if not (folder / HEAD_JSON).is_file():
            return None
        meta = json.loads((folder / HEAD_JSON).read_text(encoding="utf-8"))
        if meta.get("type") != "adapterkit.classification_head":
            raise CorruptAdapterError(f"{folder / HEAD_JSON} has type {meta.get('type')!r}, not a classification head")
        tensors = read_tensors(folder / HEAD_TENSORS)
        return cls(list(meta["labels"]), meta["pooling"], tensors["weight"], tensors["bias"])
