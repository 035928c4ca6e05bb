"""Weight-space merges of sparse adapters, sparse and exact: every input's entries are laid out over
the union of the inputs' supports at a site (an input without an entry counts as 0 there, as a dense
merge counts it), merged there, and entries that merge to exactly 0 are dropped. No SVD, no dense ΔW.
  linear / task_arithmetic   λ Σ w_i v_i (linear: λ = 1, `normalize` divides the weights by their sum)
  ties                       merge/ties.py's trim, sign election and disjoint mean: each input keeps
                             its k = max(1, floor(density · d_out · d_in)) largest |entries| (per
                             matrix, as the dense TIES does), so the result equals the dense TIES
                             of the same ΔW's entry for entry.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..core.adapter import Adapter, AdapterMeta
from ..errors import ConfigError
from ..methods.sparse import SparseConfig
from .ties import elect_and_merge


def _union(adapters: Sequence[Adapter], site: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """(union indices [m], values [n_present, m] float32 with zeros where an input lacks an entry, shape [2],
    the indices of the inputs that have the site)."""
    present = [i for i, a in enumerate(adapters) if site in a.tensors]
    union = torch.unique(torch.cat([adapters[i].tensors[site]["indices"].cpu() for i in present]))   # sorted
    values = torch.zeros(len(present), union.numel())
    for row, i in enumerate(present):
        parts = adapters[i].tensors[site]
        values[row, torch.searchsorted(union, parts["indices"].cpu())] = parts["values"].detach().float().cpu()
    return union, values, adapters[present[0]].tensors[site]["shape"].cpu(), present


def _trim_thresholds(values: torch.Tensor, size: int, density: float) -> torch.Tensor:
    """Per input, its k-th largest |entry| with k = max(1, floor(density · size)) over the whole matrix:
    0 (keep every entry) when the input has no more than k entries."""
    k = max(1, int(density * size))
    out = torch.zeros(values.shape[0])
    for i, row in enumerate(values.abs()):
        nonzero = row[row > 0]
        if nonzero.numel() > k:
            out[i] = nonzero.topk(k, sorted=False).values.min()
    return out


def merge_sparse(inputs: Any, weights: Sequence[float], params: dict[str, Any], name: str,
                 lineage: dict[str, Any], method: str) -> Adapter:
    if params.get("rank") is not None:
        raise ConfigError(f"merge {method!r} of sparse adapters has no rank (the result stays sparse): leave rank out")
    adapters = inputs.adapters
    sites = list(dict.fromkeys(s for a in adapters for s in a.tensors))
    tensors = {}
    for site in sites:
        union, values, shape, present = _union(adapters, site)
        w = torch.tensor([float(weights[i]) for i in present])
        if method == "ties":
            size = int(shape[0]) * int(shape[1])
            merged = elect_and_merge(values[:, :, None], w, majority=params["majority"], elect_on=params["elect_on"],
                                     mean=params["mean"], trim_at=_trim_thresholds(values, size, params["density"]))
            merged = merged.reshape(-1) * params["lam"]
        else:
            merged = (w[:, None] * values).sum(0) * params.get("lam", 1.0)
        keep = merged != 0
        if bool(keep.any()):
            tensors[site] = {"indices": union[keep].contiguous(), "values": merged[keep].contiguous(),
                             "shape": shape.clone()}
    if not tensors:
        raise ConfigError(f"merge {method!r}: every entry of the merged sparse adapter is 0 (the inputs cancel); "
                          "change the weights")
    meta = AdapterMeta(base_fingerprint=inputs.base_fingerprint, base_name=inputs.base_name, lineage=[lineage])
    return Adapter(name, SparseConfig(target_modules=tuple(tensors)), tensors, meta)
