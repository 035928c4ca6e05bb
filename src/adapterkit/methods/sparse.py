"""Sparse fine-tuning (Ansell et al. 2022, "Composable Sparse Fine-Tuning", LT-SFT): a few entries of
a Linear's weight change, ΔW[i] = v for i in a fixed index set, the rest 0.

Tensors per site: "indices" int64 [k] (flat, sorted, unique, into ΔW in LoRA's layout [d_out, d_in]:
i = row · d_in + column, for a GPT-2 Conv1D too), "values" float [k] (the only trainable tensor) and
"shape" int64 [2] = (d_out, d_in), so an adapter describes its ΔW without the base (merges need it).
Linear in the base weights: merged into the base exactly (W[i] += v), unmerged bit-exactly, and
composed by addition (a language SFT and a task SFT on one row sum their ΔW, as Composable SFT does).
Weight-space merges (merge/sparse.py) stay sparse and exact over the union of the supports.

The forward adds y[..., r] += Σ v · x[..., c] for the entries (r, c) of the rows routed to the
adapter: O(k) per token, no dense ΔW; serving runs CSR sparse mm's (SparsePool).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ..errors import BaseMismatchError, ConfigError, CorruptAdapterError
from .base import STAGE_DELTA, Method, SiteInfo, TensorKind, config_from_dict, config_to_dict, tuple_fields
from .kernels import (STACKS_KEPT, HeldPool, add_columns, block_diagonal_is_cheaper, column_inputs, columns, routed,
                      unit_plan)


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


# Training's product (one adapter's entries on all rows) lays ΔW out dense and runs one matmul when its
# entries are at least this share of the matrix: forward + backward on one CPU thread, 640 rows, SmolLM2's
# four matrix shapes (benchmarks/sparse_train_kernel.py, results/sparse_train_kernel.json), the gathers
# cost 0.2-0.3x the matmul at 0.1 %, 1.0-1.35x at 0.5 %, 1.9-2.9x at 1 % (LT-SFT's default) and 6-12x at
# 3 %. The dense ΔW it keeps for backward is the matrix's size (what the dense phase holds too).
DENSE_FROM = 0.005


def sparse_apply(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                 d_out: int) -> torch.Tensor:
    """x [..., d_in] -> x @ ΔWᵀ [..., d_out] for ΔW's entries (rows, cols, values) [k], in x's dtype;
    differentiable in x and values."""
    d_in = x.shape[-1]
    if values.numel() >= DENSE_FROM * d_in * d_out:         # one matmul beats k gathers per row
        flat = torch.zeros(d_out * d_in, dtype=x.dtype, device=x.device)
        delta = flat.index_put((rows * d_in + cols,), values.to(x.dtype)).view(d_out, d_in)
        return torch.nn.functional.linear(x, delta)
    x2 = x.reshape(-1, d_in)
    return _SparseApply.apply(x2, rows, cols, values.to(x.dtype), d_out).view(*x.shape[:-1], d_out)


# entries x rows of one gather in _scatter (16 M floats): bounds what one site's product holds at once
_CHUNK = 1 << 24


def _rows_per_chunk(k: int) -> int:
    return max(1, _CHUNK // max(1, k))


def _scatter(src: torch.Tensor, out_idx: torch.Tensor, in_idx: torch.Tensor, values: torch.Tensor,
             width: int) -> torch.Tensor:
    """out [N, width] with out[:, out_idx[j]] += src[:, in_idx[j]] · values[j], a chunk of rows at a time."""
    out = torch.zeros(src.shape[0], width, dtype=src.dtype, device=src.device)
    step = _rows_per_chunk(values.numel())
    for s in range(0, src.shape[0], step):
        out[s:s + step].index_add_(1, out_idx, src[s:s + step, in_idx] * values)
    return out


class _SparseApply(torch.autograd.Function):
    """x2 [N, d_in] @ ΔWᵀ. Plain autograd through x[:, cols] * values would keep that [N, k] product per
    site until backward: N x k x 4 bytes summed over the sites, ~8.7 GB at batch 16 x 128 tokens and
    1 % of SmolLM2-135M's matrices (k = 1.06 M in all; an LT-SFT run was OOM-killed at 13 GB). This saves x2 (and the entries) only, and recomputes the
    gathers in backward, one site and one chunk at a time."""

    @staticmethod
    def forward(ctx, x2, rows, cols, values, d_out):
        ctx.save_for_backward(x2, rows, cols, values)
        return _scatter(x2, rows, cols, values, d_out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2, rows, cols, values = ctx.saved_tensors
        grad = grad.contiguous()
        gx = _scatter(grad, cols, rows, values, x2.shape[1]) if ctx.needs_input_grad[0] else None   # grad @ ΔW
        gv = None
        if ctx.needs_input_grad[3]:                 # dL/dv_j = Σ_n grad[n, r_j] · x2[n, c_j]
            gv = torch.zeros_like(values)
            step = _rows_per_chunk(values.numel())
            for s in range(0, x2.shape[0], step):
                gv += (grad[s:s + step, rows] * x2[s:s + step, cols]).sum(0)
        return gx, None, None, gv, None


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


def csr(crow: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from parts already valid (sorted, in range: check_tensors saw to it), without
    torch's per-build invariant checks and its "beta" warning in every server log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, vals, shape, check_invariants=False)


CHOICES_KEPT = 1024    # cost-rule answers memoised per pool (prefill lengths vary: bounded, then forgotten)


class SparsePool(HeldPool):
    """All sparse adapters at one Linear, by slot. `held`: each adapter's own (rows, cols, values), read
    by the dense kernel (training: gradients reach the values). The other kernels read each adapter's
    ΔW as a CSR matrix [d_out, d_in] (float32 values, or float64 on a float64 base), built once when the
    pool changes, and run the step either as one sparse product of the step's m adapters laid
    block-diagonally [m·d_out, m·d_in], each adapter's block on its own units only (decode: one call per
    site, no other adapter's work), or as one sparse mm per adapter on its own units (prefill with
    uneven units per adapter), whichever methods/kernels.block_diagonal_is_cheaper picks."""

    DERIVED = ("csr", "single", "_stacked", "nnz", "_choice")
    # one more sparse mm call costs about 50 us on this CPU (the mixed decode step of benchmarks/methods_decode.py
    # per extra call), as many as ~75k multiply-adds of torch's CPU CSR kernel (~1.5 GMAC/s)
    CALL_COST = 100_000

    def hold(self, config: Any, tensors: Mapping[str, torch.Tensor]) -> tuple:
        idx = tensors["indices"]             # rows and columns of the entries, once (int64 on the base's device)
        return idx // self.site.in_features, idx % self.site.in_features, tensors["values"]

    def rebuild(self) -> None:
        """csr[slot]: (crow [d_out + 1], col [k], val [k]) of each adapter's ΔW; stacks of slot sets are
        derived on use (cached until the pool changes)."""
        d_out = self.site.out_features
        self.vdtype = torch.float64 if self.site.dtype == torch.float64 else torch.float32
        self.csr, self.single, self._stacked, self.nnz, self._choice = {}, {}, {}, {}, {}
        for slot, (rows, cols, vals) in self.held.items():
            self.nnz[slot] = int(rows.numel())
            counts = torch.bincount(rows, minlength=d_out)           # rows ascend: the entries are row-major
            crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
            self.csr[slot] = (crow, cols, vals.detach().to(self.vdtype))
            self.single[slot] = csr(*self.csr[slot], (d_out, self.site.in_features))

    def stacked(self, slots: tuple[int, ...]) -> torch.Tensor:
        """The ΔW of `slots` laid block-diagonally: CSR [m · d_out, m · d_in], the b-th adapter's block
        at rows and columns b · d_out.., b · d_in.. (as many entries as the m adapters have together)."""
        if slots not in self._stacked:
            crows, offset = [], 0
            for slot in slots:
                crows.append(self.csr[slot][0][:-1] + offset)
                offset += self.nnz[slot]
            crow = torch.cat(crows + [crows[0].new_tensor([offset])])
            cols = torch.cat([self.csr[s][1] + b * self.site.in_features for b, s in enumerate(slots)])
            vals = torch.cat([self.csr[s][2] for s in slots])
            shape = (len(slots) * self.site.out_features, len(slots) * self.site.in_features)
            if max(offset, *shape) < 2**31:             # int32 indices: less index traffic for torch's CSR kernels
                crow, cols = crow.int(), cols.int()
            if len(self._stacked) >= STACKS_KEPT:
                del self._stacked[next(iter(self._stacked))]          # the oldest set
            self._stacked[slots] = csr(crow, cols, vals, shape)
        return self._stacked[slots]

    def apply(self, x: torch.Tensor, y: torch.Tensor, batch: Any, training: bool) -> torch.Tensor:
        x3, y3 = batch.view_input(x), batch.view_input(y)                 # [n, L, d_in], [n, L, d_out]
        d_in, d_out = self.site.in_features, self.site.out_features
        if batch.kernel == "dense":                     # training: the live values, masked per unit
            return routed(batch, self.held, lambda held, t: sparse_apply(t, *held, d_out), x3, y3).reshape(y.shape)
        plan = unit_plan(batch, self.held)
        if plan is None:
            return y
        self.ensure()
        length = x3.shape[1]
        # serving adds into the Linear's fresh output in place (as the LoRA kernels do)
        out = y3 if not torch.is_grad_enabled() and y3.is_contiguous() else y3.clone()
        choice = (plan.slots, plan.counts, length)
        if choice not in self._choice:                # the cost rule, once per set of adapters and counts
            if len(self._choice) >= CHOICES_KEPT:
                self._choice.clear()
            work = [self.nnz[s] for s in plan.slots]                         # entries: multiply-adds per token
            self._choice[choice] = block_diagonal_is_cheaper(plan, length, work, self.CALL_COST)
        if self._choice[choice]:
            m, lay = len(plan.slots), columns(batch, plan)
            xcol = column_inputs(x3, plan, lay, self.vdtype)                     # [m · c_max, L, d_in]
            mat = self.stacked(plan.slots)
            if lay.most * length == 1:                  # decode, one unit per adapter: a sparse mat-vec
                ys = torch.mv(mat, xcol.view(m * d_in)).view(m, 1, d_out)
            else:                                       # columns laid [m, d_in, c_max, L] for the sparse mm
                xm = xcol.view(m, lay.most, length, d_in).permute(0, 3, 1, 2).reshape(m * d_in, lay.most * length)
                ys = (mat @ xm).view(m, d_out, lay.most, length).permute(0, 2, 3, 1).reshape(-1, length, d_out)
            return add_columns(out, ys, plan, lay).reshape(y.shape)
        xs = x3.index_select(0, plan.units).to(self.vdtype)                 # [r, L, d_in]
        for slot, (local, w) in zip(plan.slots, plan.groups):
            xg = xs.index_select(0, local)
            term = (self.single[slot] @ xg.reshape(-1, d_in).t()).t().reshape(xg.shape[0], length, d_out)
            term = term if w is None else term * w.to(term.dtype)
            out.index_add_(0, plan.units.index_select(0, local), term.to(out.dtype))
        return out.reshape(y.shape)


SPARSE = Sparse()
