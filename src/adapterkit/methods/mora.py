"""MoRA-style continual learning: a low-rank update made of rank-1 experts that activate themselves.

Each of the E experts is a pair (a_i [d_in], b_i [d_out]). For a token x, expert i scores itself by its
normalised projection s_i = a_i·x / ||a_i||; the token keeps the top_k experts by |s_i| whose |s_i| is at
least `threshold` (the pruning threshold), and

    y' = y + scale · Σ_{i kept} (a_i·x) b_i                       scale = alpha / r

Tasks arrive one by one: `train --method mora --continue-from NAME` keeps NAME's experts, frozen (kinds
A_old / B_old: never trained, still selectable), and appends r fresh experts (A / B) for the new task. The
selection makes the update depend on x beyond linearity: it is not merged into the base (delta_kind None).
Tensors per site: A_old [F, d_in], B_old [d_out, F] (F = `frozen`, 0 for the first task), A [r, d_in],
B [d_out, r].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ..errors import ConfigError
from .base import STAGE_DELTA, Method, SiteInfo, TensorKind, config_from_dict, config_to_dict, tuple_fields
from .kernels import HeldPool, routed

INITS = ("default", "nonzero")


@dataclass(frozen=True)
class MoraConfig:
    r: int = 8                            # experts this task adds
    alpha: float = 16.0
    top_k: int = 4                        # experts a token may activate
    threshold: float = 0.0                # |normalised score| below this: the expert stays off
    frozen: int = 0                       # experts of earlier tasks (frozen)
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    exclude_modules: tuple[str, ...] | str | None = None
    init: str = "default"                 # "default": B = 0 (no change at start); "nonzero": B ~ N(0, init_std)
    init_std: float = 0.02
    type: ClassVar[str] = "mora"

    def __post_init__(self) -> None:
        tuple_fields(self, "target_modules", "exclude_modules")
        for field, low in (("r", 1), ("top_k", 1), ("frozen", 0)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"MoRA {field} must be an integer >= {low}, got {value!r}")
        if not self.threshold >= 0:
            raise ConfigError(f"MoRA threshold must be >= 0 (a |normalised score|), got {self.threshold!r}")
        if self.init not in INITS:
            raise ConfigError(f"MoRA init must be one of {INITS}, got {self.init!r}")
        if not self.target_modules:
            raise ConfigError("MoRA target_modules is empty: name the Linear layers to adapt")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MoraConfig":
        return config_from_dict(cls, data, "MoRA")


def experts(tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [E, d_in], B [d_out, E]): the frozen experts, then this task's."""
    return (torch.cat([tensors["A_old"].to(tensors["A"]), tensors["A"]], 0),
            torch.cat([tensors["B_old"].to(tensors["B"]), tensors["B"]], 1))


def mora_update(config: MoraConfig, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """scale · Σ_{kept i} (a_i·x) b_i for x [..., d_in] (a [E, d_in], b [d_out, E]) -> [..., d_out]."""
    h = x @ a.to(x.dtype).t()                                                 # [..., E]
    score = (h / a.to(x.dtype).norm(dim=1).clamp_min(1e-12)).abs().detach()   # selection takes no gradient
    k = min(config.top_k, a.shape[0])
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(k, dim=-1).indices, True)
    keep &= score >= config.threshold
    return config.scale * ((h * keep.to(h.dtype)) @ b.to(x.dtype).t())


class Mora(Method):
    name = "mora"
    title = "MoRA"
    config_cls = MoraConfig
    stage = STAGE_DELTA
    delta_kind = None
    merge_ops = frozenset()

    def tensor_kinds(self, config: MoraConfig) -> dict[str, TensorKind]:
        return {"A_old": TensorKind(trainable=False), "B_old": TensorKind(trainable=False), "A": TensorKind(),
                "B": TensorKind()}

    def tensor_shapes(self, config: MoraConfig, site: SiteInfo) -> dict[str, tuple[int, ...]]:
        return {"A_old": (config.frozen, site.in_features), "B_old": (site.out_features, config.frozen),
                "A": (config.r, site.in_features), "B": (site.out_features, config.r)}

    def init_tensors(self, config: MoraConfig, site: SiteInfo, gen: torch.Generator) -> dict[str, torch.Tensor]:
        a = torch.empty(config.r, site.in_features).uniform_(-1, 1, generator=gen) / site.in_features ** 0.5
        b = torch.zeros(site.out_features, config.r)
        if config.init == "nonzero":
            b.normal_(0.0, config.init_std, generator=gen)
        return {"A_old": torch.zeros(config.frozen, site.in_features),
                "B_old": torch.zeros(site.out_features, config.frozen), "A": a, "B": b}

    def make_pool(self, site: SiteInfo, capacity: int) -> "MoraPool":
        return MoraPool(site)

    def reference(self, config: MoraConfig, site: SiteInfo, tensors: Mapping[str, torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor | None) -> torch.Tensor:
        a, b = experts({k: t.double() for k, t in tensors.items()})
        return y.double() + mora_update(config, a, b, x.double())

    def summary(self, config: MoraConfig, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
        return (f"mora {config.frozen + config.r} experts ({config.frozen} frozen + {config.r} new), top-{config.top_k}"
                + (f", threshold {config.threshold:g}" if config.threshold else ""))


class MoraPool(HeldPool):
    """All MoRA adapters at one Linear, by slot (their own tensors: gradients reach A and B)."""

    def hold(self, config: MoraConfig, tensors: Mapping[str, torch.Tensor]) -> Any:
        return config, tensors

    def apply(self, x: torch.Tensor, y: torch.Tensor, batch: Any, training: bool) -> torch.Tensor:
        x3, y3 = batch.view_input(x), batch.view_input(y)

        def fn(held: Any, t: torch.Tensor) -> torch.Tensor:
            config, tensors = held
            a, b = experts(tensors)
            return mora_update(config, a, b, t)
        return routed(batch, self.held, fn, x3, y3).reshape(y.shape)


def continue_from(previous: Any, config_changes: Mapping[str, Any] | None = None) -> MoraConfig:
    """The config of the next task's adapter: the previous adapter's experts all frozen, r new ones."""
    c = previous.config
    if c.type != "mora":
        raise ConfigError(f"--continue-from {previous.name!r}: it is {previous.method.an_adapter}; MoRA continues "
                          "from a MoRA adapter (train the first task with --method mora)")
    from dataclasses import replace

    return replace(c, frozen=c.frozen + c.r, **dict(config_changes or {}))


def carried_tensors(previous: Any, fresh: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Per site: the previous adapter's experts (all of them) as A_old / B_old, the fresh A / B."""
    out = {}
    for site, parts in fresh.items():
        old = previous.tensors.get(site)
        if old is None:
            raise ConfigError(f"--continue-from {previous.name!r} has no experts at {site}; continue with its "
                              "targets")
        a, b = experts(old)
        out[site] = {"A_old": a.detach().clone(), "B_old": b.detach().clone(), "A": parts["A"], "B": parts["B"]}
    return out


MORA = Mora()
