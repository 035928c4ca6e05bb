"""PEFT's LoRA format, both directions: adapter_config.json + adapter_model.safetensors.

Tensor keys: "base_model.model.<module path>.lora_A.weight" [r, d_in] and ".lora_B.weight"
[d_out, r] (PEFT strips the adapter name when saving; an inner ".<adapter>" segment is accepted).
Config keys that change the forward pass and that adapterkit does not implement are refused by
name; keys that only concern PEFT's training set-up are ignored; unknown keys warn.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import ConfigError, CorruptAdapterError, UnsupportedError
from ..methods import name_matches
from ..methods.lora import LoraConfig
from ..safetensors_io import read_tensors, write_tensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<site>.+)\.(?P<part>lora_A|lora_B)(?:\.[A-Za-z0-9_-]+)?\.weight$")

# Keys with a meaning we implement (read into LoraConfig).
_READ = {"peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "lora_dropout",
         "fan_in_fan_out", "use_rslora", "rank_pattern", "alpha_pattern"}
# Keys that only describe PEFT's training/initialisation set-up: no effect on a loaded adapter.
_IGNORED = {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "init_lora_weights", "loftq_config", "eva_config", "corda_config",
            "lora_ga_config", "runtime_config", "megatron_core", "layers_to_transform",
            "layers_pattern", "qalora_group_size", "ensure_weight_tying"}
# Keys that change the forward pass: allowed only at their neutral value.
_NEUTRAL = {
    "use_dora": (False, None), "bias": ("none", None), "modules_to_save": (None, ()),
    "lora_bias": (False, None), "target_parameters": (None, ()), "layer_replication": (None, ()),
    "trainable_token_indices": (None,), "use_qalora": (False, None), "alora_invocation_tokens": (None,),
    "megatron_config": (None,), "velora_config": (None,), "monteclora_config": (None,),
    "kasa_config": (None,), "arrow_config": (None,), "use_bdlora": (None, False),
}
_FEATURE = {"use_dora": "DoRA (use_dora=true)", "bias": "trained biases (bias != 'none')",
            "modules_to_save": "extra full modules (modules_to_save)", "lora_bias": "LoRA bias (lora_bias=true)",
            "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
            "layer_replication": "layer replication", "trainable_token_indices": "trainable tokens",
            "use_qalora": "QA-LoRA", "alora_invocation_tokens": "activated LoRA (aLoRA)",
            "megatron_config": "Megatron parallel layers", "velora_config": "VeLoRA",
            "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA", "arrow_config": "Arrow routing",
            "use_bdlora": "BD-LoRA"}


def _neutral(key: str, value: Any) -> bool:
    if isinstance(value, (list, tuple, dict)) and not value:
        return True
    return value in _NEUTRAL[key]


def config_from_peft(data: Mapping[str, Any], source: str = "adapter_config.json") -> LoraConfig:
    peft_type = str(data.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UnsupportedError(
            f"{source}: PEFT method {data.get('peft_type')!r} is not supported; adapterkit reads "
            "PEFT LoRA adapters (peft_type 'LORA')"
        )
    for key in _NEUTRAL:
        if key in data and not _neutral(key, data[key]):
            raise UnsupportedError(
                f"{source}: {_FEATURE[key]} is not supported ({key}={data[key]!r}); "
                "re-train the adapter as plain LoRA"
            )
    unknown = sorted(set(data) - _READ - _IGNORED - set(_NEUTRAL))
    if unknown:
        warnings.warn(f"{source}: ignoring unknown PEFT config key(s) {unknown}", UserWarning, stacklevel=3)
    target = data.get("target_modules")
    if target is None:
        raise ConfigError(f"{source}: target_modules is missing")
    return LoraConfig(
        r=data.get("r", 8),
        alpha=data.get("lora_alpha", 8),
        target_modules=target if isinstance(target, str) else tuple(target),
        exclude_modules=data.get("exclude_modules"),
        dropout=float(data.get("lora_dropout", 0.0) or 0.0),
        use_rslora=bool(data.get("use_rslora", False)),
        rank_pattern=dict(data.get("rank_pattern") or {}),
        alpha_pattern=dict(data.get("alpha_pattern") or {}),
        fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
    )


def config_to_peft(config: LoraConfig, base_name: str | None) -> dict[str, Any]:
    target = config.target_modules
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_name,
        "r": config.r,
        "lora_alpha": config.alpha,
        "target_modules": target if isinstance(target, str) else list(target),
        "exclude_modules": (list(config.exclude_modules)
                            if isinstance(config.exclude_modules, tuple) else config.exclude_modules),
        "lora_dropout": config.dropout,
        "fan_in_fan_out": config.fan_in_fan_out,
        "use_rslora": config.use_rslora,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def read_peft(path: str | Path) -> tuple[LoraConfig, dict[str, dict[str, torch.Tensor]]]:
    """Config and per-site tensors {site: {"lora_A": [r, d_in], "lora_B": [d_out, r]}}."""
    path = Path(path)
    cfg_path, w_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise CorruptAdapterError(f"{path} has no {CONFIG_FILE}: not a PEFT adapter folder")
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptAdapterError(f"{cfg_path} is not valid JSON ({exc}); re-save the adapter") from None
    config = config_from_peft(data, str(cfg_path))
    if not w_path.is_file():
        hint = " (pickled adapter_model.bin files are not read: convert to safetensors)" \
            if (path / "adapter_model.bin").exists() else ""
        raise CorruptAdapterError(f"{path} has no {WEIGHTS_FILE}{hint}")
    flat = read_tensors(w_path)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        m = _KEY.match(key)
        if m is None:
            what = ("LoRA on embedding layers" if "lora_embedding" in key else
                    "DoRA magnitude vectors" if "lora_magnitude_vector" in key else
                    "extra saved modules (modules_to_save)" if "modules_to_save" in key or not "lora_" in key else
                    "LoRA biases" if key.endswith(".bias") else f"tensor {key!r}")
            raise UnsupportedError(f"{w_path}: {what} are not supported (key {key!r})")
        tensors.setdefault(m["site"], {})[m["part"]] = value
    for site, parts in tensors.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise CorruptAdapterError(f"{w_path}: site {site!r} has {sorted(parts)}, needs lora_A and lora_B")
        a, b = parts["lora_A"], parts["lora_B"]
        for part, t in parts.items():
            if not t.is_floating_point():
                raise CorruptAdapterError(f"{w_path}: {site}.{part} is {str(t.dtype).removeprefix('torch.')}; LoRA "
                                          "weights are floating point: re-save the adapter")
        if not targeted(site, config):
            raise CorruptAdapterError(
                f"{w_path}: site {site!r} is not matched by target_modules {config.target_modules!r} "
                f"(exclude_modules {config.exclude_modules!r}) in {CONFIG_FILE}: PEFT would not load its weights; "
                "fix target_modules or re-save the adapter")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CorruptAdapterError(
                f"{w_path}: site {site!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                "expected [r, d_in] and [d_out, r]"
            )
        if a.shape[0] != config.rank(site):
            raise CorruptAdapterError(
                f"{w_path}: site {site!r} has rank {a.shape[0]} but the config says {config.rank(site)} "
                "(check r / rank_pattern)"
            )
    if not tensors:
        raise CorruptAdapterError(f"{w_path} holds no LoRA tensors")
    return config, tensors


def targeted(site: str, config: LoraConfig) -> bool:
    """Whether PEFT would put a LoRA layer at `site` (a module path) under this config's target_modules
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


def write_peft(path: Path, config: LoraConfig, tensors: Mapping[str, Mapping[str, torch.Tensor]],
               base_name: str | None) -> None:
    """Write the two PEFT files into an existing folder (callers make it atomic). base_model_name_or_path
    is what PEFT, vLLM and LoRAX resolve: a built-in's name (or a local folder that records a hub id)
    is written as its upstream hub id; anything else (a hub id, a folder path) as given."""
    from ..base import upstream_id

    base_model = upstream_id(base_name) or base_name
    (path / CONFIG_FILE).write_text(json.dumps(config_to_peft(config, base_model), indent=2), encoding="utf-8")
    flat = {f"{PREFIX}{site}.{part}.weight": t for site, parts in tensors.items() for part, t in parts.items()}
    write_tensors(path / WEIGHTS_FILE, flat)
