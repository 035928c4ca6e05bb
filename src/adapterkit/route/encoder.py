"""Text -> one vector per text, for the retrieval router: mean-pooled last hidden states of a frozen
model (the adapters' own base, or a small sentence encoder such as MiniLM), no adapter active. An image
base is an encoder of images: its pooled features (vision/hf.image_features), in its own preprocessing.

The encoder is identified by its base fingerprint; a stored router refuses another encoder.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import BaseMismatchError, ConfigError


@dataclass
class Encoder:
    model: torch.nn.Module
    tokenizer: Any
    name: str
    fingerprint: str
    max_length: int = 128
    runtime: Any = None           # an AdapterRuntime on `model`: encode with its adapters disabled
    processor: Any = None         # an image base's preprocessing: this encoder reads images, not texts

    @classmethod
    def from_base(cls, base: Any, *, max_length: int = 128, runtime: Any = None) -> "Encoder":
        if base.kind == "image":
            return cls(base.model, None, base.name, base.fingerprint, max_length, runtime, base.processor)
        if base.tokenizer is None:
            raise ConfigError(f"base {base.name!r} has no tokenizer; a retrieval router needs one to read prompts")
        return cls(base.model, base.tokenizer, base.name, base.fingerprint, max_length, runtime)

    @property
    def images(self) -> bool:
        return self.processor is not None

    @classmethod
    def load(cls, name_or_path: str, *, max_length: int = 128) -> "Encoder":
        from ..core.base import load_base

        return cls.from_base(load_base(name_or_path), max_length=max_length)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "fingerprint": self.fingerprint, "pooling": "image" if self.images else "mean",
                "max_length": self.max_length}

    def check(self, spec: dict[str, Any]) -> None:
        if spec["fingerprint"] != self.fingerprint:
            raise BaseMismatchError(
                f"the router was fitted with encoder {spec['name']} ({spec['fingerprint']}), but the encoder given "
                f"is {self.name} ({self.fingerprint}); load the router with its own encoder")

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """[N, H] float32 on the host: the mean over non-pad tokens of the last hidden state (texts cut at
        max_length), whatever device the model runs on."""
        from ..core.base import to_device
        from ..train.classification import encode_texts, hidden_states

        if self.images:
            return self._embed_images(texts, batch_size)
        out = []
        device = next(self.model.parameters()).device                          # the model's; pooled rows come back
        ctx = self.runtime.disabled() if self.runtime is not None else nullcontext()
        with ctx:
            for start in range(0, len(texts), batch_size):
                batch = to_device(encode_texts(self.tokenizer, list(texts[start:start + batch_size]),
                                               self.max_length), device)
                hidden = hidden_states(self.model, batch).float()               # [B, T, H]
                mask = batch["attention_mask"].to(hidden.dtype)[..., None]      # [B, T, 1]
                out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu())
        if not out:
            return torch.zeros(0, int(self.model.config.hidden_size))
        return torch.cat(out)

    @torch.no_grad()
    def _embed_images(self, images: Sequence[Any], batch_size: int) -> torch.Tensor:
        """[N, H] float32 pooled features of images (paths, PIL images or data URLs), adapters off."""
        from ..vision.hf import image_features
        from ..vision.images import pixels

        out = []
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        ctx = self.runtime.disabled() if self.runtime is not None else nullcontext()
        with ctx:
            for start in range(0, len(images), batch_size):
                x = pixels(list(images[start:start + batch_size]), self.processor).to(device=device, dtype=dtype)
                out.append(image_features(self.model, x).float().cpu())
        if not out:
            return torch.zeros(0, int(self.model.config.hidden_size))
        return torch.cat(out)
