"""PEFT's adapter format, both directions: adapter_config.json + adapter_model.safetensors, for every
family PEFT and adapterkit share (dispatch by peft_type through the method registry).

Tensor keys: "base_model.model.<module path>.<part>[.<adapter>][.weight]" where <part> is one of the
family's PEFT parts (LoRA: lora_A / lora_B); PEFT strips the adapter name when saving, an inner
".<adapter>" segment is accepted. The family parses its config (refusing keys that change the forward
pass and that it does not implement) and checks its tensors; a PEFT method adapterkit does not have
(LoHa, say) is refused by name, never read as another.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CorruptAdapterError, UnsupportedError
from ..methods import method_for_peft, peft_types
from ..core.targets import name_matches
from ..methods.base import Method
from .safetensors_io import read_tensors, write_tensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def peft_method(data: Mapping[str, Any], source: str = CONFIG_FILE) -> Method:
    """The family of a PEFT config, by its peft_type; an unknown one is refused by name."""
    peft_type = str(data.get("peft_type", "")).upper()
    method = method_for_peft(peft_type) if peft_type else None
    if method is None:
        raise UnsupportedError(
            f"{source}: PEFT method {data.get('peft_type')!r} is not supported; adapterkit reads PEFT "
            f"{', '.join(peft_types())} adapters (peft_type {' or '.join(repr(t) for t in peft_types())})"
        )
    return method


def config_from_peft(data: Mapping[str, Any], source: str = CONFIG_FILE) -> Any:
    return peft_method(data, source).config_from_peft(data, source)


def config_to_peft(config: Any, base_name: str | None) -> dict[str, Any]:
    from ..methods import get_method

    return get_method(config.type).config_to_peft(config, base_name)


def read_peft(path: str | Path) -> tuple[Any, dict[str, dict[str, torch.Tensor]]]:
    """Config and per-site tensors {site: {tensor name: tensor}} (the family's names)."""
    path = Path(path)
    cfg_path, w_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise CorruptAdapterError(f"{path} has no {CONFIG_FILE}: not a PEFT adapter folder")
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptAdapterError(f"{cfg_path} is not valid JSON ({exc}); re-save the adapter") from None
    if not isinstance(data, dict):
        raise CorruptAdapterError(f"{cfg_path} is not a JSON object; re-save the adapter")
    method = peft_method(data, str(cfg_path))
    config = method.config_from_peft(data, str(cfg_path))
    if not w_path.is_file():
        hint = " (pickled adapter_model.bin files are not read: convert to safetensors)" \
            if (path / "adapter_model.bin").exists() else ""
        raise CorruptAdapterError(f"{path} has no {WEIGHTS_FILE}{hint}")
    key = re.compile(rf"^(?:base_model\.model\.)?(?P<site>.+)\.(?P<part>{'|'.join(method.peft_parts)})"
                     r"(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in read_tensors(w_path).items():
        m = key.match(name)
        if m is None or name.endswith(".bias"):
            raise UnsupportedError(f"{w_path}: {method.unknown_peft_key(name)} are not supported (key {name!r})")
        parts.setdefault(m["site"], {})[m["part"]] = value
    tensors = {}
    for site, found in parts.items():
        if not targeted(site, config):
            raise CorruptAdapterError(
                f"{w_path}: site {site!r} is not matched by target_modules {config.target_modules!r} "
                f"(exclude_modules {config.exclude_modules!r}) in {CONFIG_FILE}: PEFT would not load its weights; "
                "fix target_modules or re-save the adapter")
        tensors[site] = method.tensors_from_peft(config, site, found, str(w_path))
    if not tensors:
        raise CorruptAdapterError(f"{w_path} holds no {method.name} tensors")
    return config, tensors


def targeted(site: str, config: Any) -> bool:
    """Whether PEFT would put an adapter layer at `site` (a module path) under this config's target_modules
    and exclude_modules ("all-linear" needs the model to decide: taken as yes)."""
    if config.target_modules == "all-linear":
        return not name_matches(site, config.exclude_modules)
    return name_matches(site, config.target_modules) and not name_matches(site, config.exclude_modules)


def read_base_model(path: str | Path) -> str | None:
    """adapter_config.json's base_model_name_or_path (None when absent, not a string, or unreadable)."""
    try:
        data = json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else None


def write_peft(path: Path, config: Any, tensors: Mapping[str, Mapping[str, torch.Tensor]],
               base_name: str | None) -> None:
    """Write the two PEFT files into an existing folder (callers make it atomic). base_model_name_or_path
    is what PEFT, vLLM and LoRAX resolve: a built-in's name (or a local folder that records a hub id)
    is written as its upstream hub id; anything else (a hub id, a folder path) as given."""
    from ..core.base import upstream_id

    base_model = upstream_id(base_name) or base_name
    (path / CONFIG_FILE).write_text(json.dumps(config_to_peft(config, base_model), indent=2), encoding="utf-8")
    from ..methods import get_method

    method = get_method(config.type)
    flat = {f"{PREFIX}{site}.{suffix}": t for site, parts in tensors.items()
            for suffix, t in method.tensors_to_peft(config, site, parts).items()}
    write_tensors(path / WEIGHTS_FILE, flat)
