"""Sparse fine-tuning (Ansell et al. 2022, "Composable Sparse Fine-Tuning", LT-SFT): a few entries of
a Linear's weight change, ΔW[i] = v for i in a fixed index set, the rest 0.

Tensors per site: "indices" int64 [k] (flat, sorted, unique, into ΔW in LoRA's layout [d_out, d_in]:
i = row · d_in + column, for a GPT-2 Conv1D too), "values" float [k] (the only trainable tensor) and
"shape" int64 [2] = (d_out, d_in), so an adapter describes its ΔW without the base (merges need it).
Linear in the base weights: merged into the base exactly (W[i] += v), unmerged bit-exactly, and
composed by addition (a language SFT and a task SFT on one row sum their ΔW, as Composable SFT does).
Weight-space merges (merge/sparse.py) stay sparse and exact over the union of the supports.

The forward adds y[..., r] += Σ v · x[..., c] for the entries (r, c) of the rows routed to the
adapter: O(k) per token, no dense ΔW, one gather and one index_add per adapter in a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ..errors import BaseMismatchError, ConfigError, CorruptAdapterError
from .base import STAGE_DELTA, Method, SiteInfo, TensorKind, config_from_dict, config_to_dict, tuple_fields
from .kernels import HeldPool, routed


@dataclass(frozen=True)
class SparseConfig:
    target_modules: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj")
    exclude_modules: tuple[str, ...] | str | None = None
    # "empty": no entries (trained or made from a weight change); "random": a random init_density of
    # each weight with N(0, init_std) values (tests, benchmarks)
    init: str = "empty"
    init_density: float = 0.05
    init_std: float = 0.02
    type: ClassVar[str] = "sparse"

    def __post_init__(self) -> None:
        tuple_fields(self, "target_modules", "exclude_modules")
        if not self.target_modules:
            raise ConfigError("sparse target_modules is empty: name the weight matrices to fine-tune")
        if self.init not in ("empty", "random"):
            raise ConfigError(f"sparse init must be 'empty' or 'random', got {self.init!r}")
        if not 0.0 < self.init_density <= 1.0:
            raise ConfigError(f"sparse init_density must be in (0, 1], got {self.init_density}")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SparseConfig":
        return config_from_dict(cls, data, "sparse")


def to_dense(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """ΔW [d_out, d_in] float32 from a site's entries."""
    dense = torch.zeros(shape[0] * shape[1], dtype=torch.float32, device=values.device)
    dense[indices.to(values.device)] = values.float()
    return dense.view(shape)


def sparse_apply(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                 d_out: int) -> torch.Tensor:
    """x [..., d_in] -> x @ ΔWᵀ [..., d_out] for ΔW's entries (rows, cols, values) [k], in x's dtype."""
    contrib = x[..., cols] * values.to(x.dtype)                      # [..., k]
    out = torch.zeros(*x.shape[:-1], d_out, dtype=x.dtype, device=x.device)
    return out.index_add_(-1, rows, contrib)


class Sparse(Method):
    name = "sparse"
    title = "sparse"
    config_cls = SparseConfig
    stage = STAGE_DELTA
    delta_kind = "sparse"
    merge_ops = frozenset({"linear", "task_arithmetic", "ties"})

    def tensor_kinds(self, config: SparseConfig) -> dict[str, TensorKind]:
        return {"indices": TensorKind(torch.int64, trainable=False), "values": TensorKind(),
                "shape": TensorKind(torch.int64, trainable=False)}

    def tensor_shapes(self, config: SparseConfig, site: SiteInfo) -> dict[str, tuple[int, ...]]:
        return {"indices": (0,), "values": (0,), "shape": (2,)}    # k is the adapter's: see check_fit

    def init_tensors(self, config: SparseConfig, site: SiteInfo, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """No entries (a sparse adapter is made from a weight change, sparse_from_dense, or by training),
        or random ones (init "random")."""
        shape = torch.tensor([site.out_features, site.in_features])
        if config.init == "empty":
            return {"indices": torch.zeros(0, dtype=torch.int64), "values": torch.zeros(0), "shape": shape}
        size = site.out_features * site.in_features
        k = max(1, round(config.init_density * size))
        idx = torch.randperm(size, generator=gen)[:k].sort().values
        return {"indices": idx, "values": config.init_std * torch.randn(k, generator=gen), "shape": shape}

    def check_fit(self, config: SparseConfig, site: SiteInfo, tensors: Mapping[str, torch.Tensor],
                  adapter_name: str, module_name: str) -> None:
        if "shape" not in tensors or tensors["shape"].numel() != 2:
            return                                               # check_tensors names what is wrong
        shape = tuple(int(v) for v in tensors["shape"])
        if shape != (site.out_features, site.in_features):
            raise BaseMismatchError(f"adapter {adapter_name!r} does not fit this base at {module_name}: its sparse "
                                    f"weight change is {shape[0]}x{shape[1]}, the base's weight "
                                    f"{site.out_features}x{site.in_features}; it was made for another base model")

    def site_shape(self, config: SparseConfig, site: str, tensors: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
        return tuple(int(v) for v in tensors["shape"])

    def check_tensors(self, config: SparseConfig, site: str, tensors: Mapping[str, torch.Tensor], where: str) -> None:
        """Indices: int64, 1-D, non-negative, strictly increasing (so none repeats); values: as many."""
        super().check_tensors(config, site, tensors, where)
        idx, val, shape = tensors["indices"], tensors["values"], tensors["shape"]
        if idx.dim() != 1 or val.shape != idx.shape:
            raise CorruptAdapterError(f"{where}: {site} has indices {tuple(idx.shape)} and values {tuple(val.shape)}; "
                                      "a sparse adapter's are two vectors of one length: re-save the adapter")
        if tuple(shape.shape) != (2,) or int(shape.min()) < 1:
            raise CorruptAdapterError(f"{where}: {site}.shape is {shape.tolist()}; it is the weight's (d_out, d_in): "
                                      "re-save the adapter")
        size = int(shape[0]) * int(shape[1])
        if idx.numel() and int(idx.max()) >= size:
            raise CorruptAdapterError(f"{where}: {site}.indices reach {int(idx.max())}, beyond the {int(shape[0])}x"
                                      f"{int(shape[1])} = {size} entries of the weight: re-save the adapter")
        if idx.numel() and int(idx.min()) < 0:
            raise CorruptAdapterError(f"{where}: {site}.indices has a negative entry ({int(idx.min())}); indices "
                                      "are flat positions in the weight: re-save the adapter")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            dup = idx[1:][idx[1:] == idx[:-1]]
            what = f"repeats index {int(dup[0])}" if dup.numel() else "is not sorted"
            raise CorruptAdapterError(f"{where}: {site}.indices {what}; a sparse adapter's indices are sorted and "
                                      "unique (sparse_from_dense writes them so): re-save the adapter")

    def make_pool(self, site: SiteInfo, capacity: int) -> "SparsePool":
        return SparsePool(site)

    def reference(self, config: SparseConfig, site: SiteInfo, tensors: Mapping[str, torch.Tensor],
                  x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        delta = to_dense(tensors["indices"], tensors["values"].double(), (site.out_features, site.in_features))
        return y.double() + x.double() @ delta.double().t()            # (to_dense is float32: exact for fp32 values)

    # ------------------------------------------------------------------ weight space
    def delta_weight(self, config: SparseConfig, site: SiteInfo, tensors: Mapping[str, torch.Tensor],
                     base_weight: torch.Tensor | None = None) -> torch.Tensor:
        delta = to_dense(tensors["indices"], tensors["values"], (site.out_features, site.in_features))
        return delta.t() if site.fan_in_fan_out else delta

    def max_delta(self, config: SparseConfig, site_name: str, tensors: Mapping[str, torch.Tensor],
                  limit: float) -> float:
        v = tensors["values"]
        return float(v.double().abs().max()) if v.numel() else 0.0

    def summary(self, config: SparseConfig, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
        k = sum(int(p["indices"].numel()) for p in tensors.values())
        return f"sparse {k} entries on {len(tensors)} sites"


def sparse_from_dense(deltas: Mapping[str, torch.Tensor], *, k: int | None = None,
                      proportion: float | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """The K entries with the largest |ΔW| over all sites (one global threshold), as sparse tensors per
    site; K = k, or proportion of all entries. deltas: site -> ΔW [d_out, d_in] (LoRA's layout).
    Returns (tensors, the threshold). Sites left with no entry are dropped. Ties at the threshold are
    broken by position (the first ones kept), so exactly K entries are kept."""
    total = sum(d.numel() for d in deltas.values())
    if (k is None) == (proportion is None):
        raise ConfigError("give the number of entries to keep (k) or their proportion, not both")
    if k is None:
        if not 0.0 < proportion <= 1.0:
            raise ConfigError(f"the proportion of entries to keep must be in (0, 1], got {proportion}")
        k = max(1, round(proportion * total))
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= total:
        raise ConfigError(f"the number of entries to keep must be between 1 and {total}, got {k!r}")
    flat = torch.cat([d.detach().float().abs().reshape(-1) for d in deltas.values()])
    keep = torch.zeros(total, dtype=torch.bool)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    threshold = float(flat[keep].min())
    out, start = {}, 0
    for site, d in deltas.items():
        n = d.numel()
        idx = torch.nonzero(keep[start:start + n]).flatten()          # sorted and unique
        start += n
        if idx.numel():
            out[site] = {"indices": idx.to(torch.int64), "values": d.detach().float().reshape(-1)[idx].clone(),
                         "shape": torch.tensor(list(d.shape))}
    return out, threshold


class SparsePool(HeldPool):
    """All sparse adapters at one Linear, by slot. `held`: each adapter's own (rows, cols, values), read
    by the dense kernel (gradients reach the values). For the other kernels every adapter's entries are
    also laid end to end (cat_*) with each slot's start and count, so a step gathers the entries of every
    unit's adapter at once: a handful of tensor ops per site whatever the number of adapters."""

    def hold(self, config: Any, tensors: Mapping[str, torch.Tensor]) -> tuple:
        idx = tensors["indices"]             # rows and columns of the entries, once (int64 on the base's device)
        return idx // self.site.in_features, idx % self.site.in_features, tensors["values"]

    def rebuild(self) -> None:
        """cat_rows / cat_cols / cat_vals [E] and per slot start / count [max slot + 1] (0 for no adapter)."""
        slots = sorted(self.held)
        size = (max(slots) if slots else 0) + 1
        device = self.site.device
        self.start = torch.zeros(size, dtype=torch.int64, device=device)
        self.count = torch.zeros(size, dtype=torch.int64, device=device)
        parts, offset = [], 0
        for slot in slots:
            rows, cols, vals = self.held[slot]
            self.start[slot], self.count[slot] = offset, rows.numel()
            offset += rows.numel()
            parts.append((rows, cols, vals.detach()))
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        self.cat_rows = torch.cat([p[0] for p in parts]) if parts else empty
        self.cat_cols = torch.cat([p[1] for p in parts]) if parts else empty
        self.cat_vals = torch.cat([p[2].to(self.site.dtype) for p in parts]) if parts else empty.to(self.site.dtype)

    def apply(self, x: torch.Tensor, y: torch.Tensor, batch: Any, training: bool) -> torch.Tensor:
        x3, y3 = batch.view_input(x), batch.view_input(y)                 # [n, L, d_in], [n, L, d_out]
        d_out = self.site.out_features
        if batch.kernel == "dense":                     # training: the live values, masked per unit
            return routed(batch, self.held, lambda held, t: sparse_apply(t, *held, d_out), x3, y3).reshape(y.shape)
        self.ensure()
        n, length = x3.shape[0], x3.shape[1]
        out = xt = None
        for idx, w in zip(*batch.gather_plan):          # each unit's slot [n] at this adapter position
            idx = torch.where(idx < self.count.numel(), idx, torch.zeros_like(idx))   # past our slots: nothing here
            counts = self.count[idx]                                       # [n] entries of each unit's adapter
            total = int(counts.sum())
            if total == 0:
                continue
            unit = torch.repeat_interleave(torch.arange(n, device=counts.device), counts)      # [E]
            # entry e of unit u sits at start[slot_u] + (e - first e of u) in the laid-out entries
            shift = self.start[idx] - (torch.cumsum(counts, 0) - counts)        # [n]
            entry = torch.arange(total, device=counts.device) + shift[unit]
            rows, cols, vals = self.cat_rows[entry], self.cat_cols[entry], self.cat_vals[entry].to(x3.dtype)
            if w is not None:
                vals = vals * w.reshape(-1)[unit].to(x3.dtype)
            if xt is None:                                                  # [n·d_in, L]: row u·d_in + c = x3[u, :, c]
                xt = x3.transpose(1, 2).reshape(n * self.site.in_features, length)
            contrib = xt.index_select(0, unit * self.site.in_features + cols) * vals[:, None]     # [E, L]
            # flat positions in out [n, L, d_out]: ((unit · L) + l) · d_out + row, for every token l
            at = (unit[:, None] * length + torch.arange(length, device=unit.device)) * d_out + rows[:, None]
            out = y3.clone() if out is None else out                        # contiguous, as y3 is
            out.view(-1).index_add_(0, at.reshape(-1), contrib.reshape(-1))
        return y if out is None else out.reshape(y.shape)


SPARSE = Sparse()
