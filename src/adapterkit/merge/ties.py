"""TIES merging (Yadav et al. 2023: trim, elect sign, disjoint merge) and magnitude pruning, on
dense per-site ΔW's stacked as deltas [n, d_out, d_in] with weights [n].

Conventions (the literature and the two libraries differ; both are offered):
  * trim: each task's ΔW at a site keeps its k = max(1, floor(density · numel)) largest |entries|
    (per matrix, as PEFT and mergekit do; the paper trims over the whole task vector). Entries tied
    with the k-th magnitude are all kept.
  * elect_on="unweighted" (default; the paper, and PEFT: src/peft/utils/merge_utils.py `ties` calls
    calculate_majority_sign_mask on the trimmed tensors before multiplying by the weights), or
    "weighted" (mergekit: merge_methods/generalized_task_arithmetic.py, GTATask.execute calls
    get_mask on weights * deltas). majority="total" elects the sign of the sum, "frequency" the
    sign of the count of signs (both libraries name these; "sum"/"count" in mergekit). A zero vote
    elects +, as both libraries do (`>= 0`). A task agrees where its (weighted, if elected so)
    trimmed entry has the elected sign; zeros never agree.
  * mean="count" (default; the paper, and PEFT's disjoint_merge: the agreeing weighted sum divided
    by the number of agreeing tasks, at least 1), "weight" (mergekit's ties, normalize=True: divided
    by the sum of the agreeing tasks' weights, 0 -> 1), or "none" (mergekit's dare_ties,
    normalize=False: the agreeing weighted sum). With all weights 1 "count" and "weight" agree.
  * lam multiplies the result (the paper's λ).
"""

from __future__ import annotations

import math

import torch

MAJORITY = ("total", "frequency")
ELECT_ON = ("unweighted", "weighted")
MEANS = ("count", "weight", "none")
_EXACT_BELOW = 1 << 16            # rows shorter than this use plain topk


def _row_threshold(row: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """The k-th largest value of a 1-D tensor of magnitudes, exactly. A random sample brackets the
    threshold between two quantiles (±5 binomial std), so only the few entries inside the bracket
    go through topk; an unlucky bracket falls back to topk over the whole row."""
    n = row.numel()
    if n < _EXACT_BELOW:
        return row.topk(k, sorted=False).values.min()
    s = 1 << 12
    sample = row[torch.randint(n, (s,), generator=gen)].sort().values
    f = 1.0 - k / n                                    # the threshold's quantile
    sd = (f * (1 - f) / s) ** 0.5
    lo, hi = sample[int(max(0.0, f - 5 * sd) * (s - 1))], sample[math.ceil(min(1.0, f + 5 * sd) * (s - 1))]
    need = k - int(torch.count_nonzero(row > hi))      # how many of the bracket's entries to keep
    band = row[(row >= lo) & (row <= hi)]              # a few % of the row
    if 0 < need <= band.numel():
        return band.topk(need, sorted=False).values.min()
    return row.topk(k, sorted=False).values.min()


def thresholds(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """Per task, the k-th largest |entry| (k = max(1, floor(density · numel))). deltas [n, ...] -> [n]."""
    flat = deltas.reshape(deltas.shape[0], -1)
    k = max(1, int(density * flat.shape[1]))
    gen = torch.Generator().manual_seed(0)             # sampling only speeds up; the result is exact
    return torch.stack([_row_threshold(row.abs(), k, gen) for row in flat])


def trim(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """Keep each task's top-`density` fraction of entries by magnitude. deltas [n, ...] -> a new
    tensor of the same shape (the input is not modified)."""
    if density >= 1.0:
        return deltas
    thr = thresholds(deltas, density).reshape(-1, *([1] * (deltas.dim() - 1)))
    return deltas * (deltas.abs() >= thr)


def _bcast(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return weights.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))   # [n, 1, 1]


def elect_and_merge(pruned: torch.Tensor, weights: torch.Tensor, *, majority: str = "total",
                    elect_on: str = "unweighted", mean: str = "count", trim_at: torch.Tensor | None = None,
                    chunk: int = 1 << 15) -> torch.Tensor:
    """Elect a sign per entry and merge the agreeing tasks. pruned [n, m, d] -> [m, d].
    trim_at [n]: first zero each task's entries below its threshold (TIES' trim, fused here so that
    it happens in cache). Entries are independent, so columns are processed in chunks."""
    if majority not in MAJORITY or elect_on not in ELECT_ON or mean not in MEANS:
        raise ValueError(f"majority in {MAJORITY}, elect_on in {ELECT_ON}, mean in {MEANS}; got "
                         f"{majority!r}, {elect_on!r}, {mean!r}")
    n = pruned.shape[0]
    flat = pruned.reshape(n, -1)                                     # [n, N]
    w = weights.to(flat.dtype)
    w_col = w[:, None]
    cut = trim_at.to(flat.dtype)[:, None] if trim_at is not None else None
    out = torch.empty(flat.shape[1], dtype=flat.dtype)
    for lo in range(0, flat.shape[1], chunk):
        tau = flat[:, lo:lo + chunk]                                 # [n, c]
        if cut is not None:
            tau = tau * (tau.abs() >= cut)
        voters = tau * w_col if elect_on == "weighted" else tau      # v_i
        vote = voters.sum(0) if majority == "total" else voters.sign().sum(0)
        elected = torch.where(vote >= 0, 1.0, -1.0).to(flat.dtype)  # e: a zero vote elects +
        # agree_i <=> e v_i > 0, so relu(e v_i) is |v_i| where task i agrees and 0 elsewhere
        # (zeros never agree), and Σ_i w_i τ_i [agree_i] = e Σ_i w_i relu(e τ_i) = e Σ_i relu(e w_i τ_i)
        pos = (voters * elected).clamp_min_(0)
        total = out[lo:lo + chunk]
        if elect_on == "weighted":
            torch.sum(pos, 0, out=total)
        else:
            torch.mv(pos.t(), w, out=total)
        total *= elected
        if mean == "count":
            total /= torch.count_nonzero(pos, dim=0).clamp_min_(1)
        elif mean == "weight":
            divisor = torch.mv((pos > 0).to(flat.dtype).t(), w)
            total /= torch.where(divisor == 0, 1.0, divisor)
    return out.reshape(pruned.shape[1:])


def ties(deltas: torch.Tensor, weights: torch.Tensor, *, density: float = 0.2, majority: str = "total",
         elect_on: str = "unweighted", mean: str = "count", lam: float = 1.0) -> torch.Tensor:
    """λ · disjoint_mean(elect(trim(ΔW_i))) -> [m, d] (see the module docstring for conventions)."""
    thr = thresholds(deltas, density) if density < 1.0 else None
    merged = elect_and_merge(deltas, weights, majority=majority, elect_on=elect_on, mean=mean, trim_at=thr)
    return lam * merged


def magnitude_prune(deltas: torch.Tensor, weights: torch.Tensor, *, density: float = 0.2,
                    lam: float = 1.0) -> torch.Tensor:
    """λ · Σ_i w_i trim(ΔW_i): pruning without sign election (PEFT's magnitude_prune)."""
    return lam * (trim(deltas, density) * _bcast(weights, deltas)).sum(0)
