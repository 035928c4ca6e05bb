"""A dense weight change of chosen Linear layers, ΔW [d_out, d_in] in LoRA's layout per site: a full
fine-tune of those matrices kept apart from the base. It is LT-SFT's dense phase (train/sft.py trains
one, keeps its K largest entries as a sparse adapter and drops it) and the form a full fine-tune's
difference takes before `sparse_from_dense`. Exactly mergeable; y += w · x ΔWᵀ per row (one matmul per
adapter in the step, on the rows routed to it). Large: d_out · d_in floats per site.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ..errors import ConfigError
from .base import STAGE_DELTA, Method, SiteInfo, TensorKind, config_from_dict, config_to_dict, tuple_fields
from .kernels import HeldPool, routed


@dataclass(frozen=True)
class FullConfig:
    target_modules: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "o_proj")
    exclude_modules: tuple[str, ...] | str | None = None
    init_std: float = 0.0                 # 0: ΔW = 0 (training); > 0: N(0, init_std) (tests)
    type: ClassVar[str] = "full"

    def __post_init__(self) -> None:
        tuple_fields(self, "target_modules", "exclude_modules")
        if not self.target_modules:
            raise ConfigError("full target_modules is empty: name the weight matrices to fine-tune")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FullConfig":
        return config_from_dict(cls, data, "full")


class Full(Method):
    name = "full"
    title = "full"
    config_cls = FullConfig
    stage = STAGE_DELTA
    delta_kind = "dense"
    merge_ops = frozenset()

    def tensor_kinds(self, config: FullConfig) -> dict[str, TensorKind]:
        return {"delta": TensorKind()}

    def tensor_shapes(self, config: FullConfig, site: SiteInfo) -> dict[str, tuple[int, ...]]:
        return {"delta": (site.out_features, site.in_features)}

    def init_tensors(self, config: FullConfig, site: SiteInfo, gen: torch.Generator) -> dict[str, torch.Tensor]:
        delta = torch.zeros(site.out_features, site.in_features)
        if config.init_std > 0:
            delta.normal_(0.0, config.init_std, generator=gen)
        return {"delta": delta}

    def make_pool(self, site: SiteInfo, capacity: int) -> "FullPool":
        return FullPool(site)

    def reference(self, config: FullConfig, site: SiteInfo, tensors: Mapping[str, torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor | None) -> torch.Tensor:
        return y.double() + x.double() @ tensors["delta"].double().t()

    def delta_weight(self, config: FullConfig, site: SiteInfo, tensors: Mapping[str, torch.Tensor],
                     base_weight: torch.Tensor | None = None) -> torch.Tensor:
        delta = tensors["delta"].float()
        return delta.t() if site.fan_in_fan_out else delta

    def max_delta(self, config: FullConfig, site_name: str, tensors: Mapping[str, torch.Tensor],
                  limit: float) -> float:
        return float(tensors["delta"].double().abs().max())

    def summary(self, config: FullConfig, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
        n = sum(int(p["delta"].numel()) for p in tensors.values())
        return f"full {n} entries on {len(tensors)} sites"


class FullPool(HeldPool):
    """All dense changes at one Linear, by slot (their own tensors: gradients reach them)."""

    def hold(self, config: FullConfig, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return tensors["delta"]

    def apply(self, x: torch.Tensor, y: torch.Tensor, batch: Any, training: bool) -> torch.Tensor:
        x3, y3 = batch.view_input(x), batch.view_input(y)
        return routed(batch, self.held, lambda delta, t: t @ delta.to(t.dtype).t(), x3, y3).reshape(y.shape)


FULL = Full()
