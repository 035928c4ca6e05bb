"""Reversible merging (after Alipour & Amiri 2025, "Towards Reversible Model Merging for Low-rank
Weights", arXiv:2510.14163): keep k basis ΔW's and per-task coefficients, and recover any task's
adapter as a linear combination instead of collapsing all tasks into one adapter.

Closed form, fitted PER SITE (the default, `per_site=True`; the paper fits each layer on its own).
At site s let x_i = ΔW_i(s) (0 where task i has no such site) and G_s [n, n] the tasks' Gram matrix
G_s[i, j] = <ΔW_i(s), ΔW_j(s)>_F = trace((B_iᵀ B_j)(A_j A_iᵀ)) = sum((B_iᵀB_j) ⊙ (A_i A_jᵀ)), from
r_i x r_j products of the factors (scale folded into B): ΔW is never formed. With G_s = V Λ Vᵀ
(eigenvalues descending, V orthonormal), the best rank-k approximation of X_s = [x_1 .. x_n]
(Eckart–Young) is X_s V_k V_kᵀ, so
    basis_j(s) = Σ_i V[i, j] ΔW_i(s)         j < k: the top-k principal directions, ||basis_j(s)||² = λ_j
    ΔW_i(s) ≈ Σ_j C_s[i, j] basis_j(s)       C_s = V_k [n, k]: the projections <x_i, basis_j> / λ_j
k = n recovers every task exactly (V is orthogonal). The eigen-decomposition is of the block of the
tasks present at s: an absent task has coefficient 0 there, and a site with p < k present tasks has
zero directions j >= p. `per_site=False` keeps the former global mode: ONE Gram matrix G = Σ_s G_s
(each adapter as one long vector), one C [n, k] shared by every site.

`normalize=True` weighs the tasks equally: the fit is of w_i x_i with w_i = 1 / ||ΔW_i|| (the norm over
all sites), i.e. it minimises Σ_i (relative error_i)² instead of Σ_i (absolute error_i)², so a task with
a small ΔW is not the first to be dropped. Same closed form on W G W (W = diag(w)): basis_j =
Σ_i w_i V[i, j] ΔW_i and C = V / w (the coefficients carry the norm back).

Storage is exact: basis adapter j holds basis_j(s) at every site as ONE low-rank product, since a
linear combination of rank-r_i products is the rank-Σr_i product [V[0,j]B_0 | V[1,j]B_1 | ..] @
[A_0; A_1; ..]; `rank` re-factors it by an exact SVD (lossy: the loss shows in the errors).

Conventions. Each eigenvector is signed so that its largest-magnitude entry is positive.
`eigenvalues`: global mode, the n eigenvalues of G; per-site mode, Σ_s λ_j(s) (the energy of basis
direction j summed over sites), n values (of W G W with normalize). Errors are relative Frobenius
errors ||ΔW_i - R_i|| / ||ΔW_i|| of the recovered R_i against what is stored (compression included),
also computed from factors:
`errors[task]` over all sites, `site_errors[task][site]` per site the task targets (`error_summary()`:
overall, median and max over sites). Run time: per-site coefficients are not one scalar per basis
adapter, so `coefficients` [n, k] is the best SITE-SHARED row (least squares over all sites against
the stored basis; = C in global mode) and `row_weights` gives it as an AdapterRuntime row
{basis_j: c}, with error `row_errors` (= `errors` in global mode); `recover` applies each site's C_s.

Saved as a folder: reversible.json {"type": "adapterkit.reversible", "format_version": 2, per_site,
tasks, coefficients [n][k], site_coefficients {site: [n][k]} (per-site mode only), errors,
site_errors, row_errors, eigenvalues, basis: folder names} and one adapter folder per basis element
(PEFT-loadable). Version 1 folders (global mode) still load.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .._atomic import atomic_write_dir
from ..core.adapter import Adapter, AdapterMeta
from ..errors import ConfigError, CorruptAdapterError
from .common import (Inputs, build_adapter, check_inputs, check_result, linalg_errors, require_finite,
                     site_factors)
from .concat import concat
from .svd import truncate_factors

TYPE, FORMAT_VERSION, INDEX = "adapterkit.reversible", 2, "reversible.json"


def _stacked(factors: Sequence[tuple[int, torch.Tensor, torch.Tensor]], n: int):
    """(owner index, B [d_out, r], A [r, d_in]) triples side by side in float64: B [d_out, R],
    A [R, d_in] and owner [n, R], owner[i, c] = 1 where column c of B belongs to i."""
    owner = torch.zeros(n, sum(b.shape[1] for _, b, _ in factors), dtype=torch.float64)
    col = 0
    for i, b, _ in factors:
        owner[i, col:col + b.shape[1]] = 1.0
        col += b.shape[1]
    return (torch.cat([b for _, b, _ in factors], 1).double(), torch.cat([a for _, _, a in factors], 0).double(),
            owner)


def _cross(x, y) -> torch.Tensor:
    """[n1, n2] Frobenius inner products <ΔX_i, ΔY_j> of two _stacked groups: block sums of
    (Bxᵀ By) ⊙ (Ax Ayᵀ), an R1 x R2 matrix (never d_out x d_in)."""
    (bx, ax, ox), (by, ay, oy) = x, y
    return ox @ ((bx.t() @ by) * (ax @ ay.t())) @ oy.t()


def _task_stack(inputs: Inputs, site: str):
    n = len(inputs.adapters)
    return _stacked([(i, *site_factors(inputs.adapters[i], site)) for i in inputs.present(site)], n)


def task_gram(inputs: Inputs, site: str | None = None) -> torch.Tensor:
    """G [n, n] float64: <ΔW_i, ΔW_j>_F at `site`, or summed over all sites (site=None)."""
    n = len(inputs.adapters)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for s in ([site] if site is not None else inputs.sites):
        x = _task_stack(inputs, s)
        gram += _cross(x, x)
    return gram


def principal(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues [n] descending, V [n, n]) of a symmetric Gram matrix; each column of V signed so
    that its largest-magnitude entry is positive."""
    evals, vecs = torch.linalg.eigh(gram)
    evals, vecs = evals.flip(0), vecs.flip(1)
    return evals, vecs * torch.sign(vecs.gather(0, vecs.abs().argmax(0, keepdim=True)))


def _site_fit(gram: torch.Tensor, present: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """C_s [n, k] and the eigenvalues [n] (0-padded, clamped >= 0) from the present tasks' block."""
    n, p = gram.shape[0], len(present)
    idx = torch.tensor(present)
    evals, vecs = principal(gram[idx[:, None], idx[None, :]])
    coeffs = torch.zeros(n, k, dtype=torch.float64)
    coeffs[idx, :min(k, p)] = vecs[:, :k]
    lam = torch.zeros(n, dtype=torch.float64)
    lam[:p] = evals.clamp_min(0)
    return coeffs, lam


@dataclass
class ReversibleMerge:
    tasks: list[dict[str, Any]]        # per input: name, fingerprint, base_fingerprint, task
    coefficients: torch.Tensor         # [n, k] float64: the site-shared row (global mode: C at every site)
    basis: list[Adapter]               # k LoRA adapters
    errors: dict[str, float]           # task name -> relative Frobenius error over all sites
    eigenvalues: list[float]           # n: energy per direction (see the module doc)
    site_coefficients: dict[str, torch.Tensor] | None = None    # per-site mode: site -> C_s [n, k]; None: global
    site_errors: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> site -> rel. error
    row_errors: dict[str, float] = field(default_factory=dict)  # task -> rel. error of row_weights

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.tasks]

    @property
    def per_site(self) -> bool:
        return self.site_coefficients is not None

    def index(self, task: str | int) -> int:
        if isinstance(task, int) and 0 <= task < len(self.tasks):
            return task
        if task in self.task_names:
            return self.task_names.index(task)
        raise ConfigError(f"no task {task!r} in this reversible merge; tasks: {', '.join(self.task_names)}")

    def coefficients_at(self, site: str) -> torch.Tensor:
        """C_s [n, k]: the coefficients recovery uses at `site`."""
        if self.site_coefficients is None:
            return self.coefficients
        if site not in self.site_coefficients:
            raise CorruptAdapterError(f"this per-site reversible merge has no coefficients for site {site!r}")
        return self.site_coefficients[site]

    def row_weights(self, task: str | int) -> dict[str, float]:
        """{basis adapter name: coefficient}: a runtime row standing for the task. Exact to the fit in
        global mode; per site, the best site-shared approximation (its error: row_errors)."""
        i = self.index(task)
        return {b.name: float(self.coefficients[i, j]) for j, b in enumerate(self.basis)}

    def error_summary(self) -> dict[str, dict[str, Any]]:
        """task -> {overall, site_median, site_max, worst_site, row}: relative Frobenius errors."""
        out = {}
        for t in self.task_names:
            per = self.site_errors.get(t, {})
            worst = max(per, key=per.get) if per else None
            out[t] = {"overall": self.errors[t], "site_median": statistics.median(per.values()) if per else None,
                      "site_max": per[worst] if per else None, "worst_site": worst,
                      "row": self.row_errors.get(t)}
        return out

    def to_json(self) -> dict[str, Any]:
        out = {"type": TYPE, "format_version": FORMAT_VERSION, "per_site": self.per_site, "tasks": self.tasks,
               "coefficients": self.coefficients.tolist(), "errors": self.errors, "site_errors": self.site_errors,
               "row_errors": self.row_errors, "eigenvalues": self.eigenvalues, "basis": [b.name for b in self.basis]}
        if self.site_coefficients is not None:
            out["site_coefficients"] = {s: c.tolist() for s, c in self.site_coefficients.items()}
        return out

    def save(self, path: str | Path) -> Path:
        def write(tmp: Path) -> None:
            for b in self.basis:
                b.save(tmp / b.name)
            (tmp / INDEX).write_text(json.dumps(self.to_json(), indent=2), encoding="utf-8")
        return atomic_write_dir(path, write)

    @classmethod
    def load(cls, path: str | Path) -> "ReversibleMerge":
        path = Path(path)
        try:
            data = json.loads((path / INDEX).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CorruptAdapterError(f"{path / INDEX} cannot be read ({exc}): not a reversible merge") from None
        if data.get("type") != TYPE or data.get("format_version", 0) > FORMAT_VERSION:
            raise CorruptAdapterError(f"{path / INDEX} is type {data.get('type')!r} version "
                                      f"{data.get('format_version')!r}; this adapterkit reads {TYPE} up to "
                                      f"version {FORMAT_VERSION}")
        basis = [Adapter.load(path / name, name=name) for name in data["basis"]]
        site = data.get("site_coefficients")            # absent in version 1 (global mode)
        return cls(data["tasks"], torch.tensor(data["coefficients"], dtype=torch.float64), basis,
                   data["errors"], data["eigenvalues"],
                   {s: torch.tensor(c, dtype=torch.float64) for s, c in site.items()} if data.get("per_site") else None,
                   data.get("site_errors", {}), data.get("row_errors", dict(data["errors"])))

    @classmethod
    def from_store(cls, store: Any, name: str) -> "ReversibleMerge":
        """The basis adapters NAME.basis0, NAME.basis1, ... written by `adapterkit merge`; the
        coefficients and errors are read from their lineage."""
        if f"{name}.basis0" not in store:
            raise CorruptAdapterError(f"the store at {store.root} holds no {name}.basis0: not a reversible merge")
        first = store.get(f"{name}.basis0")
        entry = first.meta.lineage[0]
        basis = [first] + [store.get(f"{name}.basis{j}") for j in range(1, entry["params"]["k"])]
        entries = [b.meta.lineage[0] for b in basis]
        tasks = [{k: v for k, v in t.items() if k != "weight"} for t in entry["inputs"]]
        coeffs = torch.tensor([[e["coefficients"][t["name"]] for e in entries] for t in tasks], dtype=torch.float64)
        site = None
        if entry["params"].get("per_site"):              # basis j holds column j of every C_s
            site = {s: torch.tensor([e["site_coefficients"][s] for e in entries], dtype=torch.float64).t().contiguous()
                    for s in entry["site_coefficients"]}
        return cls(tasks, coeffs, basis, entry["task_errors"], entry.get("eigenvalues", []), site,
                   entry.get("site_errors", {}), entry.get("row_errors", dict(entry["task_errors"])))


def _combination(adapters: Sequence[Adapter], coeffs: Sequence[float], site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_j c_j ΔW_j at a site as concatenated factors (adapters lacking the site count as 0)."""
    present = [(a, c) for a, c in zip(adapters, coeffs) if site in a.tensors]
    return concat([site_factors(a, site) for a, _ in present], [float(c) for _, c in present])


def merge_reversible(adapters: Sequence[Adapter], k: int, *, rank: int | None = None, per_site: bool = True,
                     normalize: bool = False, name: str = "reversible") -> ReversibleMerge:
    """k basis adapters named f"{name}.basis{j}", the coefficients and the errors; see the module doc."""
    inputs = check_inputs(adapters, "reversible")
    n = len(inputs.adapters)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError(f"reversible merge k must be an integer in [1, {n}] (the number of basis "
                          f"adapters, at most the number of tasks), got {k!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive integer (or None), got {rank!r}")
    for key, value in (("per_site", per_site), ("normalize", normalize)):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
    names = [a.name for a in inputs.adapters]
    f64 = {"dtype": torch.float64}
    where = "over all sites"                  # where the fit is, should the linear algebra fail
    with torch.no_grad(), linalg_errors(lambda: f"reversible merge: the fit {where}", "the inputs' weight "
                                        "changes are too ill-conditioned to fit: try another k, or normalize"):
        # the fit is of the weighted tasks w_i x_i (w = 1, or 1 / ||x_i|| with normalize): V from
        # W G W, basis_j = Σ_i w_i V[i, j] ΔW_i, C = V / w
        whole = task_gram(inputs) if normalize or not per_site else None
        norms = whole.diagonal().sqrt() if normalize else None
        w = torch.where(norms > 0, 1 / norms, 1.0) if normalize else torch.ones(n, **f64)
        if not per_site:
            evals, vecs = principal(w[:, None] * whole * w[None, :])
            shared = vecs[:, :k]
        energy, total, lost = torch.zeros(n, **f64), torch.zeros(n, **f64), torch.zeros(n, **f64)
        g_sum, h_sum = torch.zeros(n, k, **f64), torch.zeros(k, k, **f64)
        site_coeffs, factors, site_errors = {}, [{} for _ in range(k)], {t: {} for t in names}
        for site in inputs.sites:
            where = f"at site {site!r}"
            x = _task_stack(inputs, site)
            gram = _cross(x, x)
            if per_site:
                v, lam = _site_fit(w[:, None] * gram * w[None, :], inputs.present(site), k)
                energy += lam
            else:
                v = shared
            c = site_coeffs[site] = v / w[:, None]
            b, a, owner = x
            for j in range(k):                    # basis_j = Σ_i w_i V[i, j] ΔW_i: scale B's columns by owner
                bj = b * (owner.t() @ (w * v[:, j]))[None, :]
                bj, aj = truncate_factors(bj, a, rank)[:2] if rank else (bj, a)
                factors[j][site] = (bj.float(), aj.float())          # as stored
            y = _stacked([(j, *factors[j][site]) for j in range(k)], k)
            g, h = _cross(x, y), _cross(y, y)     # <ΔW_i, basis_j> [n, k], <basis_j, basis_l> [k, k]
            sq = gram.diagonal()
            miss = (sq - 2 * (c * g).sum(1) + ((c @ h) * c).sum(1)).clamp_min(0)   # ||ΔW_i - Σ_j C[i,j] basis_j||²
            total, lost, g_sum, h_sum = total + sq, lost + miss, g_sum + g, h_sum + h
            for i in inputs.present(site):
                site_errors[names[i]][site] = float((miss[i] / sq[i]).sqrt()) if sq[i] > 0 else 0.0
        def ratio(num: torch.Tensor) -> dict[str, float]:
            return {t: float((num[i] / total[i]).sqrt()) if total[i] > 0 else 0.0 for i, t in enumerate(names)}
        where = "over all sites"
        errors = ratio(lost)
        if per_site:      # the least-squares site-shared row: min_c Σ_s ||ΔW_i(s) - Σ_j c_j basis_j(s)||²
            coeffs = g_sum @ torch.linalg.pinv(h_sum, hermitian=True)
            row_lost = (total - 2 * (coeffs * g_sum).sum(1) + ((coeffs @ h_sum) * coeffs).sum(1)).clamp_min(0)
            row_errors, eigenvalues = ratio(row_lost), energy.tolist()
        else:
            coeffs, row_errors, eigenvalues = shared / w[:, None], dict(errors), evals.tolist()
    tasks = inputs.lineage_inputs()
    for t, a in zip(tasks, inputs.adapters):
        t["task"] = a.meta.task
    basis = []
    for j in range(k):
        lineage = {"op": "merge", "method": "reversible", "inputs": tasks,
                   "params": {"k": k, "rank": rank, "per_site": per_site, "normalize": normalize}, "basis_index": j,
                   "coefficients": {t: coeffs[i, j].item() for i, t in enumerate(names)},
                   "task_errors": errors, "row_errors": row_errors, "site_errors": site_errors,
                   "eigenvalues": eigenvalues}
        if per_site:
            lineage["site_coefficients"] = {s: c[:, j].tolist() for s, c in site_coeffs.items()}
        basis.append(check_result(build_adapter(f"{name}.basis{j}", factors[j], inputs, lineage),
                                  "reversible merge", "the inputs' weight changes are too large to combine in "
                                  "float32: scale them down", what="basis weight change"))
    return ReversibleMerge(tasks, coeffs, basis, errors, eigenvalues, site_coeffs if per_site else None,
                           site_errors, row_errors)


def recover(reversible: ReversibleMerge, task: str | int, *, name: str | None = None,
            rank: int | None = None) -> Adapter:
    """Task i's adapter: Σ_j C_s[i, j] basis_j(s) at each site s (exact in factor space: rank
    k · basis rank, or `rank` after an exact SVD of the product)."""
    i = reversible.index(task)
    info = reversible.tasks[i]
    action, fix = f"recovering {info['name']!r}", "the reversible merge's coefficients or basis are corrupt: redo it"
    sites = list(dict.fromkeys(s for b in reversible.basis for s in b.tensors))
    factors, used = {}, {}
    for site in sites:
        coeffs = reversible.coefficients_at(site)[i].tolist()
        b, a = _combination(reversible.basis, coeffs, site)
        require_finite(b, action, site, fix, what="weight change")      # before any SVD sees it
        factors[site] = truncate_factors(b, a, rank)[:2] if rank else (b, a)
        used[site] = coeffs
    first = reversible.basis[0]
    inputs = Inputs(tuple(reversible.basis), (), {}, first.meta.base_fingerprint, first.meta.base_name)
    lineage = {"op": "recover", "task": info["name"], "task_fingerprint": info.get("fingerprint"),
               "basis": [b.name for b in reversible.basis],
               "coefficients": used if reversible.per_site else reversible.coefficients[i].tolist(),
               "reconstruction_error": reversible.errors.get(info["name"])}
    out = check_result(build_adapter(name or info["name"], factors, inputs, lineage), action, fix, "weight change")
    out.meta = AdapterMeta(base_fingerprint=out.meta.base_fingerprint, base_name=out.meta.base_name,
                           task=info.get("task"), lineage=out.meta.lineage)
    return out
