"""The image side of a vision-language adapter (VL-Adapter style): a frozen image base's feature map,
average-pooled to a grid x grid of positions, projected by a small trained MLP into the language model's
embedding space. The grid*grid vectors stand in the prompt where the image was (vision/vl_prompt.py).

The projector is saved with the adapter as its head (task_head.safetensors + task_head.json, beside a
PEFT LoRA of the language model, which PEFT still loads); it records which image base it reads, by name
and fingerprint, so an adapter is never fed another base's features. A VL adapter trained with an adapter
on the image base too (`image_adapter`, VL-Adapter's option) keeps it in the subfolder image_adapter/ (a
PEFT LoRA of the image base in its turn); its features are the image base's through that adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.heads import HEAD_JSON, HEAD_TENSORS, read_head_files
from ..errors import BaseMismatchError, ConfigError, CorruptAdapterError
from ..formats.safetensors_io import write_tensors


def grid_features(model: nn.Module, pixel_values: torch.Tensor, grid: int) -> torch.Tensor:
    """pixel_values [B, 3, H, W] -> [B, grid*grid, C]: the image base's last feature map (adapterkit's
    MobileNetV2: [B, 1280, 7, 7]; a transformers ViT / CLIP / SigLIP: its patch tokens as a square map,
    [CLS] dropped) average-pooled to grid x grid, row by row."""
    pixel_values = pixel_values.to(next(model.parameters()).dtype)
    if hasattr(model, "features") and isinstance(model.features, nn.Module):     # a CNN: [B, C, h, w]
        maps = model.features(pixel_values)
    else:
        tokens = model(pixel_values=pixel_values).last_hidden_state               # [B, (1 +) N, C]
        n = tokens.shape[1]
        side = int(round((n - 1) ** 0.5))
        if side * side == n - 1:                                                  # a [CLS] token first
            tokens = tokens[:, 1:]
        else:
            side = int(round(n ** 0.5))
            if side * side != n:
                raise ConfigError(f"the image base gives {n} tokens, not a square grid of patches (+ [CLS]); "
                                  "a vision-language adapter reads a square feature map")
        maps = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
    if grid < 1 or grid > min(maps.shape[-2:]):
        raise ConfigError(f"grid {grid} must be between 1 and the feature map's side {min(maps.shape[-2:])}")
    return nn.functional.adaptive_avg_pool2d(maps.float(), grid).flatten(2).transpose(1, 2)


@dataclass
class ImageProjector:
    """features [B, n, C] -> (layer norm) -> Linear(C, mid), GELU, Linear(mid, d) -> [B, n, d] (d: the language
    model's width)."""

    image_base: str               # the image base's name (a built-in, e.g. mobilenet-v2, or a folder)
    image_fingerprint: str        # ... and its fingerprint: features of another base are refused
    grid: int                     # the feature map is pooled to grid x grid = n image tokens
    w1: torch.Tensor              # [mid, C]
    b1: torch.Tensor              # [mid]
    w2: torch.Tensor              # [d, mid]
    b2: torch.Tensor              # [d]
    norm: bool = False            # standardise each feature vector first (layer norm without weights)
    image_adapter: Any = None     # an Adapter on the image base, or None (the bare image base's features)
    _source: str | None = field(default=None, repr=False, compare=False)

    TYPE = "adapterkit.image_projector"
    IMAGE_ADAPTER = "image_adapter"       # its subfolder
    FIELDS = ("w1", "b1", "w2", "b2")

    @classmethod
    def create(cls, image_base: str, image_fingerprint: str, grid: int, feature_dim: int, width: int,
               embed_std: float, seed: int = 0, norm: bool = False) -> "ImageProjector":
        """A fresh projector whose outputs start at about the spread of the language model's token embeddings
        (embed_std), so the image tokens neither vanish nor swamp the text at step 0."""
        if grid < 1:
            raise ConfigError(f"grid must be >= 1, got {grid}")
        gen = torch.Generator().manual_seed(seed)
        mid = width
        w1 = torch.randn(mid, feature_dim, generator=gen) / feature_dim ** 0.5
        w2 = torch.randn(width, mid, generator=gen) * (embed_std / mid ** 0.5) * 2.0
        return cls(image_base, image_fingerprint, grid, w1, torch.zeros(mid), w2, torch.zeros(width), norm)

    def start_copy(self, image_fingerprint: str, grid: int, feature_dim: int, width: int) -> "ImageProjector":
        """A trainable copy of this (trained) projector as the start of another vision-language adapter:
        LLaVA's two stages, the projector aligned once (e.g. projector-only training on describing
        questions), then each task's adapter trained from it. Its image base, grid and widths must match."""
        if self.image_adapter is not None:
            raise ConfigError("this projector was trained with an adapter on the image base (--image-adapter), so "
                              "it reads that adapter's features; start from a projector of the bare image base")
        if image_fingerprint != self.image_fingerprint:
            raise BaseMismatchError(f"the projector to start from reads the image base {self.image_base} "
                                    f"({self.image_fingerprint}); this run's image base is {image_fingerprint}: "
                                    "pass its own image base as --image-base")
        if grid != self.grid:
            raise ConfigError(f"the projector to start from pools the feature map to grid {self.grid}; this run "
                              f"asks for grid {grid}: pass --grid {self.grid}")
        if (feature_dim, width) != (self.feature_dim, self.width):
            raise BaseMismatchError(f"the projector to start from maps {self.feature_dim} features to width "
                                    f"{self.width}; this run needs {feature_dim} -> {width}: start from a projector "
                                    "of the same image base and language model")
        return ImageProjector(self.image_base, self.image_fingerprint, self.grid,
                              *(getattr(self, f).detach().clone().float() for f in self.FIELDS), norm=self.norm)

    def content(self) -> str:
        """sha256 of the projector's tensors: names the projector another adapter started from (lineage)."""
        import hashlib

        h = hashlib.sha256()
        for f in self.FIELDS:
            t = getattr(self, f).detach().cpu().float().contiguous()
            h.update(f"{f}:{tuple(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return "sha256:" + h.hexdigest()[:16]

    @property
    def n_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def feature_dim(self) -> int:
        return self.w1.shape[1]

    @property
    def width(self) -> int:
        return self.w2.shape[0]

    def params(self) -> list[torch.Tensor]:
        return [getattr(self, f) for f in self.FIELDS]

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.params())

    def to(self, device: torch.device | str) -> "ImageProjector":
        for f in self.FIELDS:
            setattr(self, f, getattr(self, f).to(device))
        return self

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, n, C] (grid_features) -> image tokens [B, n, d] float32, on features' device."""
        if features.shape[-1] != self.feature_dim or features.shape[-2] != self.n_tokens:
            raise BaseMismatchError(
                f"this projector reads {self.n_tokens} x {self.feature_dim} features of {self.image_base}; got "
                f"{tuple(features.shape[-2:])}: feed it its own image base's features at grid {self.grid}")
        w = [t.to(features.device) for t in self.params()]
        x = features.float()
        if self.norm:
            x = nn.functional.layer_norm(x, x.shape[-1:])
        x = nn.functional.gelu(nn.functional.linear(x, w[0], w[1]))
        return nn.functional.linear(x, w[2], w[3])

    def feature_source(self) -> str:
        """What the features it reads come from: the image base's fingerprint, and its adapter's content
        fingerprint when it has one (requests carry this, so a replaced adapter's projector never reads
        features its predecessor's image adapter made)."""
        if self._source is None:
            if self.image_adapter is None:
                self._source = self.image_fingerprint
            else:
                from ..merge.common import content_fingerprint

                self._source = f"{self.image_fingerprint}+{content_fingerprint(self.image_adapter)}"
        return self._source

    def check_image_base(self, name: str, fingerprint: str) -> None:
        if fingerprint != self.image_fingerprint:
            raise BaseMismatchError(
                f"this vision-language adapter was trained on the image base {self.image_base} "
                f"({self.image_fingerprint}); {name} is {fingerprint}: use its own image base")

    def save(self, folder: Path) -> None:
        write_tensors(folder / HEAD_TENSORS, {f: getattr(self, f) for f in self.FIELDS})
        if self.image_adapter is not None:
            self.image_adapter.save(folder / self.IMAGE_ADAPTER)
        (folder / HEAD_JSON).write_text(json.dumps({
            "type": self.TYPE, "format_version": 1, "image_base": self.image_base,
            "image_fingerprint": self.image_fingerprint, "grid": self.grid, "norm": self.norm}), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> "ImageProjector":
        meta, tensors = read_head_files(folder, cls.TYPE, "an image projector", "projector", cls.FIELDS)
        try:
            grid, name, fp = int(meta["grid"]), str(meta["image_base"]), str(meta["image_fingerprint"])
        except (KeyError, TypeError, ValueError):
            raise CorruptAdapterError(f"{folder / HEAD_JSON} lacks the projector's grid, image_base or "
                                      "image_fingerprint; save the adapter again") from None
        image_adapter = None
        if (folder / cls.IMAGE_ADAPTER).is_dir():
            from ..core.adapter import Adapter

            image_adapter = Adapter.load(folder / cls.IMAGE_ADAPTER)
            if image_adapter.meta.base_fingerprint not in (None, fp):
                raise CorruptAdapterError(f"{folder / cls.IMAGE_ADAPTER} was made for another image base "
                                          f"({image_adapter.meta.base_fingerprint}) than the projector reads ({fp}); "
                                          "save the adapter again")
        out = cls(name, fp, grid, *(tensors[f] for f in cls.FIELDS), norm=bool(meta.get("norm", False)),
                  image_adapter=image_adapter)
        if out.w1.shape[0] != out.w2.shape[1] or out.b1.shape[0] != out.w1.shape[0] or out.b2.shape[0] != out.w2.shape[0]:
            raise CorruptAdapterError(f"{folder / HEAD_TENSORS}: the projector's tensor shapes do not chain "
                                      f"({[tuple(t.shape) for t in out.params()]}); save the adapter again")
        return out
