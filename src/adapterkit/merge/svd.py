"""Re-factorisation to a target rank by truncated SVD, with the relative Frobenius error it costs.

Two inputs:
  * a low-rank product B @ A (B [m, R], A [R, n]): its exact SVD comes from two thin QRs and an
    SVD of an R x R core, never forming the dense m x n matrix (`truncate_factors`);
  * a dense ΔW [m, n] (TIES/DARE/pruning results are full rank): `refactor_dense`, by exact SVD or
    by a seeded randomized range finder (Halko, Martinsson & Tropp 2011, alg. 4.4: subspace
    iteration), which is what keeps the 8 x rank-16 SmolLM2 merge within seconds on 2 threads.
The error is always measured, never estimated: ||M - B'A'||_F / ||M||_F (0 for M = 0).
The singular values are split evenly, B' = U √S and A' = √S Vh (balanced factors).
NaN / inf input is refused (ConfigError); a dense M is first scaled by an even power of two to
max |M| ~ 1 (exact), so that the randomized range finder's (M Mᵀ)^niter M neither overflows nor
underflows float32; SVD output that is not finite raises torch.linalg.LinAlgError like a failed SVD.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError

SVD_MODES = ("randomized", "exact")


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:rank].clamp_min(0).sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def lowrank_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of B @ A (B [m, R], A [R, n]) -> U [m, q], S [q], Vh [q, n], q = min(m, n, R).

    B = Qb Rb and Aᵀ = Qa Ra (thin QR), so B A = Qb (Rb Raᵀ) Qaᵀ; the SVD of the small core
    Rb Raᵀ = u s vh gives U = Qb u, Vh = vh Qaᵀ. In float64, returned as B's dtype."""
    dtype = b.dtype
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().t())
    u, s, vh = torch.linalg.svd(rb @ ra.t(), full_matrices=False)
    return (qb @ u).to(dtype), s.to(dtype), (vh @ qa.t()).to(dtype)


def truncate_factors(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of B @ A and the relative Frobenius error. A product already of
    rank <= `rank` is returned unchanged (error 0): no numerical noise for nothing."""
    if not (bool(torch.isfinite(b).all()) and bool(torch.isfinite(a).all())):
        raise ConfigError("the factors to re-factor hold NaN or inf; nothing finite can be factored")
    if b.shape[1] <= rank:
        return b, a, 0.0
    u, s, vh = lowrank_svd(b, a)
    total = float((s.double() ** 2).sum())
    kept = float((s[:rank].double() ** 2).sum())
    err = (max(total - kept, 0.0) / total) ** 0.5 if total > 0 else 0.0
    nb, na = _split(u, s, vh, rank)
    _check_output(nb, na, err)
    return nb, na, err


def randomized_svd(m: torch.Tensor, rank: int, *, oversample: int = 16, niter: int = 2,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-`rank` SVD of M [m, n]: Y = (M Mᵀ)^niter M Ω, Q = orth(Y), then the exact
    SVD of the small Qᵀ M [q, n]. As scikit-learn's randomized_range_finder, the power iterations
    are re-orthonormalised only when niter > 2. Ω ~ N(0, 1) [n, q], seeded: deterministic."""
    q = min(rank + oversample, *m.shape)
    gen = torch.Generator().manual_seed(seed)
    y = m @ torch.randn(m.shape[1], q, generator=gen, dtype=m.dtype)    # [m, q]
    for _ in range(niter):
        y = m @ (m.t() @ y)
        if niter > 2:
            y = torch.linalg.qr(y).Q
    y = torch.linalg.qr(y).Q
    core = (y.t() @ m).double()                                    # [q, n]
    # SVD of the core from the eigenpairs of core coreᵀ [q, q] (float64; q << n, so much cheaper
    # than an SVD of the core). Vh = S⁻¹ Uᵀ core; the clamp only guards S = 0, and B'A' = Y U Uᵀ core
    # stays an exact orthogonal projection of M whatever S is.
    evals, u = torch.linalg.eigh(core @ core.t())
    evals, u = evals.flip(0), u.flip(1)
    s = evals.clamp_min(0).sqrt()
    vh = (u.t() @ core) / s.clamp_min(s[0] * 1e-12 + 1e-300)[:, None]
    return y @ u.to(m.dtype), s.to(m.dtype), vh.to(m.dtype)


def refactor_dense(m: torch.Tensor, rank: int, *, svd: str = "randomized", niter: int = 2,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factors (B [m, r], A [r, n]) of a dense ΔW with r = min(rank, m, n), and the relative error.
    rank >= min(m, n) is exact without any SVD: B = M, A = I (or B = I, A = M)."""
    rows, cols = m.shape
    if not bool(torch.isfinite(m).all()):
        raise ConfigError("the matrix to re-factor holds NaN or inf; nothing finite can be factored")
    if rank >= min(rows, cols):
        eye = torch.eye(min(rows, cols), dtype=m.dtype)
        return (m, eye, 0.0) if cols <= rows else (eye, m, 0.0)
    if svd not in SVD_MODES:
        raise ValueError(f"svd must be one of {SVD_MODES}, got {svd!r}")
    peak = float(m.abs().max()) if m.numel() else 0.0
    e = math.frexp(peak)[1] // 2                   # M = 4^e M', max |M'| in [1/2, 2)
    if e:
        m = m * 2.0 ** -e * 2.0 ** -e              # two steps: 2^-2e alone may overflow float32
    if svd == "exact" or rank + 16 >= min(rows, cols):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    else:
        u, s, vh = randomized_svd(m, rank, niter=niter, seed=seed)
    b, a = _split(u, s, vh, rank)
    norm = float(torch.linalg.matrix_norm(m))
    err = float(torch.linalg.matrix_norm(m - b @ a)) / norm if norm > 0 else 0.0
    _check_output(b, a, err)
    return (b * 2.0 ** e, a * 2.0 ** e, err) if e else (b, a, err)


def _check_output(b: torch.Tensor, a: torch.Tensor, err: float) -> None:
    if not (math.isfinite(err) and bool(torch.isfinite(b).all()) and bool(torch.isfinite(a).all())):
        raise torch.linalg.LinAlgError("the SVD returned NaN or inf")
