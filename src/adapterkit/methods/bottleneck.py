"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021; parallel: He et al. 2022):
f(t) = up(act(down(t))), down d -> d/rf, up d/rf -> d initialised to zero, so a fresh adapter is the
identity. Placements:
  houlsby   series after the attention output projection and after the MLP block: y' = y + f(y)
  pfeiffer  series after the MLP block only
  parallel  beside the MLP block: y' = y + s · f(x), x the block's input, s the output scaling
The sites are modules of the base (an attention output projection, an MLP block), hooked with their
input, so the adapters run inside the serving engine's own forward as in the HF forward. Not linear
in the base weights: merging into the base and weight-space merges are refused by name; stacking with
other adapters at run time works (at one module, parallel adapters add f(x) first, then series
adapters read that output; several series adapters on one row each read it and their changes add,
as composed LoRA changes do).

Tensors per site (Linear layout): "down" [bn, d_in], "down_bias" [bn], "up" [d_out, bn], "up_bias"
[d_out]; bn = max(1, d // rf) with d the width the adapter reads; rf per site from
`reduction_pattern` (PEFT-style keys: the site name or a dotted suffix), else `reduction_factor`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..vision.mobilenet import BLOCKS, MODEL_TYPE as MOBILENET, RESIDUAL_BLOCKS
from .base import ATTACH_MODULE, STAGE_SERIES, Method, SiteInfo, TensorKind, pattern_value, config_from_dict, config_to_dict, tuple_fields
from .kernels import (STACKS_KEPT, HeldPool, add_columns, block_diagonal_is_cheaper, column_inputs, columns, routed,
                      unit_plan)

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
INITS = ("default", "nonzero")
# Per architecture: (attention output projection, MLP block or its output projection, the module a
# parallel adapter sits beside), as full-name regexes. BERT: the feed-forward output block (its dense,
# residual and LayerNorm), reading the block's input, the attention output (core/targets.site_info).
SITES = {
    "llama": (r".*\.self_attn\.o_proj", r".*\.mlp", r".*\.mlp"),
    "mistral": (r".*\.self_attn\.o_proj", r".*\.mlp", r".*\.mlp"),
    "qwen2": (r".*\.self_attn\.o_proj", r".*\.mlp", r".*\.mlp"),
    "gpt2": (r".*\.attn\.c_proj", r".*\.mlp", r".*\.mlp"),
    "bert": (r".*\.attention\.output\.dense", r".*layer\.\d+\.output\.dense", r".*layer\.\d+\.output"),
    # MobileNetV2: after every inverted-residual block; parallel beside the blocks that keep their shape
    MOBILENET: (BLOCKS, BLOCKS, RESIDUAL_BLOCKS),
}


@dataclass(frozen=True)
class BottleneckConfig:
    target_modules: tuple[str, ...] | str = "|".join(SITES["llama"][1:2])     # pfeiffer on a Llama
    placement: str = "pfeiffer"
    reduction_factor: int = 16
    reduction_pattern: dict[str, int] = field(default_factory=dict)
    nonlinearity: str = "relu"
    scaling: float = 1.0                  # the output scale of a parallel adapter (series: 1)
    exclude_modules: tuple[str, ...] | str | None = None   # e.g. leave out chosen layers
    init: str = "default"                 # "nonzero": up ~ N(0, init_std) too (tests, benchmarks)
    init_std: float = 0.02
    type: ClassVar[str] = "bottleneck"

    def __post_init__(self) -> None:
        tuple_fields(self, "target_modules", "exclude_modules")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"bottleneck placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.nonlinearity not in ACTIVATIONS:
            raise ConfigError(f"bottleneck nonlinearity must be one of {sorted(ACTIVATIONS)}, "
                              f"got {self.nonlinearity!r}")
        for what, rf in [("reduction_factor", self.reduction_factor),
                         *((f"reduction_pattern[{k!r}]", v) for k, v in self.reduction_pattern.items())]:
            if isinstance(rf, bool) or not isinstance(rf, int) or rf < 1:
                raise ConfigError(f"bottleneck {what} must be a positive integer, got {rf!r}")
        if not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling):
            raise ConfigError(f"bottleneck scaling must be a finite number, got {self.scaling!r}")
        if self.placement != "parallel" and self.scaling != 1.0:
            raise ConfigError("bottleneck scaling applies to parallel adapters; a series adapter's is 1")
        if self.init not in INITS:
            raise ConfigError(f"bottleneck init must be one of {INITS}, got {self.init!r}")
        if not self.target_modules:
            raise ConfigError("bottleneck target_modules is empty: use BottleneckConfig.for_model(...)")

    @property
    def parallel(self) -> bool:
        return self.placement == "parallel"

    @classmethod
    def for_model(cls, model_type: str, placement: str = "pfeiffer", **kwargs: Any) -> "BottleneckConfig":
        """The placement's modules for an architecture (llama, mistral, qwen2, gpt2, bert)."""
        if model_type not in SITES:
            raise ConfigError(f"no bottleneck sites known for a {model_type!r} model; give target_modules "
                              f"(known: {', '.join(sorted(SITES))})")
        attn, mlp, block = SITES[model_type]
        targets = {"houlsby": f"{attn}|{mlp}", "pfeiffer": mlp, "parallel": block}.get(placement, mlp)
        return cls(target_modules=targets, placement=placement, **kwargs)

    def reduction(self, site: str) -> int:
        value = pattern_value(self.reduction_pattern, site)
        return int(value) if value is not None else self.reduction_factor

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BottleneckConfig":
        return config_from_dict(cls, data, "bottleneck")


def _bottleneck(config: BottleneckConfig, site: SiteInfo) -> tuple[int, int, int]:
    """(d read, bn, d out) of a site."""
    if config.parallel and site.kind == "conv-module" and (site.in_features != site.out_features
                                                           or site.conv[1] != (1, 1)):
        raise ConfigError(f"a parallel bottleneck at {site.name} adds f(block input) to the block's output, but "
                          f"this block maps {site.in_features} channels at stride {site.conv[1]} to "
                          f"{site.out_features}: use placement 'pfeiffer' (after the block) here, or target "
                          "blocks that keep their shape (MobileNetV2's residual blocks)")
    d_read = site.in_features if config.parallel else site.out_features
    return d_read, max(1, d_read // config.reduction(site.name)), site.out_features


def _f(t: torch.Tensor, parts: Mapping[str, torch.Tensor], act: Callable) -> torch.Tensor:
    """up(act(down(t))) in t's dtype; t [..., d_read]."""
    h = act(F.linear(t, parts["down"].to(t.dtype), parts["down_bias"].to(t.dtype)))
    return F.linear(h, parts["up"].to(t.dtype), parts["up_bias"].to(t.dtype))


class Bottleneck(Method):
    name = "bottleneck"
    title = "bottleneck"
    config_cls = BottleneckConfig
    attach = ATTACH_MODULE
    site_kinds = frozenset({"linear", "module", "conv-module"})   # a conv block: over its channels, per pixel
    stage = STAGE_SERIES                  # reads the output every earlier stage made
    delta_kind = None                     # not linear in W: no merge into the base, no weight-space merge
    merge_ops = frozenset()

    def tensor_kinds(self, config: BottleneckConfig) -> dict[str, TensorKind]:
        return {k: TensorKind() for k in ("down", "down_bias", "up", "up_bias")}

    def tensor_shapes(self, config: BottleneckConfig, site: SiteInfo) -> dict[str, tuple[int, ...]]:
        d_read, bn, d_out = _bottleneck(config, site)
        return {"down": (bn, d_read), "down_bias": (bn,), "up": (d_out, bn), "up_bias": (d_out,)}

    def init_tensors(self, config: BottleneckConfig, site: SiteInfo, gen: torch.Generator) -> dict[str, torch.Tensor]:
        d_read, bn, d_out = _bottleneck(config, site)
        bound = 1.0 / math.sqrt(d_read)                  # nn.Linear's default for the down projection
        down = torch.empty(bn, d_read).uniform_(-bound, bound, generator=gen)
        up = torch.zeros(d_out, bn)
        if config.init == "nonzero":
            up.normal_(0.0, config.init_std, generator=gen)
        return {"down": down, "down_bias": torch.zeros(bn), "up": up, "up_bias": torch.zeros(d_out)}

    def make_pool(self, site: SiteInfo, capacity: int) -> "BottleneckPool":
        return BottleneckPool(site)

    def reference(self, config: BottleneckConfig, site: SiteInfo, tensors: Mapping[str, torch.Tensor],
                  x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        parts = {k: t.double() for k, t in tensors.items()}
        src = (x if config.parallel else y).double()
        if site.kind == "conv-module":                   # over channels, per pixel
            return y.double() + config.scaling * _f(src.movedim(1, -1), parts,
                                                    ACTIVATIONS[config.nonlinearity]).movedim(-1, 1)
        return y.double() + config.scaling * _f(src, parts, ACTIVATIONS[config.nonlinearity])

    def summary(self, config: BottleneckConfig, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
        sizes = sorted({int(p["down"].shape[0]) for p in tensors.values()})
        size = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}..{sizes[-1]}"
        scale = f" scale {config.scaling:g}" if config.scaling != 1.0 else ""
        return f"bottleneck {config.placement} {config.nonlinearity} size {size}{scale} on {len(tensors)} sites"


class BottleneckPool(HeldPool):
    """All bottleneck adapters at one module, by slot. `held`: each adapter's own tensors, read by the
    dense kernel while training (gradients reach them; all units, masked by weight). The other kernels
    run the step's adapters of one side (parallel ones read the block's input, then series ones the
    output so far) on the units routed to them only: either block-diagonally, one batched matmul pair
    for all m adapters, each on its own units (downs D [m, d_read, W], ups U [m, W, d_out], W the widest
    bottleneck, narrower ones padded with zeros), or one adapter at a time on its own units, whichever
    block_diagonal_is_cheaper picks."""

    # one more adapter call costs about 55 us on this CPU (the mixed decode step of benchmarks/methods_decode.py
    # per extra call), as many as ~1M multiply-adds of these small matmuls (~17 GMAC/s)
    CALL_COST = 1_000_000

    DERIVED = ("_stacked", "sides")

    def hold(self, config: BottleneckConfig, tensors: Mapping[str, torch.Tensor]) -> tuple:
        return dict(tensors), ACTIVATIONS[config.nonlinearity], float(config.scaling), config.parallel

    def rebuild(self) -> None:
        self._stacked = {}
        self.sides = {side: {s: h for s, h in self.held.items() if h[3] == side} for side in (True, False)}

    def stacked(self, slots: tuple[int, ...], dtype: torch.dtype) -> tuple:
        """(D [m, d_read, W], Db [m, 1, W], U [m, W, d_out] · scale, Ub [m, 1, d_out] · scale, acts) for
        `slots`, W = the widest bottleneck (zero-padded: a padded hidden unit's up row is 0, whatever its
        activation gives); acts: (act, its adapters [m, 1, 1] or None when every adapter uses it)."""
        key = (slots, dtype)
        if key not in self._stacked:
            parts = [self.held[s] for s in slots]
            m, width = len(parts), max(p[0]["down"].shape[0] for p in parts)

            def stack(name: str, pad: Callable) -> torch.Tensor:     # [m, ...] in dtype, the hidden side padded
                return torch.stack([p[0][name] if p[0]["down"].shape[0] == width else
                                    F.pad(p[0][name], pad(width - p[0]["down"].shape[0])) for p in parts]).to(dtype)

            with torch.no_grad():         # one stack per tensor (a set change costs 4 copies, not 4 · m)
                scale = torch.tensor([p[2] for p in parts], dtype=dtype, device=parts[0][0]["up"].device).view(m, 1, 1)
                down = stack("down", lambda w: (0, 0, 0, w)).transpose(1, 2)           # [m, d_read, W] (a view)
                down_b = stack("down_bias", lambda w: (0, w)).unsqueeze(1)            # [m, 1, W]
                up = stack("up", lambda w: (0, w)).transpose(1, 2) * scale           # [m, W, d_out]
                up_b = stack("up_bias", lambda w: (0, 0)).unsqueeze(1) * scale        # [m, 1, d_out]
            acts: dict[Callable, torch.Tensor] = {}                          # act -> its adapters
            for b, p in enumerate(parts):
                acts.setdefault(p[1], torch.zeros(m, 1, 1, dtype=torch.bool, device=down.device))[b] = True
            acts_list = [(act, None) for act in acts] if len(acts) == 1 else list(acts.items())
            if len(self._stacked) >= STACKS_KEPT:
                del self._stacked[next(iter(self._stacked))]          # the oldest set
            self._stacked[key] = (down, down_b, up, up_b, acts_list)
        return self._stacked[key]

    def _side(self, parallel: bool, src: torch.Tensor, out: torch.Tensor, batch: Any) -> torch.Tensor:
        held = self.sides[parallel]
        plan = unit_plan(batch, held)
        if plan is None:
            return out
        length = src.shape[1]
        work = [2 * held[s][0]["down"].numel() for s in plan.slots]         # multiply-adds per token
        block_diagonal = block_diagonal_is_cheaper(plan, length, work, self.CALL_COST)
        # both paths read src into a copy first: serving then adds into the module's fresh output in
        # place (series adapters read and write that output); training copies
        if block_diagonal:
            lay = columns(batch, plan)
            xcol = column_inputs(src, plan, lay, src.dtype)                      # [m · c_max, L, d_read]
        else:
            xs = src.index_select(0, plan.units)                                 # [r, L, d_read]
        out = out if not torch.is_grad_enabled() and out.is_contiguous() else out.clone()
        if block_diagonal:
            m = len(plan.slots)
            down, down_b, up, up_b, acts = self.stacked(plan.slots, xcol.dtype)
            h = torch.baddbmm(down_b, xcol.view(m, lay.most * length, -1), down)     # [m, c_max · L, W]
            h = acts[0][0](h) if len(acts) == 1 else sum(torch.where(who, act(h), torch.zeros_like(h))
                                                         for act, who in acts)
            ys = torch.baddbmm(up_b, h, up).view(m * lay.most, length, -1)           # [m · c_max, L, d_out]
            return add_columns(out, ys, plan, lay)
        for slot, (local, w) in zip(plan.slots, plan.groups):
            parts, act, scale, _ = held[slot]
            term = scale * _f(xs.index_select(0, local), parts, act)
            term = term if w is None else term * w.to(term.dtype)
            out.index_add_(0, plan.units.index_select(0, local), term.to(out.dtype))
        return out

    def apply(self, x: torch.Tensor, y: torch.Tensor, batch: Any, training: bool) -> torch.Tensor:
        if self.site.kind == "conv-module":           # [n, C, H, W]: channels last, a bottleneck per pixel
            return self._apply(x.movedim(1, -1), y.movedim(1, -1), batch).movedim(-1, 1)
        return self._apply(x, y, batch)

    def _apply(self, x: torch.Tensor, y: torch.Tensor, batch: Any) -> torch.Tensor:
        x3, y3 = batch.view_input(x), batch.view_input(y)               # [n, L, d_in], [n, L, d_out]
        if batch.kernel != "dense":
            self.ensure()
            # parallel adapters read the block's input, then series ones the output so far
            out = self._side(True, x3, y3, batch)
            return self._side(False, out, out, batch).reshape(y.shape)

        def run(held: tuple, t: torch.Tensor) -> torch.Tensor:
            parts, act, scale, _ = held
            return scale * _f(t, parts, act)
        out = routed(batch, {s: h for s, h in self.held.items() if h[3]}, run, x3, y3)
        out = routed(batch, {s: h for s, h in self.held.items() if not h[3]}, run, out, out)
        return out.reshape(y.shape)


BOTTLENECK = Bottleneck()
