"""ScaLearn (Frohmann et al. 2023): a composition that learns only how much of each frozen source
adapter to use. At every site the sources share, with o_i the output source i makes there,

    y' = y + Σ_i ω_i ⊙ (o_i - y)          (at an input site, x' likewise)

Variants: "vector" (ω_i a vector per source and site: the site's output width), "uniform" (a scalar
per source and site), and "shared" / "shared-uniform" (ScaLearn++ / Uniform++: the same ω at every
site of one kind, e.g. every layer's q_proj, tied while training). Init ω ~ N(init_scale / N, init_std)
(the paper's scale 2 for N sources); no softmax: ω is unconstrained; dropout on ω while training.
Own tensor: "omega" [N, d] (vector) or [N, 1] (uniform); the sources are composed.py's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch

from ..errors import ConfigError
from .base import SiteInfo, TensorKind, config_from_dict, config_to_dict
from .composed import STAGE_COMPOSED, ComposedMethod, check_composed_config, source_config_json

__all__ = ["SCALEARN", "STAGE_COMPOSED", "ScaLearn", "ScaLearnConfig", "VARIANTS", "source_config_json"]

VARIANTS = ("vector", "uniform", "shared", "shared-uniform")


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
        check_composed_config(self, "ScaLearn")
        if self.variant not in VARIANTS:
            raise ConfigError(f"ScaLearn variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"ScaLearn dropout must be in [0, 1), got {self.dropout}")

    @property
    def uniform(self) -> bool:
        return self.variant in ("uniform", "shared-uniform")

    @property
    def shared(self) -> bool:
        return self.variant.startswith("shared")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ScaLearnConfig":
        return config_from_dict(cls, data, "ScaLearn")


class ScaLearn(ComposedMethod):
    name = "scalearn"
    title = "ScaLearn"
    config_cls = ScaLearnConfig

    def own_kinds(self, config: ScaLearnConfig) -> dict[str, TensorKind]:
        return {"omega": TensorKind()}

    def own_shapes(self, config: ScaLearnConfig, site: SiteInfo) -> dict[str, tuple[int, ...]]:
        return {"omega": (len(config.sources), 1 if config.uniform else self.site_width(config, site))}

    def own_init(self, config: ScaLearnConfig, site: SiteInfo, gen: torch.Generator) -> dict[str, torch.Tensor]:
        n = len(config.sources)
        shape = self.own_shapes(config, site)["omega"]
        return {"omega": config.init_scale / n + config.init_std * torch.randn(shape, generator=gen)}

    def combine(self, config: ScaLearnConfig, own: Mapping[str, torch.Tensor], base: torch.Tensor,
                outs: Sequence[torch.Tensor], training: bool) -> torch.Tensor:
        omega = own["omega"]
        if training and config.dropout > 0:
            omega = torch.nn.functional.dropout(omega, config.dropout, training=True)
        out = base
        for i, o in enumerate(outs):
            out = out + omega[i] * (o - base)
        return out

    def tied(self, config: ScaLearnConfig, sites: list[str]) -> list[tuple[str, list[str]]]:
        """Shared variants: one ω for every site of a kind (the module name without its layer index)."""
        if not config.shared:
            return []
        kinds: dict[str, list[str]] = {}
        for site in sites:
            kinds.setdefault(re.sub(r"\.\d+\.", ".", site), []).append(site)
        return [("omega", group) for group in kinds.values() if len(group) > 1]

    def summary(self, config: ScaLearnConfig, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
        return f"scalearn {config.variant} over {', '.join(config.sources)} on {len(tensors)} sites"


SCALEARN = ScaLearn()
