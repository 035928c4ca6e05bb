"""LoRA's site pool: many LoRA adapters at one site, applied to a mixed batch by the kernel the
batch's metadata picked (dense: autograd through each adapter's own tensors; gather / segment:
stacked, rank-padded, scale-folded copies per slot)."""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping

import torch
from torch import nn

from .base import SiteInfo
from .kernels import (UnitPlan, covers_every_unit, dense_kernel, gather_kernel, segment_kernel, span_kernel, span_of,
                      unit_plan)


class LoraPool:
    """All LoRA adapters at one site. Slot tensors: A [S+1, d_in, R], B [S+1, R, d_out], row 0 zero."""

    def __init__(self, site: SiteInfo, capacity: int) -> None:
        self.site = site
        self.rank = 0                      # R: max rank of the adapters held (stacks are padded to it)
        self.capacity = capacity
        # slot -> (A [r, d_in], B [d_out, r], scale, dropout): the adapter's own tensors.
        self.sources: dict[int, tuple[torch.Tensor, torch.Tensor, float, float]] = {}
        self.a_stack = torch.zeros(capacity + 1, site.in_features, 0, dtype=site.dtype, device=site.device)
        self.b_stack = torch.zeros(capacity + 1, 0, site.out_features, dtype=site.dtype, device=site.device)

    def __len__(self) -> int:
        return len(self.sources)

    def add(self, slot: int, config: Any, tensors: Mapping[str, torch.Tensor], site_name: str) -> None:
        a, b = tensors["lora_A"], tensors["lora_B"]
        self.sources[slot] = (a, b, config.scale(site_name), config.dropout)
        if a.shape[0] > self.rank:
            self._restack(a.shape[0], self.capacity)
        self.refresh(slot)

    def remove(self, slot: int) -> None:
        self.sources.pop(slot, None)
        self.a_stack[slot].zero_()
        self.b_stack[slot].zero_()

    def resize(self, capacity: int) -> None:
        if capacity != self.capacity:
            self._restack(self.rank, capacity)

    def refresh(self, slot: int) -> None:
        """Copy a slot's own tensors (maybe just trained) into the stacks, scale folded into B."""
        a, b, scale, _ = self.sources[slot]
        r = a.shape[0]
        # select/narrow, not [slot, :, :r]: a cold attach runs this at every site (Python indexing ~10 us each)
        a_dst, b_dst = self.a_stack.select(0, slot), self.b_stack.select(0, slot)
        with torch.no_grad():
            if r < self.rank:                     # the padding ranks must read zero (a full rank overwrites all)
                a_dst.zero_()
                b_dst.zero_()
                a_dst, b_dst = a_dst.narrow(1, 0, r), b_dst.narrow(0, 0, r)
            a_dst.copy_(a.t())
            if b.dtype == b_dst.dtype:            # one op: the copy with the scale folded
                torch.mul(b.t(), scale, out=b_dst)
            else:                                 # fp32 master weights on a low-precision base: scale after the cast
                b_dst.copy_(b.t()).mul_(scale)

    def _restack(self, rank: int, capacity: int) -> None:
        self.rank, self.capacity = rank, capacity
        self.a_stack = torch.zeros(capacity + 1, self.site.in_features, rank, dtype=self.site.dtype,
                                   device=self.site.device)
        self.b_stack = torch.zeros(capacity + 1, rank, self.site.out_features, dtype=self.site.dtype,
                                   device=self.site.device)
        for slot in self.sources:
            self.refresh(slot)

    def apply(self, x: torch.Tensor, y: torch.Tensor, batch: Any, training: bool) -> torch.Tensor:
        """x: module input [..., d_in]; y: base output [..., d_out]; returns y + this site's deltas."""
        x3, y3 = batch.view_input(x), batch.view_input(y)
        if batch.kernel == "dense":
            terms = []
            for slot, w in batch.dense_w.items():
                src = self.sources.get(slot)
                if src is None:
                    continue
                a, b, scale, p = src
                # Dropout is per adapter (PEFT: lora_B(lora_A(dropout(x)))), training only.
                pre = partial(nn.functional.dropout, p=p, training=True) if training and p > 0 else None
                terms.append((a, b, w * scale, pre))
            if not terms:
                return y
            y3 = dense_kernel(x3, y3, terms)
        elif batch.kernel == "gather":
            plan = unit_plan(batch, self.sources)
            if plan is None:
                return y
            span = span_of(batch, plan, x3.shape[1])
            if span is not None:         # the step's slots lie close together: read the stacks as a view
                y3 = span_kernel(x3, y3, self.a_stack, self.b_stack, plan, span)
            elif covers_every_unit(batch, self.sources):
                y3 = gather_kernel(x3, y3, self.a_stack, self.b_stack, batch.gather_idx, batch.gather_w)
            else:               # the units with a LoRA adapter here only: base rows, other families' rows skip
                idx, ws = _own_units(batch, plan)
                xs = x3.index_select(0, plan.units)                                   # [r, L, d_in]
                ys = gather_kernel(xs, xs.new_zeros(xs.shape[:-1] + y3.shape[-1:]), self.a_stack, self.b_stack,
                                   idx, ws)
                y3 = y3.index_put_((plan.units,), ys, accumulate=True)
        elif batch.kernel == "segment":
            y3 = segment_kernel(x3, y3, self.a_stack, self.b_stack, batch.order, batch.bounds,
                                batch.seg_slots, batch.seg_w)
        return y3.view(y.shape)


def _own_units(batch: Any, plan: UnitPlan) -> tuple[tuple, tuple]:
    """The gather kernel's (slot ids, weights) per position of the units in plan.units only (once per
    step and set of LoRA slots, shared by the sites)."""
    key = ("lora units", plan.slots)
    if key not in batch.memo:
        batch.memo[key] = (tuple(i.index_select(0, plan.units) for i in batch.gather_idx),
                           tuple(None if w is None else w.index_select(0, plan.units) for w in batch.gather_w))
    return batch.memo[key]
