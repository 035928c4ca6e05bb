"""Exact concatenation: ΣΔW as one low-rank product, ranks add, zero error.

    B_cat = [w_1 B_1 | w_2 B_2 | ...]   [d_out, Σ r_i]   (each B_i with its scale folded in)
    A_cat = [A_1; A_2; ...]             [Σ r_i, d_in]
    B_cat @ A_cat = Σ_i w_i B_i A_i     exactly: the merged adapter equals all inputs active at once
                                        with those weights (AdapterRuntime rows {a: w_a, b: w_b}).

PEFT's combination_type="cat" does the same; its "linear" instead averages A's and B's separately,
which adds cross terms w_i w_j B_i A_j (and needs equal ranks).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .common import Factors


def concat(factors: Sequence[Factors], weights: Sequence[float]) -> Factors:
    """factors: (B_i [d_out, r_i], A_i [r_i, d_in]) per present input; weights: one per factor."""
    if len(factors) != len(weights):
        raise ValueError(f"{len(factors)} factor pairs but {len(weights)} weights")
    b = torch.cat([w * bi for (bi, _), w in zip(factors, weights)], dim=1)
    a = torch.cat([ai for _, ai in factors], dim=0)
    return b, a
