"""Four toy families, written only against the method contract (methods/base.py), one per attachment
and stage, so the contract is tested apart from LoRA: a new family really is one class plus a
registry line. Each keeps its tensors per slot and applies them per unit from the batch's views.

  offset   Linear output, stage delta:  y[..., idx] += w · val; idx int64, tag int64 (kept, unused)
  gain     Linear output, stage scale:  y *= 1 + Σ w (g - 1)
  inscale  Linear input:                x *= 1 + Σ w (s - 1)
  around   any module's output:         y += w · relu(y D) U   (a series block adapter)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from adapterkit.methods import registry
from adapterkit.methods.base import (ATTACH_INPUT, ATTACH_MODULE, ATTACH_OUTPUT, STAGE_DELTA, STAGE_SCALE,
                                     STAGE_SERIES, Method, SiteInfo, TensorKind)


@dataclass(frozen=True)
class ToyConfig:
    target_modules: tuple[str, ...] | str = ("q_proj",)
    exclude_modules: tuple[str, ...] | str | None = None
    tag: int = 0
    type: ClassVar[str] = "toy"

    def to_dict(self) -> dict[str, Any]:
        t = self.target_modules
        return {"type": self.type, "target_modules": t if isinstance(t, str) else list(t),
                "exclude_modules": self.exclude_modules, "tag": self.tag}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ToyConfig":
        data = {k: v for k, v in data.items() if k != "type"}
        t = data.get("target_modules", ("q_proj",))
        return cls(**{**data, "target_modules": t if isinstance(t, str) else tuple(t)})


def config_class(name: str) -> type:
    return type(f"{name.title()}Config", (ToyConfig,), {"type": name})


class ToyPool:
    """slot -> tensors; `fn(x, y, tensors, w [n,1,1]) -> new y (or x)` per adapter in the batch."""

    def __init__(self, site: SiteInfo, fn) -> None:
        self.site, self.fn, self.held = site, fn, {}

    def add(self, slot, config, tensors, site_name):
        self.held[slot] = dict(tensors)

    def remove(self, slot):
        self.held.pop(slot, None)

    def resize(self, capacity):
        pass

    def refresh(self, slot):
        pass

    def __len__(self):
        return len(self.held)

    def apply(self, x, y, batch, training):
        target = x if y is None else y
        out = batch.view_input(target)
        xin = batch.view_input(x)
        for slot, w in batch.slot_weights.items():
            if slot in self.held:
                out = self.fn(xin, out, self.held[slot], w.to(out.dtype))
        return out.reshape(target.shape)


class Toy(Method):
    name = title = "toy"

    def tensor_shapes(self, config, site):
        return {k: tuple(v) for k, v in self.shapes(site).items()}

    def make_pool(self, site, capacity):
        return ToyPool(site, self.apply)

    def summary(self, config, tensors):
        return f"{self.name} on {len(tensors)} sites"

    def reference(self, config, site, tensors, x, y):
        t = {k: (v.double() if v.is_floating_point() else v) for k, v in tensors.items()}
        one = torch.ones(1, 1, 1, dtype=torch.float64)
        target = x if y is None else y
        return self.apply(x.double().reshape(1, -1, x.shape[-1]), target.double().reshape(1, -1, target.shape[-1]),
                          t, one).reshape(target.shape)


class Offset(Toy):
    name = title = "offset"
    config_cls = config_class("offset")
    attach, stage = ATTACH_OUTPUT, STAGE_DELTA

    def tensor_kinds(self, config):
        return {"idx": TensorKind(torch.int64, trainable=False), "val": TensorKind(),
                "tag": TensorKind(torch.int64, trainable=False)}

    def shapes(self, site):
        return {"idx": (2,), "val": (2,), "tag": (1,)}

    def init_tensors(self, config, site, gen):
        return {"idx": torch.tensor([0, site.out_features - 1]), "val": torch.randn(2, generator=gen),
                "tag": torch.tensor([config.tag])}

    @staticmethod
    def apply(x, y, t, w):
        delta = torch.zeros(y.shape[-1], dtype=y.dtype, device=y.device)
        delta = delta.index_add(0, t["idx"], t["val"].to(y.dtype))
        return y + w * delta


class Gain(Toy):
    name = title = "gain"
    config_cls = config_class("gain")
    attach, stage = ATTACH_OUTPUT, STAGE_SCALE

    def tensor_kinds(self, config):
        return {"g": TensorKind()}

    def shapes(self, site):
        return {"g": (site.out_features,)}

    def init_tensors(self, config, site, gen):
        return {"g": 1 + 0.5 * torch.randn(site.out_features, generator=gen)}

    @staticmethod
    def apply(x, y, t, w):
        return y * (1 + w * (t["g"].to(y.dtype) - 1))


class InScale(Toy):
    name = title = "inscale"
    config_cls = config_class("inscale")
    attach = ATTACH_INPUT

    def tensor_kinds(self, config):
        return {"s": TensorKind()}

    def shapes(self, site):
        return {"s": (site.in_features,)}

    def init_tensors(self, config, site, gen):
        return {"s": 1 + 0.5 * torch.randn(site.in_features, generator=gen)}

    @staticmethod
    def apply(x, y, t, w):          # y is the input here (the pool passes x as the target)
        return y * (1 + w * (t["s"].to(y.dtype) - 1))


class Around(Toy):
    name = title = "around"
    config_cls = config_class("around")
    attach, stage = ATTACH_MODULE, STAGE_SERIES

    def tensor_kinds(self, config):
        return {"down": TensorKind(), "up": TensorKind()}

    def shapes(self, site):
        return {"down": (site.out_features, 4), "up": (4, site.out_features)}

    def init_tensors(self, config, site, gen):
        return {"down": torch.randn(site.out_features, 4, generator=gen) / site.out_features ** 0.5,
                "up": torch.randn(4, site.out_features, generator=gen)}

    @staticmethod
    def apply(x, y, t, w):
        return y + w * (torch.relu(y @ t["down"].to(y.dtype)) @ t["up"].to(y.dtype))


TOYS = [Offset(), Gain(), InScale(), Around()]


def register_toys() -> None:
    for toy in TOYS:
        registry.register_method(toy)


def unregister_toys() -> None:
    for toy in TOYS:
        registry._REGISTRY.pop(toy.name, None)
