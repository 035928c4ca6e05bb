"""The method registry: one entry per adapter method, one file per method.

A method supplies (see `MethodSpec`): its frozen config class, the per-site tensors it creates, a
pool class that holds many adapters of the method at one site and applies them to a mixed batch,
and, where the method is linear in the weight, its ΔW for merging. Nothing here assumes a
low-rank delta: bottleneck, sparse and IA3 methods register the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import nn

from ..errors import ConfigError, TargetError, UnsupportedError


class SitePool(Protocol):
    """Many adapters of one method at one site, addressed by runtime slot (0 = no adapter)."""

    # site_name: the adapter's own name for the site (config patterns are matched against it).
    def add(self, slot: int, config: Any, tensors: Mapping[str, torch.Tensor], site_name: str) -> None: ...
    def remove(self, slot: int) -> None: ...
    def resize(self, capacity: int) -> None: ...
    def refresh(self, slot: int) -> None: ...
    def apply(self, x: torch.Tensor, y: torch.Tensor, batch: Any, training: bool) -> torch.Tensor: ...
    def __len__(self) -> int: ...


@dataclass(frozen=True)
class SiteInfo:
    """What a method needs to know about a wrapped module."""

    name: str              # module path in the base, e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int
    fan_in_fan_out: bool   # True for GPT-2 Conv1D: weight is [in, out]
    dtype: torch.dtype
    device: torch.device = torch.device("cpu")   # where the module's weight lives: pools keep their slots there


@dataclass(frozen=True)
class MethodSpec:
    name: str                                   # registry key and config `type`
    config_cls: type                            # frozen dataclass; `from_dict` / `to_dict`
    init_tensors: Callable[[Any, SiteInfo, torch.Generator], dict[str, torch.Tensor]]
    tensor_shapes: Callable[[Any, SiteInfo], dict[str, tuple[int, ...]]]
    make_pool: Callable[[SiteInfo, int], SitePool]   # (site, slot capacity) -> pool
    # ΔW in the module's weight layout, or None when the method is not linear in W.
    delta_weight: Callable[[Any, SiteInfo, Mapping[str, torch.Tensor]], torch.Tensor] | None
    peft_type: str | None = None                # PEFT's name for interchange, if any
    # (config, site, tensors, limit) -> max |ΔW| of a site (float64; an upper bound is enough when it
    # is <= limit): a finite adapter whose ΔW overflows the base dtype is refused at the door.
    max_delta: Callable[[Any, str, Mapping[str, torch.Tensor], float], float] | None = None


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnsupportedError(
            f"unknown adapter method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}"
        ) from None


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def config_from_dict(data: Mapping[str, Any]) -> Any:
    """Parse a method config by its explicit `type` field."""
    if "type" not in data:
        raise ConfigError(f"adapter config has no 'type' field (one of {method_names()})")
    return get_method(str(data["type"])).config_cls.from_dict(data)


# --------------------------------------------------------------------------- target modules

def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always ships it
        return None
    return Conv1D


def site_info(name: str, module: nn.Module) -> SiteInfo:
    """Dimensions of a Linear or GPT-2 Conv1D module; anything else is refused by name."""
    conv1d = _conv1d_type()
    if isinstance(module, nn.Linear):
        return SiteInfo(name, module.in_features, module.out_features, False, module.weight.dtype,
                        module.weight.device)
    if conv1d is not None and isinstance(module, conv1d):
        n_in, n_out = module.weight.shape
        return SiteInfo(name, n_in, n_out, True, module.weight.dtype, module.weight.device)
    raise UnsupportedError(
        f"target module {name!r} is a {type(module).__name__}; adapters wrap nn.Linear and "
        "transformers' Conv1D only: choose target_modules that name linear layers"
    )


def name_matches(name: str, patterns: str | tuple[str, ...] | list[str] | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def match_targets(
    model: nn.Module,
    target_modules: str | tuple[str, ...] | list[str],
    exclude_modules: str | tuple[str, ...] | list[str] | None = None,
) -> list[str]:
    """Module names a config targets (PEFT's rules: a list matches a name or a dotted suffix, a
    string is a full regex, "all-linear" is every linear layer but the output head)."""
    conv1d = _conv1d_type()
    linear_types = (nn.Linear,) + ((conv1d,) if conv1d is not None else ())
    names: list[str] = []
    if target_modules == "all-linear":
        head = _output_head_name(model)
        for name, module in model.named_modules():
            if isinstance(module, linear_types) and name != head and not name_matches(name, exclude_modules):
                names.append(name)
    else:
        for name, _ in model.named_modules():
            if name and name_matches(name, target_modules) and not name_matches(name, exclude_modules):
                names.append(name)
    if not names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, linear_types)})
        shown = target_modules if isinstance(target_modules, str) else list(target_modules)
        raise TargetError(
            f"target_modules {shown!r} match no module of the base model; "
            f"its linear layers are named: {', '.join(leaves)}"
        )
    return names


def _output_head_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


# Import the method files last so they can register themselves.
from . import lora  # noqa: E402,F401
