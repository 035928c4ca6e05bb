"""ScaLearn (Frohmann et al. 2023): a composition that learns only how much of each frozen source
adapter to use. At every site the sources share, with a_i(x) the change source i makes there,

    y' = y + Σ_i ω_i ⊙ a_i(x)          (a_i = source_i(x, y) - y; for an input site, x' likewise)

Variants: "vector" (ω_i a vector per source and site: the site's output width), "uniform" (a scalar
per source and site), and "shared" / "shared-uniform" (ScaLearn++ / Uniform++: the same ω at every
site of one kind, e.g. every layer's q_proj, tied while training). Init ω ~ N(init_scale / N, init_std)
(the paper's scale 2 for N sources); no softmax: ω is unconstrained; dropout on ω while training.

Tensors at a site: "omega" [N, d] (vector) or [N, 1] (uniform), trainable; and the sources' own
tensors, frozen, under "s<i>_" (e.g. "s0_lora_A"), stored with the composition so that it loads,
serves and moves as one folder. The config pins each source's name, method config and content
fingerprint (a store refuses a composition whose source was since replaced or deleted).

The pool runs each source through its own family's pool (one slot each) on the rows routed to the
composition and adds the ω-weighted changes: every family's kernel is reused, and a row may use a
composition while the next uses one of its sources alone.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ..errors import ConfigError
from .base import (ATTACH_INPUT, ATTACH_OUTPUT, Method, SiteInfo, TensorKind, config_from_dict,
                   config_to_dict, tuple_fields)

VARIANTS = ("vector", "uniform", "shared", "shared-uniform")
STAGE_COMPOSED = 35       # after the sources' own stages (delta 10, scale 20, series 30): it reads y so far


@dataclass(frozen=True)
class ScaLearnConfig:
    sources: tuple[str, ...]                       # source adapter names, in ω's order
    source_configs: tuple[str, ...]                # each source's method config, canonical JSON
    target_modules: tuple[str, ...] | str          # the sites the sources share
    fingerprints: tuple[str, ...] = ()             # each source's content fingerprint ("" = not pinned)
    exclude_modules: tuple[str, ...] | str | None = None
    variant: str = "vector"
    init_scale: float = 2.0
    init_std: float = 0.001
    dropout: float = 0.0                           # on ω, while training
    type: ClassVar[str] = "scalearn"

    def __post_init__(self) -> None:
        tuple_fields(self, "sources", "source_configs", "target_modules", "fingerprints", "exclude_modules")
        if not self.sources:
            raise ConfigError("a ScaLearn composition needs at least one source adapter")
        if len(self.source_configs) != len(self.sources):
            raise ConfigError(f"ScaLearn: {len(self.sources)} sources but {len(self.source_configs)} source configs")
        if self.fingerprints and len(self.fingerprints) != len(self.sources):
            raise ConfigError(f"ScaLearn: {len(self.sources)} sources but {len(self.fingerprints)} fingerprints")
        if len(set(self.sources)) != len(self.sources):
            raise ConfigError(f"ScaLearn sources must differ; got {list(self.sources)}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"ScaLearn variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"ScaLearn dropout must be in [0, 1), got {self.dropout}")
        for name, text in zip(self.sources, self.source_configs):
            if json.loads(text).get("type") == self.type:
                raise ConfigError(f"ScaLearn source {name!r} is itself a ScaLearn composition; compose its "
                                  "sources directly")

    @property
    def uniform(self) -> bool:
        return self.variant in ("uniform", "shared-uniform")

    @property
    def shared(self) -> bool:
        return self.variant.startswith("shared")

    def source(self, i: int) -> tuple[Method, Any]:
        """(method, config) of source i."""
        return _parse_source(self.source_configs[i])

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ScaLearnConfig":
        return config_from_dict(cls, data, "ScaLearn")


@functools.lru_cache(maxsize=256)
def _parse_source(text: str) -> tuple[Method, Any]:
    from .registry import config_from_dict as parse, get_method    # the registry imports this module

    cfg = parse(json.loads(text))
    return get_method(cfg.type), cfg


def source_config_json(config: Any) -> str:
    """A source's config as the canonical JSON a ScaLearnConfig keeps."""
    return json.dumps(config.to_dict(), sort_keys=True)


def _prefix(i: int) -> str:
    return f"s{i}_"


class ScaLearn(Method):
    name = "scalearn"
    title = "ScaLearn"
    config_cls = ScaLearnConfig
    stage = STAGE_COMPOSED
    attach = ATTACH_OUTPUT

    def attach_at(self, config: ScaLearnConfig, site: str) -> str:
        """Where the sources attach at this site; they must agree (a composition of sources that attach
        differently, e.g. LoRA on a Linear and a bottleneck around a block, shares no site)."""
        ways = {m.attach_at(c, site) for m, c in (config.source(i) for i in range(len(config.sources)))}
        if len(ways) != 1:
            raise ConfigError(f"ScaLearn sources attach to {site} in different ways ({sorted(ways)}); compose "
                              "sources of one attachment (LoRA with LoRA or IA3 outputs, bottleneck with bottleneck)")
        return ways.pop()

    def tensor_kinds(self, config: ScaLearnConfig) -> dict[str, TensorKind]:
        kinds = {"omega": TensorKind()}
        for i in range(len(config.sources)):
            method, cfg = config.source(i)
            for key, kind in method.tensor_kinds(cfg).items():
                kinds[_prefix(i) + key] = TensorKind(dtype=kind.dtype, trainable=False)
        return kinds

    def width(self, config: ScaLearnConfig, site: SiteInfo) -> int:
        """ω's width at a site: 1 (uniform), else the width of what the site's sources change."""
        if config.uniform:
            return 1
        return site.in_features if self.attach_at(config, site.name) == ATTACH_INPUT else site.out_features

    def tensor_shapes(self, config: ScaLearnConfig, site: SiteInfo) -> dict[str, tuple[int, ...]]:
        shapes = {"omega": (len(config.sources), self.width(config, site))}
        for i in range(len(config.sources)):
            method, cfg = config.source(i)
            shapes.update({_prefix(i) + k: v for k, v in method.tensor_shapes(cfg, site).items()})
        return shapes

    def check_fit(self, config: ScaLearnConfig, site: SiteInfo, tensors: Mapping[str, torch.Tensor],
                  adapter_name: str, module_name: str) -> None:
        """ω's shape here, then each source's own check (a family may allow shapes that vary: sparse)."""
        from ..errors import BaseMismatchError

        want = (len(config.sources), self.width(config, site))
        if "omega" in tensors and tuple(tensors["omega"].shape) != want:
            raise BaseMismatchError(f"adapter {adapter_name!r} does not fit this base at {module_name}: omega is "
                                    f"{tuple(tensors['omega'].shape)}, the base needs {want}; it was made for "
                                    "another base model")
        for i in range(len(config.sources)):
            method, cfg = config.source(i)
            method.check_fit(cfg, site, self.source_tensors(tensors, i), adapter_name, module_name)

    def check_tensors(self, config: ScaLearnConfig, site: str, tensors: Mapping[str, torch.Tensor],
                      where: str) -> None:
        super().check_tensors(config, site, tensors, where)
        for i in range(len(config.sources)):
            method, cfg = config.source(i)
            method.check_tensors(cfg, site, self.source_tensors(tensors, i), f"{where} (source {config.sources[i]!r})")

    def init_tensors(self, config: ScaLearnConfig, site: SiteInfo, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """ω ~ N(init_scale / N, init_std); the sources' tensors from their own init (a composition of real
        sources replaces them with the sources' tensors: compose())."""
        n = len(config.sources)
        out = {"omega": config.init_scale / n + config.init_std * torch.randn((n, self.width(config, site)),
                                                                             generator=gen)}
        for i in range(n):
            method, cfg = config.source(i)
            out.update({_prefix(i) + k: t for k, t in method.init_tensors(cfg, site, gen).items()})
        return out

    def tied(self, config: ScaLearnConfig, sites: list[str]) -> list[tuple[str, list[str]]]:
        """Shared variants: one ω for every site of a kind (the module name without its layer index)."""
        if not config.shared:
            return []
        kinds: dict[str, list[str]] = {}
        for site in sites:
            kinds.setdefault(re.sub(r"\.\d+\.", ".", site), []).append(site)
        return [("omega", group) for group in kinds.values() if len(group) > 1]

    def source_tensors(self, tensors: Mapping[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        p = _prefix(i)
        return {k[len(p):]: t for k, t in tensors.items() if k.startswith(p)}

    def make_pool(self, site: SiteInfo, capacity: int) -> "ScaLearnPool":
        return ScaLearnPool(site, capacity)

    def reference(self, config: ScaLearnConfig, site: SiteInfo, tensors: Mapping[str, torch.Tensor],
                  x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """base + Σ_i ω_i ⊙ (source_i(x, y) - base) in float64 (base: y, or x at an input site)."""
        base = (x if y is None else y).double()
        omega = tensors["omega"].double()
        out = base.clone()
        for i in range(len(config.sources)):
            method, cfg = config.source(i)
            out = out + omega[i] * (method.reference(cfg, site, self.source_tensors(tensors, i), x, y) - base)
        return out

    def summary(self, config: ScaLearnConfig, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
        return f"scalearn {config.variant} over {', '.join(config.sources)} on {len(tensors)} sites"


class ScaLearnPool:
    """All ScaLearn compositions at one site, by slot. Each holds ω (the adapter's own tensor: gradients
    reach it) and one single-slot pool of its family per source. A step runs, per composition in it,
    each source on the units routed to the composition (weight 1), and adds Σ_i w ω_i ⊙ a_i with w the
    unit's weight of the composition."""

    def __init__(self, site: SiteInfo, capacity: int) -> None:
        self.site = site
        self.held: dict[int, tuple[ScaLearnConfig, torch.Tensor, list[Any]]] = {}

    def __len__(self) -> int:
        return len(self.held)

    def add(self, slot: int, config: ScaLearnConfig, tensors: Mapping[str, torch.Tensor], site_name: str) -> None:
        pools = []
        for i in range(len(config.sources)):
            method, cfg = config.source(i)
            pool = method.make_pool(self.site, 1)
            pool.add(1, cfg, SCALEARN.source_tensors(tensors, i), site_name)
            pools.append(pool)
        self.held[slot] = (config, tensors["omega"], pools)

    def remove(self, slot: int) -> None:
        self.held.pop(slot, None)

    def resize(self, capacity: int) -> None:
        pass                                  # every composition has its own single-slot source pools

    def refresh(self, slot: int) -> None:
        pass                                  # ω is read live; the sources are frozen

    def apply(self, x: torch.Tensor, y: torch.Tensor | None, batch: Any, training: bool) -> torch.Tensor:
        from ..core.batching import build_batch

        base = x if y is None else y
        out = base
        for slot in batch.unique:
            if slot not in self.held:
                continue
            config, omega, pools = self.held[slot]
            key = ("scalearn-units", slot)
            if key not in batch.memo:           # the units routed to this composition, at weight 1
                units = (batch.ids == slot).any(dim=1).long()[:, None]
                batch.memo[key] = build_batch(units, mode=batch.mode, kernel="dense", dtype=batch.dtype,
                                              device=batch.device)
            sub = batch.memo[key]
            w = batch.slot_weights[slot]                                      # [n, 1, 1]
            if training and config.dropout > 0:
                omega = torch.nn.functional.dropout(omega, config.dropout, training=True)
            shape = batch.view_input(base).shape
            change = torch.zeros(shape, dtype=base.dtype, device=base.device)
            for i, pool in enumerate(pools):
                if y is None:
                    a = pool.apply(x.clone(), None, sub, False) - x
                else:
                    a = pool.apply(x, y.clone(), sub, False) - y
                change = change + omega[i].to(base.dtype) * batch.view_input(a)
            out = out + (w.to(base.dtype) * change).reshape(base.shape)
        return out


SCALEARN = ScaLearn()
