"""CorDA (Yang et al. 2024): LoRA initialised from a decomposition of each weight oriented by the task's
input covariance (`train --init corda-ipm | corda-kpm`), computed as PEFT computes it
(peft/tuners/lora/corda.py), so both give the same A, B and residual on the same calibration data.

  covariance  per target Linear, over calibration rows run one at a time through the bare base:
              C = mean over rows of (x/|max x|)ᵀ(x/|max x|), x the Linear's input [tokens, d_in]
  damping     C' = C + damp·mean(diag C)·I, damp = 0.01 doubled until ||C'·C'⁻¹ - I|| < 0.05
  SVD         U S Vᵀ = W·C' (W [d_out, d_in]), then V := (Vᵀ·C'⁻¹)ᵀ: U S Vᵀ = W exactly, its components
              ordered by how much of W the inputs C' weighs use
  modes       IPM (instruction-previewed) keeps the r LARGEST components (learns the task faster); KPM
              (knowledge-preserved) the r SMALLEST (leaves what the covariance says is used alone)
  init        S := S/scale; A = √S·Vᵀ [r, d_in], B = U·√S [d_out, r]; the base's residual W - scale·B·A

adapterkit never changes the frozen base: the residual is a second, frozen LoRA R = (A0, -B0) stacked
under the trained one (runtime underlay) while it trains, and the stored adapter is their exact
concatenation, a plain rank-2r LoRA [A; A0], [B, -B0] that reproduces the trained model on the
unmodified base (and loads in PEFT, vLLM and every merge as any LoRA).
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any, Callable, Sequence

import torch

from ..errors import ConfigError

MODES = ("corda-ipm", "corda-kpm")
INV_TOLERANCE = 0.05
FIRST_DAMP = 0.01


@torch.no_grad()
def covariances(model: torch.nn.Module, modules: dict[str, torch.nn.Module],
                run_rows: Callable[[], None]) -> dict[str, torch.Tensor]:
    """{site: C [d_in, d_in] float32}: each module's input covariance over the forwards `run_rows` makes
    (one row per forward, as PEFT's hook assumes: the leading batch dim of 1 is dropped)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    bad: list[str] = []

    def hook_for(site: str):
        def hook(module, args, output):
            x = args[0].detach().squeeze(0).float()
            x = x / torch.max(x).abs()
            if not bool(torch.isfinite(x).all()):
                bad.append(site)
                return
            cov = x.t().matmul(x)
            sums[site] = sums[site] + cov if site in sums else cov
            counts[site] = counts.get(site, 0) + 1
        return hook

    handles = [m.register_forward_hook(hook_for(s)) for s, m in modules.items()]
    try:
        was = model.training
        model.eval()
        run_rows()
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    if bad:
        raise ConfigError(f"CorDA calibration: a row's input to {bad[0]} is all zeros or not finite (NaN / inf), "
                          "so its covariance is undefined; check the calibration rows")
    missing = [s for s in modules if s not in counts]
    if missing:
        raise ConfigError(f"CorDA calibration: no calibration row reached {missing[0]}: the calibration data is "
                          "empty; give training rows with text")
    return {s: sums[s] / counts[s] for s in modules}


def damped_inverse(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(C', C'⁻¹, damp): the smallest damping (0.01 doubled) whose inverse is stable (PEFT's rule)."""
    n = cov.shape[0]
    eye = torch.eye(n, device=cov.device)
    damp = FIRST_DAMP
    for _ in range(64):
        fixed = cov + torch.diag(torch.ones(n, device=cov.device) * torch.mean(torch.diag(cov)) * damp)
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < INV_TOLERANCE:
            return fixed, inv, damp
        damp *= 2
    raise ConfigError("CorDA: the calibration covariance cannot be inverted stably even heavily damped; give more "
                      "(and more varied) calibration rows")


@torch.no_grad()
def corda_factors(weight: torch.Tensor, cov: torch.Tensor, r: int, mode: str,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, d_in], B [d_out, r]) float32 for a weight W [d_out, d_in] (Linear layout) and its input
    covariance; W - scale·B·A is the residual."""
    if mode not in MODES:
        raise ConfigError(f"unknown CorDA mode {mode!r}; use one of {', '.join(MODES)}")
    w = weight.float()
    if r > min(w.shape):
        raise ConfigError(f"CorDA: rank {r} exceeds the {tuple(w.shape)} weight's {min(w.shape)} components")
    fixed, inv, _ = damped_inverse(cov.float())
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    v = (vh @ inv).transpose(0, 1)
    keep = slice(None, r) if mode == "corda-ipm" else slice(-r, None)
    u, s, v = u[:, keep], s[keep] / scale, v[:, keep]
    a = v.t().mul(s.sqrt().view(-1, 1)).contiguous()
    b = u.mul(s.sqrt()).contiguous()
    return a, b


def calibration_rows(examples: Sequence[Any], n: int, seed: int) -> list[Any]:
    """A seeded sample of n training rows (all when fewer): the task's inputs CorDA orients by."""
    if not examples:
        raise ConfigError("CorDA calibration data is empty: it reads the training rows; give training data")
    if len(examples) <= n:
        return list(examples)
    return [examples[i] for i in sorted(random.Random(f"adapterkit:corda:{seed}").sample(range(len(examples)), n))]


@torch.no_grad()
def init_corda(rt: Any, adapter: Any, rows: Sequence[Any], collate: Callable, mode: str) -> Any:
    """Set `adapter`'s LoRA tensors to CorDA's A0, B0 (from `rows`, run one at a time through the bare base)
    and return the frozen residual adapter R = (A0, -B0), to be stacked under it while it trains."""
    from ..core.adapter import Adapter, AdapterMeta
    from ..core.base import to_device

    if adapter.config.type != "lora":
        raise ConfigError(f"--init {mode} initialises LoRA; this run trains {adapter.method.an_adapter}: add "
                          "--method lora or leave --init out")
    modules = dict(rt.model.named_modules())
    sites = {s: modules[s] for s in adapter.sites}

    def run_rows() -> None:
        for row in rows:
            batch = to_device(collate([row]), rt.device)
            rt.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    covs = covariances(rt.model, sites, run_rows)
    residual = {}
    for site, module in sites.items():
        weight = module.weight.t() if adapter.config.fan_in_fan_out else module.weight
        a, b = corda_factors(weight, covs[site], adapter.config.rank(site), mode, adapter.config.scale(site))
        parts = adapter.tensors[site]
        parts["lora_A"].copy_(a.to(parts["lora_A"].dtype))
        parts["lora_B"].copy_(b.to(parts["lora_B"].dtype))
        residual[site] = {"lora_A": parts["lora_A"].clone(), "lora_B": -parts["lora_B"].clone()}
    meta = AdapterMeta(base_fingerprint=adapter.meta.base_fingerprint, base_name=adapter.meta.base_name)
    return Adapter(f"{adapter.name}.corda-residual", adapter.config, residual, meta)


def fold_residual(adapter: Any, residual: Any) -> None:
    """Make `adapter` (in place) the plain LoRA equal to it stacked on `residual` (same config): rank 2r,
    A = [A; A0], B = [B, -B0], alpha set so the scale is unchanged."""
    c = adapter.config
    if c.rank_pattern or c.alpha_pattern:
        raise ConfigError("CorDA's stored adapter folds a rank pattern it cannot keep; train without rank_pattern")
    factor = math.sqrt(2) if c.use_rslora else 2.0
    folded = dataclasses.replace(c, r=2 * c.r, alpha=c.alpha * factor)
    for site, parts in adapter.tensors.items():
        under = residual.tensors[site]
        parts["lora_A"] = torch.cat([parts["lora_A"], under["lora_A"].to(parts["lora_A"])], 0).contiguous()
        parts["lora_B"] = torch.cat([parts["lora_B"], under["lora_B"].to(parts["lora_B"])], 1).contiguous()
        if not math.isclose(folded.scale(site), c.scale(site), rel_tol=1e-12):
            raise AssertionError(f"CorDA fold changed the scale at {site}")
    adapter.config = folded
