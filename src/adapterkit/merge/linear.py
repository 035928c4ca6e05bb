"""Weighted linear sum and task arithmetic, exact in factor space, optionally compressed.

    ΔW = λ · Σ_i w_i ΔW_i      (the merge API's normalize=True first divides the weights by
                                their sum over all inputs, as mergekit's linear does)

computed as one concatenated low-rank product (concat.py, rank Σ r_i, exact). With `rank`, the
product is re-factored by an exact SVD of the low-rank product (svd.truncate_factors: QR + an
R x R SVD, no dense d_out x d_in SVD) and the relative Frobenius error is reported.
"""

from __future__ import annotations

from typing import Sequence

from .common import Factors
from .concat import concat
from .svd import truncate_factors


def linear(factors: Sequence[Factors], weights: Sequence[float], *, lam: float = 1.0,
           rank: int | None = None) -> tuple[Factors, float]:
    """Returns ((B [d_out, r], A [r, d_in]), relative error); r = Σ r_i, or min(Σ r_i, rank)."""
    b, a = concat(factors, [lam * float(w) for w in weights])
    if rank is None:
        return (b, a), 0.0
    nb, na, err = truncate_factors(b, a, rank)
    return (nb, na), err
