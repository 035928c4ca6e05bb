"""AdapterBatch: the per-step routing metadata, computed ONCE per forward and read by every site.

Slots are small integers the runtime gives attached adapters; slot 0 means "no adapter". A batch
assigns up to K (slot, weight) pairs to each unit, where a unit is a sequence ("row" mode: every
token of the row uses the same adapters), a token ("token" mode: packed batches, per-token
routing), or everything ("all" mode: one adapter set broadcast over any batch, as in training).
Building the batch also picks the kernel and precomputes what that kernel needs, so the per-site
work is only tensor ops. All functions here are pure.

Devices: the plan is computed on the host (it needs Python values: distinct slots, segment bounds),
so ids / weights stay there; the tensors the kernels read (dense_w, gather_idx, gather_w, order,
seg_w) are moved once per step to `device`, the model's, so no site copies anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..errors import ConfigError

MODES = ("row", "token", "all")
KERNELS = ("auto", "dense", "gather", "segment")

# Measured on SmolLM2-135M, B=32 (benchmarks/mixed_batch.py --kernels): the masked dense loop is
# fastest up to this many distinct adapters; past it the gathered bmm wins.
DENSE_MAX_ADAPTERS = 2
# Per-row ids: the gathered bmm is as fast as or faster than the segment loop for decode and for
# prefill (it reads x and y once; segments copy x), so rows never use segments. Per-token ids: a
# gather copies adapter weights per token, so the segment loop wins once segments average this
# many tokens (decode-sized mixes cross over between 4 and 8 rows per adapter).
SEGMENT_MIN_TOKENS = 8


@dataclass(frozen=True)
class AdapterBatch:
    mode: str                         # "row" | "token" | "all"
    n: int                            # units: rows (row), tokens (token), 1 (all)
    ids: torch.Tensor                 # [n, K] long: slot per unit and position, 0 = none (host)
    weights: torch.Tensor             # [n, K] float: weight of each slot (0 where ids == 0) (host)
    unique: tuple[int, ...]           # sorted distinct slots > 0 in the batch
    kernel: str                       # "none" | "dense" | "gather" | "segment"
    # dense: slot -> [n, 1, 1] summed weight of that slot on each unit
    dense_w: dict[int, torch.Tensor] = field(default_factory=dict)
    # gather: per position k, the slot of every unit [n] and its weight [n, 1, 1] (None if all 1)
    gather_idx: tuple[torch.Tensor, ...] = ()
    gather_w: tuple[torch.Tensor | None, ...] = ()
    # segment (K == 1): units with an adapter sorted by slot; segment j is order[bounds[j]:bounds[j+1]]
    order: torch.Tensor | None = None           # [m] long, m = units with a slot > 0
    bounds: tuple[int, ...] = ()                # len(seg_slots) + 1 offsets into order
    seg_slots: tuple[int, ...] = ()             # slot of each segment
    seg_w: torch.Tensor | None = None           # [m, 1, 1] weights in sorted order (None if all 1)
    dtype: torch.dtype = torch.float32          # of the weight tensors the kernels read
    device: torch.device | str = "cpu"          # where they are
    # what a family derives from the plan once per step for all its sites (methods/kernels.unit_plan)
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    # The kernel above was picked for low-rank deltas; a family whose cost differs picks its own from
    # these views of the same plan, each computed at most once per step (on first use by any site).
    @cached_property
    def slot_weights(self) -> dict[int, torch.Tensor]:
        """slot -> [n, 1, 1] summed weight of that slot on each unit (the dense kernel's dense_w)."""
        return self.dense_w if self.dense_w else _dense_weights(self.ids, self.weights, self.unique, self.dtype,
                                                               self.device)

    @cached_property
    def gather_plan(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
        """(gather_idx, gather_w): per position k, each unit's slot [n] and weight [n, 1, 1] or None."""
        if self.kernel == "gather":
            return self.gather_idx, self.gather_w
        return _gather_plan(self.ids, self.weights, self.dtype, self.device)

    def view_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> [n, L, d] so weights [n, 1, 1] broadcast (n = rows, tokens or 1)."""
        if self.mode == "row":
            if x.dim() < 2 or x.shape[0] != self.n:
                raise ConfigError(
                    f"adapter batch was built for {self.n} rows but a module got input of shape "
                    f"{tuple(x.shape)}; build the batch with one entry per row of the model input"
                )
            return x.reshape(self.n, -1, x.shape[-1])
        if self.mode == "token":
            tokens = x.numel() // x.shape[-1]
            if tokens != self.n:
                raise ConfigError(
                    f"adapter batch was built for {self.n} tokens but a module got "
                    f"{tokens} (input shape {tuple(x.shape)}); give one adapter id per token"
                )
            return x.reshape(self.n, 1, x.shape[-1])
        return x.reshape(1, -1, x.shape[-1])


def build_batch(
    ids: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    mode: str = "row",
    kernel: str = "auto",
    needs_grad: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    dense_max: int = DENSE_MAX_ADAPTERS,
    segment_min_tokens: int = SEGMENT_MIN_TOKENS,
) -> AdapterBatch:
    """Metadata for one step. ids: [n] or [n, K] slots (0 = none); weights like ids or None (1.0).

    needs_grad forces the dense kernel: it is the only one that reads the adapters' own tensors
    (the others read stacked copies) and so the only one gradients flow through.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown batch mode {mode!r}; use one of {MODES}")
    if kernel not in KERNELS:
        raise ConfigError(f"unknown kernel {kernel!r}; use one of {KERNELS}")
    ids = torch.as_tensor(ids, dtype=torch.long, device="cpu")            # the plan is made on the host
    if ids.dim() == 1:
        ids = ids[:, None]
    if ids.dim() != 2:
        raise ConfigError(f"adapter ids must have shape [n] or [n, K], got {tuple(ids.shape)}")
    if weights is None:
        weights = (ids > 0).to(torch.float32)
    else:
        weights = torch.as_tensor(weights, dtype=torch.float32, device="cpu")
        if weights.dim() == 1:
            weights = weights[:, None]
        if weights.shape != ids.shape:
            raise ConfigError(f"adapter weights {tuple(weights.shape)} must match ids {tuple(ids.shape)}")
        if not torch.isfinite(weights).all():
            raise ConfigError("adapter weights must be finite numbers")
        weights = torch.where(ids > 0, weights, torch.zeros_like(weights))
    if (ids < 0).any():
        raise ConfigError("internal slot ids must be >= 0 (0 = no adapter)")
    if mode == "all" and ids.shape[0] != 1:
        raise ConfigError("mode 'all' takes exactly one unit of adapter ids")
    n, k = ids.shape
    unique = tuple(sorted(set(ids[ids > 0].tolist())))
    common = dict(mode=mode, n=n, ids=ids, weights=weights, unique=unique, dtype=dtype, device=device)
    if not unique:
        return AdapterBatch(kernel="none", **common)

    chosen = kernel
    if chosen == "auto":
        if needs_grad or mode == "all" or len(unique) <= dense_max:
            chosen = "dense"
        elif mode == "token" and k == 1 and n / len(unique) >= segment_min_tokens:
            chosen = "segment"
        else:
            chosen = "gather"
    if needs_grad and chosen != "dense":
        raise ConfigError(f"kernel {chosen!r} reads stacked copies; gradients need kernel 'dense'")
    if chosen == "dense":
        return AdapterBatch(kernel="dense", dense_w=_dense_weights(ids, weights, unique, dtype, device), **common)
    if mode == "all":
        raise ConfigError(f"kernel {chosen!r} needs per-row or per-token ids; mode 'all' uses 'dense'")
    if chosen == "gather":
        idx, ws = _gather_plan(ids, weights, dtype, device)
        return AdapterBatch(kernel="gather", gather_idx=idx, gather_w=ws, **common)
    if k != 1:
        raise ConfigError("kernel 'segment' takes one adapter per unit (K == 1); use 'gather' or 'dense'")
    order, bounds, slots, seg_w = _segment_plan(ids[:, 0], weights[:, 0], dtype, device)
    return AdapterBatch(kernel="segment", order=order, bounds=bounds, seg_slots=slots, seg_w=seg_w, **common)


def _dense_weights(ids, weights, unique, dtype, device) -> dict[int, torch.Tensor]:
    out = {}
    for slot in unique:
        w = (weights * (ids == slot)).sum(dim=1)          # [n]
        out[slot] = w.to(device=device, dtype=dtype).view(-1, 1, 1)
    return out


def _gather_plan(ids, weights, dtype, device):
    idx, ws = [], []
    for j in range(ids.shape[1]):
        col_ids, col_w = ids[:, j], weights[:, j]
        if not (col_ids > 0).any():
            continue
        idx.append(col_ids.to(device).contiguous())
        # Units without an adapter read slot 0 (all zeros), so only real weights need multiplying.
        unit = bool(((col_w == 1) | (col_ids == 0)).all())
        ws.append(None if unit else col_w.to(device=device, dtype=dtype).view(-1, 1, 1))
    return tuple(idx), tuple(ws)


def _segment_plan(ids, weights, dtype, device):
    active = torch.nonzero(ids > 0).flatten()
    sorted_ids, perm = torch.sort(ids[active], stable=True)
    order = active[perm]
    slots, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    bounds = (0, *torch.cumsum(counts, 0).tolist())
    w = weights[order]
    seg_w = None if bool((w == 1).all()) else w.to(device=device, dtype=dtype).view(-1, 1, 1)
    return order.to(device), tuple(bounds), tuple(slots.tolist()), seg_w
