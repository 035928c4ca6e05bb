"""LoRA's site pool at a Conv2d, as PEFT defines it: lora_A a conv of the base's kernel, stride and
padding [r, C_in, kh, kw], lora_B a 1x1 conv [C_out, r, 1, 1]; the delta is scale · B(A(x)).

Units are images (row mode: each image its own adapters; "all": one set for the batch). Two kernels:
  per adapter  each adapter of the step runs on the images that use it (index_select, two convolutions,
               index_add), reading its own tensors: training (autograd), the dense kernel's few-adapter
               steps, and any kernel size;
  gathered     a 1x1 conv in a mixed batch (the batch's gather / segment kernels): every image's A and B
               gathered from slot stacks (row 0 zero, ranks padded, scale folded into B) and applied as two
               batched matmuls over the pixels, y[i] += w_i · B[s_i] @ A[s_i] @ x[i] (BGMV over H·W), with
               no copy of the activations per adapter.
"""

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
        (kh, kw), self.stride, self.padding = site.conv
        self.pointwise = (kh, kw) == (1, 1) and tuple(self.stride) == (1, 1) and tuple(self.padding) == (0, 0)
        # slot -> (A [r, C_in, kh, kw], B [C_out, r, 1, 1], scale, dropout): the adapter's own tensors
        self.sources: dict[int, tuple[torch.Tensor, torch.Tensor, float, float]] = {}
        self.rank = 0                      # R: the stacks' rank (the largest held), pointwise sites only
        self.a_stack = torch.zeros(capacity + 1, 0, site.in_features, dtype=site.dtype, device=site.device)
        self.b_stack = torch.zeros(capacity + 1, site.out_features, 0, dtype=site.dtype, device=site.device)

    def __len__(self) -> int:
        return len(self.sources)

    def add(self, slot: int, config: Any, tensors: Mapping[str, torch.Tensor], site_name: str) -> None:
        a, b = tensors["lora_A"], tensors["lora_B"]
        self.sources[slot] = (a, b, config.scale(site_name), config.dropout)
        if self.pointwise:
            if a.shape[0] > self.rank:
                self._restack(a.shape[0], self.capacity)
            self.refresh(slot)

    def remove(self, slot: int) -> None:
        self.sources.pop(slot, None)
        if self.pointwise:                  # the gathered kernel reads every row's slot: a freed one reads zero
            self.a_stack[slot].zero_()
            self.b_stack[slot].zero_()

    def resize(self, capacity: int) -> None:
        if capacity != self.capacity and self.pointwise:
            self._restack(self.rank, capacity)
        self.capacity = capacity

    def refresh(self, slot: int) -> None:
        """Copy a slot's own tensors (maybe just trained) into the stacks, scale folded into B."""
        if not self.pointwise:
            return
        a, b, scale, _ = self.sources[slot]
        r = a.shape[0]
        with torch.no_grad():
            self.a_stack[slot].zero_()
            self.b_stack[slot].zero_()
            self.a_stack[slot, :r].copy_(a.reshape(r, -1))
            self.b_stack[slot, :, :r].copy_(b.reshape(b.shape[0], r)).mul_(scale)

    def _restack(self, rank: int, capacity: int) -> None:
        self.rank, self.capacity = rank, capacity
        self.a_stack = torch.zeros(capacity + 1, rank, self.site.in_features, dtype=self.site.dtype,
                                   device=self.site.device)
        self.b_stack = torch.zeros(capacity + 1, self.site.out_features, rank, dtype=self.site.dtype,
                                   device=self.site.device)
        for slot in self.sources:
            self.refresh(slot)

    def apply(self, x: torch.Tensor, y: torch.Tensor, batch: Any, training: bool) -> torch.Tensor:
        """x: the conv's input [n, C_in, H, W]; y: its output [n, C_out, H', W']; returns y + the deltas."""
        if batch.mode == "token":
            raise ConfigError(f"per-token adapter ids reach a convolution ({self.site.name}): an image base takes "
                              "one adapter set per image (row mode)")
        if batch.mode == "row" and batch.n != x.shape[0]:
            raise ConfigError(f"adapter batch was built for {batch.n} rows but the convolution {self.site.name} got "
                              f"{x.shape[0]} images; build the batch with one entry per image")
        if self.pointwise and batch.kernel in ("gather", "segment"):
            return self._gathered(x, y, batch)
        return self._per_adapter(x, y, batch, training)

    def _gathered(self, x: torch.Tensor, y: torch.Tensor, batch: Any) -> torch.Tensor:
        n, c_in, h, w = x.shape
        y = y.contiguous()                                  # (a conv's output already is: then a no-op)
        x3 = x.reshape(n, c_in, h * w).to(self.a_stack.dtype)                      # [n, C_in, HW]
        y3 = y.view(n, y.shape[1], h * w)                                           # [n, C_out, HW], y's memory
        for ids, weight in zip(*batch.gather_plan):
            hidden = torch.bmm(self.a_stack.index_select(0, ids), x3)              # [n, R, HW]
            if weight is not None:
                hidden.mul_(weight.view(-1, 1, 1))
            y3.baddbmm_(self.b_stack.index_select(0, ids), hidden.to(y3.dtype))    # += [n, C_out, HW]
        return y

    def _per_adapter(self, x: torch.Tensor, y: torch.Tensor, batch: Any, training: bool) -> torch.Tensor:
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
