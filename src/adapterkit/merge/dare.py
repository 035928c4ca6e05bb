"""DARE (Yu et al. 2023, "Language Models are Super Mario"): drop each ΔW entry with probability p
and rescale the kept ones, then sum (dare_linear) or elect signs and merge (dare_ties).

deltas [n, d_out, d_in], weights [n]; one torch.Generator per input at the site (`site_generator`:
seeded from (seed, site, input name), so a mask depends on nothing else: reordering inputs or
adding sites does not change it, and the same seed gives the same merge).

Rescaling conventions:
  * rescale="inverse" (default; the paper, and PEFT's random_pruning(rescale=True), and mergekit
    before its RescaleNorm): kept entries / (1 - p), so E[drop(ΔW)] = ΔW.
  * rescale="l1" (current mergekit, sparsify.py rescaled_masked_tensor with RescaleNorm.l1): kept
    entries scaled so the matrix keeps its L1 norm.
  * rescale="none": kept entries as they are.
p = 0 is the identity (no random numbers are drawn). dare_ties takes ties.py's election options;
note that mergekit's dare_ties sums the agreeing tasks (mean="none") where PEFT averages them
(mean="count", our default).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from .ties import elect_and_merge

RESCALE = ("inverse", "l1", "none")


def site_generator(seed: int, site: str, name: str) -> torch.Generator:
    key = hashlib.blake2b(f"{seed}:{site}:{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little"))


def drop(delta: torch.Tensor, p: float, gen: torch.Generator, rescale: str = "inverse") -> torch.Tensor:
    """Zero each entry with probability p (keep where U(0,1) >= p), then rescale. Any shape."""
    if rescale not in RESCALE:
        raise ValueError(f"rescale must be one of {RESCALE}, got {rescale!r}")
    if p == 0.0:
        return delta
    kept = delta * (torch.rand(delta.shape, generator=gen) >= p)
    if rescale == "inverse":
        return kept / (1.0 - p)
    if rescale == "l1":
        before, after = delta.abs().sum(), kept.abs().sum()
        return kept * (before / after) if after > 0 else kept
    return kept


def _drop_all(deltas: torch.Tensor, p: float, gens: Sequence[torch.Generator], rescale: str) -> torch.Tensor:
    if len(gens) != deltas.shape[0]:
        raise ValueError(f"{deltas.shape[0]} deltas but {len(gens)} generators")
    return torch.stack([drop(d, p, g, rescale) for d, g in zip(deltas, gens)])


def dare_linear(deltas: torch.Tensor, weights: torch.Tensor, gens: Sequence[torch.Generator], *,
                p: float = 0.5, rescale: str = "inverse", lam: float = 1.0) -> torch.Tensor:
    """λ · Σ_i w_i drop(ΔW_i) -> [d_out, d_in]."""
    dropped = _drop_all(deltas, p, gens, rescale)
    return lam * (dropped * weights.to(deltas.dtype)[:, None, None]).sum(0)


def dare_ties(deltas: torch.Tensor, weights: torch.Tensor, gens: Sequence[torch.Generator], *,
              p: float = 0.5, rescale: str = "inverse", majority: str = "total",
              elect_on: str = "unweighted", mean: str = "count", lam: float = 1.0) -> torch.Tensor:
    """λ · disjoint merge of drop(ΔW_i) with sign election (ties.elect_and_merge) -> [d_out, d_in]."""
    dropped = _drop_all(deltas, p, gens, rescale)
    return lam * elect_and_merge(dropped, weights, majority=majority, elect_on=elect_on, mean=mean)
