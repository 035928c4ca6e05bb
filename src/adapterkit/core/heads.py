"""Task heads saved with an adapter: a classification head over the base's pooled hidden states,
and a masked-LM head (BERT's) for language/domain adapters on encoders.

Files beside the adapter: task_head.safetensors (the head's trainable tensors) and task_head.json
(type, format_version and the head's settings). `load_head` picks the class from the json "type".
PEFT ignores these files, so the folder stays a loadable PEFT adapter.

Devices: a head read from disk sits on the host; `logits` runs it where the hidden states are (a
no-op copy when they agree), and training moves it to the base's device first (`to`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import BaseMismatchError, ConfigError, CorruptAdapterError
from ..formats.safetensors_io import read_tensors, write_tensors

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

    def to(self, device: torch.device | str) -> "ClassificationHead":
        """Move the head's tensors (kept float32) to `device`, in place; returns self."""
        self.weight, self.bias = self.weight.to(device), self.bias.to(device)
        return self

    def label_ids(self, labels: list[str]) -> torch.Tensor:
        index = {label: i for i, label in enumerate(self.labels)}
        unknown = sorted({label for label in labels if label not in index})
        if unknown:
            raise ConfigError(f"label(s) {unknown} are not in the task's labels {self.labels}; "
                              "evaluate on data whose labels the adapter was trained on")
        return torch.tensor([index[label] for label in labels])

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H], attention_mask [B, T] (right padding) -> pooled [B, H]."""
        attention_mask = attention_mask.to(hidden.device)
        if self.pooling == "mean":
            mask = attention_mask.to(hidden.dtype)
            return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        last = attention_mask.sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H], attention_mask [B, T] (right padding) -> logits [B, n_labels], on hidden's device."""
        dev = hidden.device
        pooled = self.pool(hidden, attention_mask).to(self.weight.dtype)
        return pooled @ self.weight.to(dev).t() + self.bias.to(dev)

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


@dataclass
class MLMHead:
    """transformers' BertOnlyMLMHead: dense H->H, activation, LayerNorm, then a decoder TIED to the
    base's frozen input word embeddings [V, H] plus a trainable bias [V]. Only the trainable tensors
    are saved; the decoder weight is passed in from the base at every call."""
    hidden_act: str
    layer_norm_eps: float
    dense_weight: torch.Tensor    # [H, H]
    dense_bias: torch.Tensor      # [H]
    norm_weight: torch.Tensor     # [H]
    norm_bias: torch.Tensor       # [H]
    bias: torch.Tensor            # [V]

    TYPE = "adapterkit.mlm_head"
    # file tensor names = HF's names under `cls.predictions.` -> our fields
    NAMES = {"transform.dense.weight": "dense_weight", "transform.dense.bias": "dense_bias",
             "transform.LayerNorm.weight": "norm_weight", "transform.LayerNorm.bias": "norm_bias", "bias": "bias"}

    @classmethod
    def create(cls, config, seed: int = 0) -> "MLMHead":
        """A fresh head for a BERT-style model config (HF's init: dense ~ N(0, initializer_range))."""
        act = getattr(config, "hidden_act", "gelu")
        if not isinstance(act, str):
            raise ConfigError(f"the base's hidden_act is {act!r}, not a name; the MLM head needs a named activation")
        hidden, std = config.hidden_size, getattr(config, "initializer_range", 0.02)
        gen = torch.Generator().manual_seed(seed)
        return cls(act, float(getattr(config, "layer_norm_eps", 1e-12)),
                   torch.randn(hidden, hidden, generator=gen) * std, torch.zeros(hidden),
                   torch.ones(hidden), torch.zeros(hidden), torch.zeros(config.vocab_size))

    def params(self) -> list[torch.Tensor]:
        """The trainable tensors (the tied decoder weight is the base's and stays frozen)."""
        return [getattr(self, field) for field in self.NAMES.values()]

    def to(self, device: torch.device | str) -> "MLMHead":
        """Move the trainable tensors (kept float32) to `device`, in place; returns self."""
        for field in self.NAMES.values():
            setattr(self, field, getattr(self, field).to(device))
        return self

    def logits(self, hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """hidden [..., H], embeddings (the base's input word embeddings) [V, H] -> logits [..., V]."""
        from transformers.activations import ACT2FN

        want = (self.bias.shape[0], self.dense_weight.shape[0])
        if tuple(embeddings.shape) != want:
            raise BaseMismatchError(f"this MLM head was made for embeddings of shape {want} (vocab, hidden), but the "
                                    f"base has {tuple(embeddings.shape)}; load the adapter onto its own base")
        w = {field: getattr(self, field).to(hidden.device) for field in self.NAMES.values()}   # on hidden's device
        x = torch.nn.functional.linear(hidden.to(self.dense_weight.dtype), w["dense_weight"], w["dense_bias"])
        x = torch.nn.functional.layer_norm(ACT2FN[self.hidden_act](x), x.shape[-1:], w["norm_weight"],
                                           w["norm_bias"], self.layer_norm_eps)
        return torch.nn.functional.linear(x, embeddings.to(x.dtype), w["bias"])

    def save(self, folder: Path) -> None:
        write_tensors(folder / HEAD_TENSORS, {name: getattr(self, field) for name, field in self.NAMES.items()})
        (folder / HEAD_JSON).write_text(json.dumps({"type": self.TYPE, "format_version": 1,
                                                    "hidden_act": self.hidden_act, "layer_norm_eps": self.layer_norm_eps,
                                                    "decoder": "tied to the base's input word embeddings"}),
                                        encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> "MLMHead":
        meta, tensors = read_head_files(folder, cls.TYPE, "an MLM head", "MLM head", cls.NAMES)
        return cls(meta["hidden_act"], float(meta["layer_norm_eps"]),
                   **{field: tensors[name] for name, field in cls.NAMES.items()})


HEAD_TYPES = {"adapterkit.classification_head": ClassificationHead, MLMHead.TYPE: MLMHead}


def load_head(folder: Path) -> Any:
    """The head saved in an adapter folder (its class from the json "type": ClassificationHead, MLMHead or
    vision.projector.ImageProjector), or None without one."""
    if not (folder / HEAD_JSON).is_file():
        return None
    kind = _head_json(folder).get("type")
    if kind == "adapterkit.image_projector":           # a vision-language adapter's (vision/projector.py)
        from ..vision.projector import ImageProjector

        return ImageProjector.load(folder)
    if kind not in HEAD_TYPES:
        raise CorruptAdapterError(f"{folder / HEAD_JSON} has type {kind!r}; this adapterkit reads the heads "
                                  f"{sorted([*HEAD_TYPES, 'adapterkit.image_projector'])}: upgrade adapterkit")
    return HEAD_TYPES[kind].load(folder)


def read_head_files(folder: Path, kind: str, what: str, short: str, names: Any) -> tuple[dict, dict]:
    """(task_head.json, task_head.safetensors' tensors) of a head of type `kind`, format version 1, holding every
    tensor in `names`; CorruptAdapterError naming the file otherwise (what: "an MLM head"; short: "MLM head")."""
    meta = _head_json(folder)
    if meta.get("type") != kind or meta.get("format_version", 0) > 1:
        raise CorruptAdapterError(f"{folder / HEAD_JSON} is type {meta.get('type')!r} version "
                                  f"{meta.get('format_version')!r}, not {what} of version 1: upgrade adapterkit")
    tensors = read_tensors(folder / HEAD_TENSORS)
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise CorruptAdapterError(f"{folder / HEAD_TENSORS} lacks the {short} tensor(s) {missing}; save the adapter "
                                  "again")
    return meta, tensors


def _head_json(folder: Path) -> dict:
    try:
        return json.loads((folder / HEAD_JSON).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CorruptAdapterError(f"{folder / HEAD_JSON} is not valid JSON ({exc}); save the adapter again") from None
