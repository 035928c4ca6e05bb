"""Reversible merging (after Alipour & Amiri 2025, "Towards Reversible Model Merging for Low-rank
Weights", arXiv:2510.14163): keep a basis of k ΔW's and per-task coefficients, and recover any
task's adapter as a linear combination instead of collapsing all tasks into one adapter.

Closed form. Let x_i be task i's ΔW over all sites (one long vector) and G [n, n] the Gram matrix
G_ij = Σ_sites <ΔW_i, ΔW_j>_F, computed from the factors (sum((B_iᵀB_j) ⊙ (A_i A_jᵀ))), never from a
P-dimensional SVD. With G = V Λ Vᵀ (eigenvalues descending), the best rank-k approximation of
X = [x_1 .. x_n] is X V_k V_kᵀ, so
    basis_j = Σ_i V[i, j] ΔW_i        (j < k; exact low-rank: the concatenated factors)
    ΔW_i ≈ Σ_j C[i, j] basis_j,  C = V_k [n, k]
and task i's relative error is sqrt(1 - Σ_j λ_j V[i, j]² / G_ii); k = n recovers every task
exactly (V is orthogonal). This uses one set of coefficients for all sites (the paper fits them
per layer). Each basis element is a LoRA adapter (rank Σ r_i, or `rank` after an exact SVD of the
product); the reported errors are measured against what is stored (compression included).

Saved as a folder: reversible.json {"type": "adapterkit.reversible", "format_version": 1, tasks,
coefficients [n][k], errors, eigenvalues, basis: folder names} and one adapter folder per basis
element (PEFT-loadable). At run time a task is also just a weighted row of the basis adapters:
AdapterRuntime rows {basis_j: C[i, j]} (`ReversibleMerge.row_weights`), no recovery needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .._atomic import atomic_write_dir
from ..adapter import Adapter, AdapterMeta
from ..errors import ConfigError, CorruptAdapterError
from .common import Inputs, build_adapter, check_inputs, lowrank_sqnorm, site_factors
from .concat import concat
from .svd import truncate_factors

TYPE, FORMAT_VERSION, INDEX = "adapterkit.reversible", 1, "reversible.json"


def task_gram(inputs: Inputs) -> torch.Tensor:
    """G [n, n] float64: Σ over sites of <ΔW_i, ΔW_j>_F, from the factors."""
    n = len(inputs.adapters)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for site in inputs.sites:
        idx = inputs.present(site)
        fs = [site_factors(inputs.adapters[i], site) for i in idx]
        b = torch.cat([f[0] for f in fs], 1).double()          # [d_out, R]
        a = torch.cat([f[1] for f in fs], 0).double()          # [R, d_in]
        owner = torch.zeros(len(idx), b.shape[1], dtype=torch.float64)   # [n_present, R] block indicator
        col = 0
        for row, f in enumerate(fs):
            owner[row, col:col + f[0].shape[1]] = 1.0
            col += f[0].shape[1]
        sub = owner @ ((b.t() @ b) * (a @ a.t())) @ owner.t()
        gram[torch.tensor(idx)[:, None], torch.tensor(idx)[None, :]] += sub
    return gram


@dataclass
class ReversibleMerge:
    tasks: list[dict[str, Any]]        # per input: name, fingerprint, base_fingerprint, task
    coefficients: torch.Tensor         # C [n, k] float64: ΔW_i ≈ Σ_j C[i, j] basis_j
    basis: list[Adapter]               # k LoRA adapters
    errors: dict[str, float]           # task name -> relative Frobenius error over all sites
    eigenvalues: list[float]           # all n eigenvalues of G, descending (energy per direction)

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.tasks]

    def index(self, task: str | int) -> int:
        if isinstance(task, int) and 0 <= task < len(self.tasks):
            return task
        if task in self.task_names:
            return self.task_names.index(task)
        raise ConfigError(f"no task {task!r} in this reversible merge; tasks: {', '.join(self.task_names)}")

    def row_weights(self, task: str | int) -> dict[str, float]:
        """{basis adapter name: coefficient}: a runtime row that acts as the recovered task."""
        i = self.index(task)
        return {b.name: float(self.coefficients[i, j]) for j, b in enumerate(self.basis)}

    def to_json(self) -> dict[str, Any]:
        return {"type": TYPE, "format_version": FORMAT_VERSION, "tasks": self.tasks,
                "coefficients": self.coefficients.tolist(), "errors": self.errors,
                "eigenvalues": self.eigenvalues, "basis": [b.name for b in self.basis]}

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
        return cls(data["tasks"], torch.tensor(data["coefficients"], dtype=torch.float64), basis,
                   data["errors"], data["eigenvalues"])

    @classmethod
    def from_store(cls, store: Any, name: str) -> "ReversibleMerge":
        """The basis adapters NAME.basis0, NAME.basis1, ... written by `adapterkit merge`; the
        coefficient table and errors are read from their lineage."""
        if f"{name}.basis0" not in store:
            raise CorruptAdapterError(f"the store at {store.root} holds no {name}.basis0: not a reversible merge")
        first = store.get(f"{name}.basis0")
        entry = first.meta.lineage[0]
        basis = [first] + [store.get(f"{name}.basis{j}") for j in range(1, entry["params"]["k"])]
        tasks = [{k: v for k, v in t.items() if k != "weight"} for t in entry["inputs"]]
        coeffs = torch.tensor([[b.meta.lineage[0]["coefficients"][t["name"]] for b in basis] for t in tasks],
                              dtype=torch.float64)
        return cls(tasks, coeffs, basis, entry["task_errors"], entry.get("eigenvalues", []))


def _combination(adapters: Sequence[Adapter], coeffs: Sequence[float], site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_j c_j ΔW_j at a site as concatenated factors (adapters lacking the site count as 0)."""
    present = [(a, c) for a, c in zip(adapters, coeffs) if site in a.tensors]
    return concat([site_factors(a, site) for a, _ in present], [float(c) for _, c in present])


def merge_reversible(adapters: Sequence[Adapter], k: int, *, rank: int | None = None,
                     name: str = "reversible") -> ReversibleMerge:
    """k basis adapters named f"{name}.basis{j}" and the coefficient table; see the module doc."""
    inputs = check_inputs(adapters)
    n = len(inputs.adapters)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError(f"reversible merge k must be an integer in [1, {n}] (the number of basis "
                          f"adapters, at most the number of tasks), got {k!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive integer (or None), got {rank!r}")
    with torch.no_grad():
        gram = task_gram(inputs)
        evals, vecs = torch.linalg.eigh(gram)
        evals, vecs = evals.flip(0), vecs.flip(1)
        # a deterministic sign per eigenvector: its largest-magnitude entry is positive
        vecs = vecs * torch.sign(vecs.gather(0, vecs.abs().argmax(0, keepdim=True)))
        coeffs = vecs[:, :k].contiguous()                                    # C [n, k]
        basis, tasks = [], inputs.lineage_inputs()
        for j in range(k):
            factors = {}
            for site in inputs.sites:
                b, a = _combination(inputs.adapters, vecs[:, j].tolist(), site)
                factors[site] = truncate_factors(b, a, rank)[:2] if rank else (b, a)
            lineage = {"op": "merge", "method": "reversible", "inputs": tasks,
                       "params": {"k": k, "rank": rank}, "basis_index": j}
            basis.append(build_adapter(f"{name}.basis{j}", factors, inputs, lineage))
        errors = {}
        for i, a in enumerate(inputs.adapters):      # measured against the stored basis
            lost = total = 0.0
            for site in inputs.sites:
                rb, ra = _combination(basis, coeffs[i].tolist(), site)
                if site in a.tensors:
                    tb, ta = site_factors(a, site)
                    total += lowrank_sqnorm(tb, ta)
                    rb, ra = torch.cat([tb.double(), -rb.double()], 1), torch.cat([ta.double(), ra.double()], 0)
                lost += lowrank_sqnorm(rb, ra)
            errors[a.name] = (max(lost, 0.0) / total) ** 0.5 if total > 0 else 0.0
    for t, a in zip(tasks, inputs.adapters):
        t["task"] = a.meta.task
    for j, b in enumerate(basis):
        b.meta.lineage[0].update(coefficients={t["name"]: coeffs[i, j].item() for i, t in enumerate(tasks)},
                                 task_errors=errors, eigenvalues=evals.tolist())
    return ReversibleMerge(tasks, coeffs, basis, errors, evals.tolist())


def recover(reversible: ReversibleMerge, task: str | int, *, name: str | None = None,
            rank: int | None = None) -> Adapter:
    """Task i's adapter: Σ_j C[i, j] basis_j (exact in factor space: rank k · basis rank, or
    `rank` after an exact SVD of the product)."""
    i = reversible.index(task)
    info = reversible.tasks[i]
    coeffs = reversible.coefficients[i].tolist()
    sites = list(dict.fromkeys(s for b in reversible.basis for s in b.tensors))
    factors = {}
    for site in sites:
        b, a = _combination(reversible.basis, coeffs, site)
        factors[site] = truncate_factors(b, a, rank)[:2] if rank else (b, a)
    first = reversible.basis[0]
    inputs = Inputs(tuple(reversible.basis), (), {}, first.meta.base_fingerprint, first.meta.base_name)
    lineage = {"op": "recover", "task": info["name"], "task_fingerprint": info.get("fingerprint"),
               "basis": [b.name for b in reversible.basis], "coefficients": coeffs,
               "reconstruction_error": reversible.errors.get(info["name"])}
    out = build_adapter(name or info["name"], factors, inputs, lineage)
    out.meta = AdapterMeta(base_fingerprint=out.meta.base_fingerprint, base_name=out.meta.base_name,
                           task=info.get("task"), lineage=out.meta.lineage)
    return out
