"""AdapterFusion (Pfeiffer et al. 2021), the baseline ScaLearn is measured against: at every site the
frozen sources share, per token, attention over the sources' outputs o_i there:

    q = y Wq^T,  k_i = o_i Wk^T,  α = softmax_i(q · k_i),  y' = Σ_i α_i (o_i Wv^T)

(at an input site, x for y). Wv starts as the identity and Wq, Wk ~ N(0, init_std), so a fresh fusion is
near the mean of the sources' outputs (y + mean_i a_i); the softmax temperature is 1 (the paper's
implementation anneals it; not here). Own tensors "query", "key", "value" [d, d] (Linear layout, d the
site's width): 3 d^2 trainable per site, against ScaLearn's N d. The sources are composed.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch

from .base import SiteInfo, TensorKind, config_from_dict, config_to_dict
from .composed import ComposedMethod, check_composed_config

PROJECTIONS = ("query", "key", "value")


@dataclass(frozen=True)
class FusionConfig:
    sources: tuple[str, ...]                       # source adapter names
    source_configs: tuple[str, ...]                # each source's method config, canonical JSON
    target_modules: tuple[str, ...] | str          # the sites the sources share
    fingerprints: tuple[str, ...] = ()             # each source's content fingerprint ("" = not pinned)
    exclude_modules: tuple[str, ...] | str | None = None
    init_std: float = 0.02                         # of Wq and Wk (Wv: the identity)
    type: ClassVar[str] = "fusion"

    def __post_init__(self) -> None:
        check_composed_config(self, "AdapterFusion")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FusionConfig":
        return config_from_dict(cls, data, "AdapterFusion")


class Fusion(ComposedMethod):
    name = "fusion"
    title = "AdapterFusion"
    config_cls = FusionConfig

    def own_kinds(self, config: FusionConfig) -> dict[str, TensorKind]:
        return {k: TensorKind() for k in PROJECTIONS}

    def own_shapes(self, config: FusionConfig, site: SiteInfo) -> dict[str, tuple[int, ...]]:
        d = self.site_width(config, site)
        return {k: (d, d) for k in PROJECTIONS}

    def own_init(self, config: FusionConfig, site: SiteInfo, gen: torch.Generator) -> dict[str, torch.Tensor]:
        d = self.site_width(config, site)
        return {"query": config.init_std * torch.randn((d, d), generator=gen),
                "key": config.init_std * torch.randn((d, d), generator=gen), "value": torch.eye(d)}

    def combine(self, config: FusionConfig, own: Mapping[str, torch.Tensor], base: torch.Tensor,
                outs: Sequence[torch.Tensor], training: bool) -> torch.Tensor:
        # q · k_i = q · (o_i Wk^T) = (q Wk) · o_i, and Σ α_i (o_i Wv^T) = (Σ α_i o_i) Wv^T: three d x d
        # products per token whatever the number of sources (not 2N + 1)
        stacked = torch.stack(list(outs), dim=-2)                            # [n, L, N, d]
        qk = (base @ own["query"].t()) @ own["key"]                           # [n, L, d]
        alpha = (stacked * qk.unsqueeze(-2)).sum(-1).softmax(dim=-1)          # [n, L, N]
        return (alpha.unsqueeze(-1) * stacked).sum(-2) @ own["value"].t()     # [n, L, d]

    def summary(self, config: FusionConfig, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
        return f"fusion over {', '.join(config.sources)} on {len(tensors)} sites"


FUSION = Fusion()
