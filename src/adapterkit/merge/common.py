"""What every merge shares: input checks, per-site ΔW (dense or as factors), the output adapter.

Merges work on each input's ΔW per site through its family's contract (methods/base.py): low-rank
families give factors (scale · B, A) with ΔW = B @ A in the layout [d_out, d_in] (for GPT-2 Conv1D
sites too: the transpose is the module's business, not the merge's). A site that an input does not
target counts as ΔW = 0 for that input. A family that does not define a merge is refused by name.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..core.adapter import Adapter, AdapterMeta, check_same_base
from ..errors import BaseMismatchError, ConfigError, NonFiniteError, UnsupportedError
from ..methods import SiteInfo, get_method

Factors = tuple[torch.Tensor, torch.Tensor]     # (B [d_out, r], A [r, d_in]); ΔW = B @ A, scale folded in B


def content_fingerprint(adapter: Adapter) -> str:
    """sha256 of the config and every tensor's bytes: identifies an input in lineage."""
    h = hashlib.sha256(repr(sorted(adapter.config.to_dict().items())).encode())
    for site in sorted(adapter.tensors):
        for part in sorted(adapter.tensors[site]):
            t = adapter.tensors[site][part].detach().cpu().contiguous()
            h.update(f"{site}.{part}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


@dataclass(frozen=True)
class Inputs:
    """Checked merge inputs. sites: the union of all inputs' sites (first-seen order) -> (d_out, d_in)."""

    adapters: tuple[Adapter, ...]
    fingerprints: tuple[str, ...]              # content fingerprint per input
    sites: dict[str, tuple[int, int]]
    base_fingerprint: str | None
    base_name: str | None

    def present(self, site: str) -> list[int]:
        """Indices of the inputs that target `site` (the others count as zero there)."""
        return [i for i, a in enumerate(self.adapters) if site in a.tensors]

    def lineage_inputs(self, weights: Sequence[float] | None = None) -> list[dict[str, Any]]:
        return [{"name": a.name, "fingerprint": fp, "base_fingerprint": a.meta.base_fingerprint,
                 **({"weight": float(weights[i])} if weights is not None else {})}
                for i, (a, fp) in enumerate(zip(self.adapters, self.fingerprints))]


def check_inputs(adapters: Sequence[Adapter], op: str = "concat") -> Inputs:
    """Refuse: no input, non-adapters, a family that does not define merge `op` (or has no low-rank
    factors, which every merge here reads), NaN / inf (or a ΔW beyond
    float32) in any input (NonFiniteError naming the tensor), the same adapter twice (by name or by
    content), different bases (naming both fingerprints), clashing site shapes."""
    adapters = tuple(adapters)
    if not adapters:
        raise ConfigError("merge needs at least one adapter; the input list is empty")
    for a in adapters:
        if not isinstance(a, Adapter):
            raise ConfigError(f"merge inputs must be Adapter objects, got {type(a).__name__}")
        a.method.require_merge_op(op, a.name)
        a.check_finite(torch.float32)           # merges compute in float32
    names = [a.name for a in adapters]
    twice = sorted(n for n, c in Counter(names).items() if c > 1)
    if twice:
        raise ConfigError(f"adapter(s) {twice} are given more than once; list each input once "
                          "(raise its weight instead of repeating it)")
    fps = tuple(content_fingerprint(a) for a in adapters)
    seen: dict[str, str] = {}
    for a, fp in zip(adapters, fps):
        if fp in seen:
            raise ConfigError(f"inputs {seen[fp]!r} and {a.name!r} are the same adapter (identical tensors, "
                              f"{fp}); list it once and raise its weight instead")
        seen[fp] = a.name
    families = sorted({a.method.name for a in adapters})
    if len(families) > 1:
        raise UnsupportedError(f"merge {op!r} combines adapters of one family; the inputs are {', '.join(families)} "
                               "adapters: merge each family on its own, or stack them at run time")
    check_same_base(adapters, "merge adapters", "merge adapters of one base only")
    first = next((a for a in adapters if a.meta.base_fingerprint), None)
    sites: dict[str, tuple[int, int]] = {}
    owner: dict[str, str] = {}
    for a in adapters:
        for site, parts in a.tensors.items():
            shape = a.method.site_shape(a.config, site, parts)
            if sites.setdefault(site, shape) != shape:
                raise BaseMismatchError(
                    f"site {site!r} is {'x'.join(map(str, sites[site]))} in {owner[site]!r} but "
                    f"{'x'.join(map(str, shape))} in {a.name!r}: the adapters were made for different bases"
                    + a.method.shape_hint)
            owner.setdefault(site, a.name)
    return Inputs(adapters, fps, sites, first.meta.base_fingerprint if first else None,
                  first.meta.base_name if first else None)


def site_factors(adapter: Adapter, site: str) -> Factors:
    """(scale · B, A) in float32 (LoRA: the config's scale(site) honours rank/alpha patterns and rsLoRA)."""
    return adapter.method.factors(adapter.config, site, adapter.tensors[site])


def site_delta(adapter: Adapter, site: str) -> torch.Tensor:
    """Dense ΔW [d_out, d_in] through the family's delta_weight (LoRA layout)."""
    parts = adapter.tensors[site]
    b, a = adapter.method.factors(adapter.config, site, parts)
    info = SiteInfo(site, a.shape[1], b.shape[0], False, torch.float32)
    return adapter.method.delta_weight(adapter.config, info, parts).float().reshape(b.shape[0], -1)   # a conv: flat


def stacked_deltas(adapters: Sequence[Adapter], site: str) -> torch.Tensor:
    """[n, d_out, d_in] float32: scale_i · B_i @ A_i for adapters that all have `site`, written
    straight into one tensor (no per-input copies)."""
    b0, a0 = site_factors(adapters[0], site)
    out = torch.empty(len(adapters), b0.shape[0], a0.shape[1])
    for i, adapter in enumerate(adapters):
        b, a = site_factors(adapter, site)
        torch.matmul(b, a, out=out[i])
    return out


def lowrank_sqnorm(b: torch.Tensor, a: torch.Tensor) -> float:
    """||B @ A||_F² without forming it: sum((BᵀB) ⊙ (AAᵀ)), in float64 (B [m, r], A [r, n])."""
    b, a = b.double(), a.double()
    return float(((b.t() @ b) * (a @ a.t())).sum())


def build_adapter(name: str, factors: dict[str, Factors], inputs: Inputs,
                  lineage: dict[str, Any], metrics: dict[str, Any] | None = None) -> Adapter:
    """A LoRA adapter with ΔW = B @ A at every site (scale 1 everywhere: alpha = rank per site)."""
    fan = any(getattr(a.config, "fan_in_fan_out", False) for a in inputs.adapters)
    config, tensors = get_method("lora").from_factors(factors, fan_in_fan_out=fan)
    for site, parts in tensors.items():          # a conv site: back to PEFT's 4-d layout from the flat matrices
        like = next(a.tensors[site].get("lora_A") for a in inputs.adapters if site in a.tensors)
        if like is not None and like.dim() == 4:
            r = parts["lora_A"].shape[0]
            parts["lora_A"] = parts["lora_A"].reshape(r, *like.shape[1:]).contiguous()
            parts["lora_B"] = parts["lora_B"].reshape(-1, r, 1, 1).contiguous()
    meta = AdapterMeta(base_fingerprint=inputs.base_fingerprint, base_name=inputs.base_name,
                       metrics=dict(metrics or {}), lineage=[lineage])
    return Adapter(name, config, tensors, meta)


def _not_finite(action: str, what: str, site: str, fix: str) -> ConfigError:
    return ConfigError(f"{action}: the {what} at site {site!r} is not finite (NaN or inf) or beyond float32's "
                       f"range ({torch.finfo(torch.float32).max:.3g}); {fix}")


def check_result(adapter: Adapter, action: str, fix: str, what: str = "merged weight change") -> Adapter:
    """Refuse an output whose tensors or ΔW hold NaN / inf or exceed float32 (merges compute in
    float32): ConfigError naming the site, e.g. "merge 'ties': the merged weight change at site
    'x' is not finite ...; {fix}". Returns the adapter."""
    for site, parts in adapter.tensors.items():
        try:
            Adapter(adapter.name, adapter.config, {site: parts}).check_finite(torch.float32)
        except NonFiniteError:
            raise _not_finite(action, what, site, fix) from None
    return adapter


def require_finite(t: torch.Tensor, action: str, site: str, fix: str,
                   what: str = "merged weight change") -> torch.Tensor:
    """check_result for an intermediate (a dense ΔW, concatenated factors) before any SVD sees it."""
    if not bool(torch.isfinite(t).all()):
        raise _not_finite(action, what, site, fix)
    return t


@contextmanager
def linalg_errors(what: str | Callable[[], str], fix: str):
    """A torch.linalg failure (SVD / QR / eigh not converging) -> ConfigError "{what} failed (...); {fix}".
    what: a string, or a function giving it when the failure happens (e.g. naming the current site)."""
    try:
        yield
    except torch.linalg.LinAlgError as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{what() if callable(what) else what} failed ({detail}); {fix}") from None
