"""`merge(adapters, method=..., **params) -> Adapter`: the registry of merge methods and the site loop.

For low-rank inputs (LoRA) every method reads ΔW_i = scale_i · B_i @ A_i per site (a site an input
lacks counts as zero) and returns a LoRA adapter, so a merge loads, serves and exports like any other
adapter. Other families merge by their own definition (FAMILY_MERGES: IA3's linear merge is PEFT's, in
ia3.py) into an adapter of their family; a family refuses a method its contract does not list.
  * "factors" methods (concat, linear, task_arithmetic) stay exact in factor space; an optional
    `rank` compresses by an exact SVD of the low-rank product.
  * "dense" methods (ties, magnitude_prune, dare_linear, dare_ties) build the merged dense ΔW per
    site and re-factor it to `rank` (default: the sum of the input ranks at the site, capped at
    min(d_out, d_in)) by truncated SVD (svd="randomized", seeded, or "exact").
Sites are independent: dense merges run them on `workers` threads (merge_with_report).
The report holds the relative Frobenius error of that re-factorisation per site (0 when exact);
the output's lineage records the inputs (names, content and base fingerprints, weights), the
method and every parameter (defaults included).
Refused, never stored nor reported with a made-up error: inputs holding NaN / inf (NonFiniteError),
a result that is not finite in float32 (dense ΔW, factors, output ΔW: ConfigError naming the site
and what to lower), and a failed SVD (ConfigError naming the site).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import torch

from ..core.adapter import Adapter
from ..errors import ConfigError, UnsupportedError
from .common import (build_adapter, check_inputs, check_result, linalg_errors, lowrank_sqnorm,
                     require_finite, site_factors, stacked_deltas)
from .concat import concat
from .dare import RESCALE, dare_linear, dare_ties, site_generator
from .ia3 import linear_ia3
from .sparse import merge_sparse
from .linear import linear
from .svd import SVD_MODES, refactor_dense
from .ties import ELECT_ON, MAJORITY, MEANS, magnitude_prune, ties


@dataclass(frozen=True)
class MergeMethod:
    name: str
    kind: str                        # "factors" or "dense"
    params: dict[str, Any]           # parameter -> default (weights are common to all methods)
    summary: str
    fn: Callable[..., torch.Tensor] | None = None   # dense: (deltas [n,m,d], weights [n], [gens,] **params)
    uses_rng: bool = False           # dense fn takes one torch.Generator per input


_DENSE = {"rank": None, "svd": "randomized", "seed": 0}
_ELECT = {"majority": "total", "elect_on": "unweighted", "mean": "count"}
METHODS: dict[str, MergeMethod] = {m.name: m for m in [
    MergeMethod("concat", "factors", {}, "exact: ranks add, zero error; equals all inputs active at once"),
    MergeMethod("linear", "factors", {"normalize": False, "rank": None},
                "Σ w_i ΔW_i (normalize: divide the weights by their sum); exact unless rank is given"),
    MergeMethod("task_arithmetic", "factors", {"lam": 1.0, "rank": None},
                "λ Σ w_i ΔW_i; exact unless rank is given"),
    MergeMethod("ties", "dense", {"density": 0.2, **_ELECT, "lam": 1.0, **_DENSE},
                "trim to top-density magnitudes, elect signs, disjoint mean", fn=ties),
    MergeMethod("magnitude_prune", "dense", {"density": 0.2, "lam": 1.0, **_DENSE},
                "trim to top-density magnitudes, weighted sum", fn=magnitude_prune),
    MergeMethod("dare_linear", "dense", {"p": 0.5, "rescale": "inverse", "lam": 1.0, **_DENSE},
                "drop with probability p, rescale, weighted sum", fn=dare_linear, uses_rng=True),
    MergeMethod("dare_ties", "dense", {"p": 0.5, "rescale": "inverse", **_ELECT, "lam": 1.0, **_DENSE},
                "drop with probability p, rescale, elect signs, disjoint mean", fn=dare_ties, uses_rng=True),
]}
# (family, merge method) -> merge for families that are not low-rank; their merge_ops name these
FAMILY_MERGES: dict[tuple[str, str], Callable[..., Adapter]] = {
    ("ia3", "linear"): linear_ia3,
    **{("sparse", m): partial(merge_sparse, method=m) for m in ("linear", "task_arithmetic", "ties")},
}
_CHOICES = {"majority": MAJORITY, "elect_on": ELECT_ON, "mean": MEANS, "rescale": RESCALE, "svd": SVD_MODES}


def merge_method_names() -> list[str]:
    return sorted(METHODS)


def get_merge_method(name: str) -> MergeMethod:
    if name in METHODS:
        return METHODS[name]
    hint = (" (reversible merging returns a basis, not one adapter: use merge_reversible(adapters, k=...))"
            if name == "reversible" else "")
    raise UnsupportedError(f"unknown merge method {name!r}{hint}; valid methods: {', '.join(merge_method_names())}")


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"merge parameter {key} must be a finite number, got {value!r}")
    return float(value)


def resolve_params(method: MergeMethod, n: int, params: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and every value checked; unknown names list the valid ones."""
    valid = ["weights", *method.params]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {unknown} for merge method {method.name!r}; "
                          f"valid parameters: {', '.join(sorted(valid))}")
    out = {**method.params, **params}
    weights = out.get("weights")
    weights = [1.0] * n if weights is None else [_number("weights", w) for w in weights]
    if len(weights) != n:
        raise ConfigError(f"{len(weights)} weights for {n} input adapters; give one weight per input")
    out["weights"] = weights
    if "density" in out and not 0.0 < _number("density", out["density"]) <= 1.0:
        raise ConfigError(f"density must be in (0, 1] (the fraction of entries kept), got {out['density']}")
    if "p" in out and not 0.0 <= _number("p", out["p"]) < 1.0:
        raise ConfigError(f"DARE p must be in [0, 1) (the probability of dropping an entry), got {out['p']}")
    if "lam" in out:
        _number("lam", out["lam"])
    rank = out.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive integer (or None), got {rank!r}")
    if "seed" in out and (isinstance(out["seed"], bool) or not isinstance(out["seed"], int)):
        raise ConfigError(f"seed must be an integer, got {out['seed']!r}")
    if "normalize" in out and not isinstance(out["normalize"], bool):
        raise ConfigError(f"normalize must be true or false, got {out['normalize']!r}")
    for key, choices in _CHOICES.items():
        if key in out and out[key] not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {out[key]!r}")
    if out.get("normalize") and abs(sum(weights)) < 1e-12:
        raise ConfigError("normalize=True divides by the sum of the weights, which is zero")
    return out


@dataclass
class MergeReport:
    method: str
    params: dict[str, Any]
    inputs: list[dict[str, Any]]
    site_errors: dict[str, float]       # relative Frobenius error of the re-factorisation per site
    site_ranks: dict[str, int]
    total_error: float                  # over all sites: sqrt(Σ ||M_s - M'_s||² / Σ ||M_s||²)
    seconds: float
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.site_errors.values(), default=0.0)

    @property
    def mean_error(self) -> float:
        return sum(self.site_errors.values()) / max(len(self.site_errors), 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_error": self.max_error, "mean_error": self.mean_error}


def _fix(spec: MergeMethod) -> str:
    """What to change when a merge overflows float32."""
    lam = " (or lam)" if "lam" in spec.params else ""
    return f"lower the input weights{lam} so that the merged weight change fits in float32"


def _merge_site(spec: MergeMethod, p: dict[str, Any], weights: list[float], inputs: Any, site: str):
    """One site: (B, A), relative error, ||M||² of the exact merged ΔW (for the total error)."""
    idx = inputs.present(site)
    ws = [weights[i] for i in idx]
    action = f"merge {spec.name!r}"
    if spec.kind == "factors":
        factors = [site_factors(inputs.adapters[i], site) for i in idx]
        lam = p.get("lam", 1.0)
        if spec.name == "concat":
            return concat(factors, ws), 0.0, 0.0
        if p["rank"] is not None:                 # the SVD must not see an overflowed product
            require_finite(concat(factors, [lam * w for w in ws])[0], action, site, _fix(spec))
        with linalg_errors(f"{action}: re-factoring site {site!r} to rank {p['rank']}",
                           "its inputs' weight changes are too ill-conditioned to factor: try another rank"):
            (b, a), err = linear(factors, ws, lam=lam, rank=p["rank"])
        # ||M||² of the exact sum, needed for the total error only when truncated
        return (b, a), err, (lowrank_sqnorm(*concat(factors, [lam * w for w in ws])) if err else 0.0)
    deltas = stacked_deltas([inputs.adapters[i] for i in idx], site)            # [n_site, m, d]
    extra = ([site_generator(p["seed"], site, inputs.adapters[i].name) for i in idx],) if spec.uses_rng else ()
    fn_params = {k: p[k] for k in spec.params if k not in _DENSE}
    dense = require_finite(spec.fn(deltas, torch.tensor(ws), *extra, **fn_params), action, site, _fix(spec))
    rank = p["rank"] or sum(inputs.adapters[i].method.rank(inputs.adapters[i].tensors[site]) for i in idx)
    other = "exact" if p["svd"] == "randomized" else "randomized"
    with linalg_errors(f"{action}: re-factoring site {site!r} to rank {rank}",
                       f"the merged weight change is too ill-conditioned to factor: try svd={other!r} or "
                       "another rank"):
        b, a, err = refactor_dense(dense, rank, svd=p["svd"], seed=p["seed"])
    return (b, a), err, float(torch.linalg.matrix_norm(dense.double())) ** 2


def merge_with_report(adapters: Sequence[Adapter], method: str = "concat", *, name: str = "merged",
                      workers: int | None = None, **params: Any) -> tuple[Adapter, MergeReport]:
    """merge() that also returns the MergeReport. workers (default torch.get_num_threads()): sites
    are merged by this many threads, each running single-threaded torch ops (many mid-sized ops
    scale better this way than with intra-op threads); torch's thread count is set to 1 for the
    duration and restored. The result does not depend on workers."""
    start = time.perf_counter()
    spec = get_merge_method(method)
    inputs = check_inputs(adapters, spec.name)
    p = resolve_params(spec, len(inputs.adapters), params)
    weights = p["weights"]
    if p.get("normalize"):
        weights = [w / sum(p["weights"]) for w in weights]
    family = inputs.adapters[0].method
    if family.delta_kind != "low-rank":                    # a family's own merge (its output is that family)
        lineage_params = {k: v for k, v in p.items() if k != "weights"}
        lineage = {"op": "merge", "method": spec.name, "inputs": inputs.lineage_inputs(p["weights"]),
                   "params": lineage_params, "site_errors": {}}
        merged = FAMILY_MERGES[family.name, spec.name](inputs, weights, p, name, lineage)
        check_result(merged, f"merge {spec.name!r}", _fix(spec))
        report = MergeReport(spec.name, lineage_params, lineage["inputs"], {s: 0.0 for s in merged.tensors}, {},
                             0.0, time.perf_counter() - start, name)
        return merged, report
    sites = list(inputs.sites)
    work = partial(_merge_site, spec, p, weights, inputs)
    workers = min(workers or torch.get_num_threads(), len(sites))
    with torch.no_grad():
        if workers > 1 and spec.kind == "dense":
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(workers) as pool:
                    results = list(pool.map(lambda s: _no_grad(work, s), sites))
            finally:
                torch.set_num_threads(threads)
        else:
            results = [work(s) for s in sites]
    out = {s: r[0] for s, r in zip(sites, results)}
    errors = {s: r[1] for s, r in zip(sites, results)}
    sq_total = sum(r[2] for r in results)
    sq_lost = sum(r[2] * r[1] ** 2 for r in results)
    total = (sq_lost / sq_total) ** 0.5 if sq_total > 0 else 0.0
    if not math.isfinite(total):                  # ||M||² beyond float64: never report a made-up error
        raise ConfigError(f"merge {spec.name!r}: the merged weight changes are too large to measure the "
                          f"re-factorisation error; {_fix(spec)}")
    lineage_params = {k: v for k, v in p.items() if k != "weights"}
    report = MergeReport(spec.name, lineage_params, inputs.lineage_inputs(p["weights"]), errors,
                         {s: b.shape[1] for s, (b, _) in out.items()}, total, 0.0, name)
    lineage = {"op": "merge", "method": spec.name, "inputs": report.inputs, "params": lineage_params,
               "site_errors": errors}
    merged = build_adapter(name, out, inputs, lineage, {"merge_error_total": total,
                                                        "merge_error_max": report.max_error})
    check_result(merged, f"merge {spec.name!r}", _fix(spec))
    report.seconds = time.perf_counter() - start
    return merged, report


def _no_grad(fn: Callable, *args: Any) -> Any:
    with torch.no_grad():                       # grad mode is per thread
        return fn(*args)


def merge(adapters: Sequence[Adapter], method: str = "concat", *, name: str = "merged",
          workers: int | None = None, **params: Any) -> Adapter:
    """Merge adapters of one base into one LoRA adapter; see METHODS and each family's module for
    the parameters and conventions. The per-site errors are in meta.lineage[0]["site_errors"]
    (merge_with_report returns them as a MergeReport too)."""
    return merge_with_report(adapters, method, name=name, workers=workers, **params)[0]
