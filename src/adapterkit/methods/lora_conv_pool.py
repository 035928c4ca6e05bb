"""LoRA's site pool at a Conv2d, as PEFT defines it: lora_A a conv of the base's kernel, stride and
padding [r, C_in, kh, kw], lora_B a 1x1 conv [C_out, r, 1, 1]; the delta is scale · B(A(x)).

Units are images (row mode: each image its own adapters; "all": one set for the batch). Per step, each
adapter of the batch runs on the rows that use it only (index_select, two convolutions, index_add):
the cost grows with images, not with adapters held, and autograd flows through the same path, so
training and mixed-batch inference share one kernel (there are no stacked copies to refresh)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch.nn import functional as F

from ..errors import ConfigError
from .base import SiteInfo


class ConvLoraPool:
    def __init__(self, site: SiteInfo, capacity: int) -> None:
        self.site = site
        self.capacity = capacity
        _, self.stride, self.padding = site.conv
        # slot -> (A [r, C_in, kh, kw], B [C_out, r, 1, 1], scale, dropout): the adapter's own tensors
        self.sources: dict[int, tuple[torch.Tensor, torch.Tensor, float, float]] = {}

    def __len__(self) -> int:
        return len(self.sources)

    def add(self, slot: int, config: Any, tensors: Mapping[str, torch.Tensor], site_name: str) -> None:
        self.sources[slot] = (tensors["lora_A"], tensors["lora_B"], config.scale(site_name), config.dropout)

    def remove(self, slot: int) -> None:
        self.sources.pop(slot, None)

    def resize(self, capacity: int) -> None:
        self.capacity = capacity

    def refresh(self, slot: int) -> None:
        """Nothing to copy: the kernel reads each adapter's own tensors."""

    def apply(self, x: torch.Tensor, y: torch.Tensor, batch: Any, training: bool) -> torch.Tensor:
        """x: the conv's input [n, C_in, H, W]; y: its output [n, C_out, H', W']; returns y + the deltas."""
        if batch.mode == "token":
            raise ConfigError(f"per-token adapter ids reach a convolution ({self.site.name}): an image base takes "
                              "one adapter set per image (row mode)")
        if batch.mode == "row" and batch.n != x.shape[0]:
            raise ConfigError(f"adapter batch was built for {batch.n} rows but the convolution {self.site.name} got "
                              f"{x.shape[0]} images; build the batch with one entry per image")
        for slot, w in batch.slot_weights.items():         # w: [n, 1, 1] summed weight per unit
            src = self.sources.get(slot)
            if src is None:
                continue
            a, b, scale, p = src
            w = w.view(-1)
            if batch.mode == "all":                          # one unit: every image
                rows, xs, ws = None, x, w.expand(x.shape[0])
            else:
                rows = torch.nonzero(w).flatten()
                if rows.numel() == 0:
                    continue
                xs, ws = (x, w) if rows.numel() == x.shape[0] else (x.index_select(0, rows), w.index_select(0, rows))
            if training and p > 0:
                xs = F.dropout(xs, p=p, training=True)
            h = F.conv2d(xs.to(a.dtype), a, None, self.stride, self.padding)      # [m, r, H', W']
            delta = F.conv2d(h, b) * (ws.to(a.dtype) * scale).view(-1, 1, 1, 1)   # [m, C_out, H', W']
            delta = delta.to(y.dtype)
            if rows is None or rows.numel() == y.shape[0]:
                y = y + delta
            else:
                y = y.index_add(0, rows, delta)
        return y
