"""The method registry: one line per adapter family. The families import only methods/base.py,
so importing the registry imports each family once, with no cycle."""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import ConfigError, UnsupportedError
from .base import Method
from .bottleneck import BOTTLENECK
from .full import FULL
from .fusion import FUSION
from .ia3 import IA3
from .lora import LORA
from .mora import MORA
from .scalearn import SCALEARN
from .sparse import SPARSE

_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


register_method(LORA)
register_method(IA3)
register_method(BOTTLENECK)
register_method(SPARSE)
register_method(FULL)
register_method(SCALEARN)
register_method(FUSION)
register_method(MORA)


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnsupportedError(
            f"unknown adapter method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}"
        ) from None


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def method_for_peft(peft_type: str) -> Method | None:
    """The family PEFT calls `peft_type` (e.g. "LORA"), None if adapterkit has none."""
    return next((m for m in _REGISTRY.values() if m.peft_type == peft_type.upper()), None)


def peft_types() -> list[str]:
    return sorted(m.peft_type for m in _REGISTRY.values() if m.peft_type)


def config_from_dict(data: Mapping[str, Any]) -> Any:
    """Parse a method config by its explicit `type` field."""
    if "type" not in data:
        raise ConfigError(f"adapter config has no 'type' field (one of {method_names()})")
    return get_method(str(data["type"])).config_cls.from_dict(data)
