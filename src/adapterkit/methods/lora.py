"""LoRA: ΔW = scale · B @ A with A [r, d_in], B [d_out, r]; scale = alpha / r (or alpha / sqrt(r)).

Tensors per site use PEFT's names and layout ("lora_A" [r, d_in], "lora_B" [d_out, r]) so the
PEFT format maps one to one. On a Conv2d, as PEFT: "lora_A" [r, C_in, kh, kw] (a conv of the base's
kernel, stride and padding), "lora_B" [C_out, r, 1, 1]; its weight-space form is the flattened
matrices B [C_out, r] @ A [r, C_in·kh·kw], so merges treat it as any LoRA site. The site pools (many
adapters at a site, mixed batches) are lora_pool.py and lora_conv_pool.py; this file is the config,
the tensors, ΔW and the PEFT codec.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch

from ..errors import ConfigError, CorruptAdapterError, UnsupportedError
from .base import STAGE_DELTA, Method, SiteInfo, TensorKind, pattern_value, config_from_dict, config_to_dict
from .lora_conv_pool import ConvLoraPool
from .lora_pool import LoraPool

INITS = ("default", "nonzero")


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "o_proj")
    exclude_modules: tuple[str, ...] | str | None = None
    dropout: float = 0.0
    use_rslora: bool = False
    # Kept for PEFT round trips only: the layout of each site is read from its module (Conv1D).
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # "default": A kaiming-uniform, B = 0 (the adapter starts as the identity, for training);
    # "nonzero": B ~ N(0, init_std) too, so the adapter changes the output (tests, benchmarks).
    init: str = "default"
    init_std: float = 0.02
    type: ClassVar[str] = "lora"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.exclude_modules, list):
            object.__setattr__(self, "exclude_modules", tuple(self.exclude_modules))
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        for key, value in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{key!r}]", value)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            raise ConfigError(f"LoRA init must be one of {INITS}, got {self.init!r}")
        if not self.target_modules:
            raise ConfigError("LoRA target_modules is empty: name the modules to adapt, e.g. ['q_proj', 'v_proj']")

    def rank(self, site: str) -> int:
        value = pattern_value(self.rank_pattern, site)
        return int(value) if value is not None else self.r

    def scale(self, site: str) -> float:
        value = pattern_value(self.alpha_pattern, site)
        alpha = float(value) if value is not None else float(self.alpha)
        r = self.rank(site)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoraConfig":
        return config_from_dict(cls, data, "LoRA")


def _check_rank(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"LoRA {what} must be a positive integer, got {value!r}: set r >= 1")


def _check_alpha(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"LoRA {what} must be a non-negative number, got {value!r}")


# ---------------------------------------------------------------------------- PEFT's LoRA config keys
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


class Lora(Method):
    name = "lora"
    title = "LoRA"
    config_cls = LoraConfig
    stage = STAGE_DELTA
    delta_kind = "low-rank"
    merge_ops = frozenset({"concat", "linear", "task_arithmetic", "ties", "magnitude_prune", "dare_linear",
                           "dare_ties", "reversible"})
    peft_type = "LORA"
    peft_parts = ("lora_A", "lora_B")
    site_kinds = frozenset({"linear", "conv"})

    def tensor_kinds(self, config: LoraConfig) -> dict[str, TensorKind]:
        return {"lora_A": TensorKind(), "lora_B": TensorKind()}

    def tensor_shapes(self, config: LoraConfig, site: SiteInfo) -> dict[str, tuple[int, ...]]:
        r = config.rank(site.name)
        if site.kind == "conv":
            (kh, kw), _, _ = site.conv
            return {"lora_A": (r, site.in_features, kh, kw), "lora_B": (site.out_features, r, 1, 1)}
        return {"lora_A": (r, site.in_features), "lora_B": (site.out_features, r)}

    def init_tensors(self, config: LoraConfig, site: SiteInfo, gen: torch.Generator) -> dict[str, torch.Tensor]:
        shapes = self.tensor_shapes(config, site)
        a = torch.empty(shapes["lora_A"])
        # PEFT's default: kaiming_uniform_(a=sqrt(5)) on A, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in =
        # d_in (a conv: C_in · kh · kw).
        bound = 1.0 / math.sqrt(math.prod(shapes["lora_A"][1:]))
        a.uniform_(-bound, bound, generator=gen)
        b = torch.zeros(shapes["lora_B"])
        if config.init == "nonzero":
            b.normal_(0.0, config.init_std, generator=gen)
        return {"lora_A": a, "lora_B": b}

    def make_pool(self, site: SiteInfo, capacity: int) -> LoraPool | ConvLoraPool:
        return ConvLoraPool(site, capacity) if site.kind == "conv" else LoraPool(site, capacity)

    def reference(self, config: LoraConfig, site: SiteInfo, tensors: Mapping[str, torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor | None) -> torch.Tensor:
        """y + scale · x Aᵀ Bᵀ in float64 (a conv: y + scale · conv(conv(x, A), B))."""
        a, b = tensors["lora_A"].double(), tensors["lora_B"].double()
        if site.kind == "conv":
            _, stride, padding = site.conv
            h = torch.nn.functional.conv2d(x.double(), a, None, stride, padding)
            return y.double() + config.scale(site.name) * torch.nn.functional.conv2d(h, b)
        return y.double() + config.scale(site.name) * (x.double() @ a.t() @ b.t())

    # ------------------------------------------------------------------ weight space
    def factors(self, config: LoraConfig, site: str, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
        """(scale · B [d_out, r], A [r, d_in]) in float32: ΔW = B @ A in LoRA's layout [d_out, d_in] (a conv's
        flattened: [C_out, C_in · kh · kw])."""
        a, b = tensors["lora_A"], tensors["lora_B"]
        return config.scale(site) * b.float().reshape(b.shape[0], -1), a.float().reshape(a.shape[0], -1)

    def site_shape(self, config: LoraConfig, site: str, tensors: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
        return int(tensors["lora_B"].shape[0]), math.prod(tensors["lora_A"].shape[1:])

    def rank(self, tensors: Mapping[str, torch.Tensor]) -> int:
        return int(tensors["lora_A"].shape[0])

    def from_factors(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                     fan_in_fan_out: bool = False) -> tuple[LoraConfig, dict[str, dict[str, torch.Tensor]]]:
        """A LoRA config and tensors with ΔW = B @ A at every site (scale 1 everywhere: alpha = rank per
        site). r is the most common site rank; other sites get exact (escaped) rank/alpha pattern keys."""
        from collections import Counter

        ranks = {s: b.shape[1] for s, (b, _) in factors.items()}
        r = Counter(ranks.values()).most_common(1)[0][0]
        odd = {re.escape(s): k for s, k in ranks.items() if k != r}
        config = LoraConfig(r=r, alpha=float(r), target_modules=tuple(factors), rank_pattern=odd,
                            alpha_pattern={k: float(v) for k, v in odd.items()}, fan_in_fan_out=fan_in_fan_out)
        tensors = {}
        for site, (b, a) in factors.items():
            s = config.scale(site)                       # 1.0 by construction; divided out for safety
            tensors[site] = {"lora_A": a.float().contiguous(), "lora_B": (b.float() / s).contiguous()}
        return config, tensors

    def delta_weight(self, config: LoraConfig, site: SiteInfo, tensors: Mapping[str, torch.Tensor],
                     base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW = scale · B @ A in the module's layout ([d_out, d_in]; transposed for Conv1D; a conv's
        [C_out, C_in, kh, kw])."""
        a, b = tensors["lora_A"].float(), tensors["lora_B"].float()
        if a.dim() == 4:
            return (config.scale(site.name) * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))).view(
                b.shape[0], *a.shape[1:])
        delta = config.scale(site.name) * (b @ a)
        return delta.t() if site.fan_in_fan_out else delta

    def max_delta(self, config: LoraConfig, site_name: str, tensors: Mapping[str, torch.Tensor],
                  limit: float) -> float:
        """max |scale · B @ A|: the bound scale · r · max|B| · max|A| when it is below `limit`, else exact
        (float64), so the usual case costs two max() and no matmul."""
        a, b = tensors["lora_A"].double(), tensors["lora_B"].double()
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)          # a conv's: flattened
        scale = config.scale(site_name)
        bound = scale * a.shape[0] * float(a.abs().max()) * float(b.abs().max())
        if bound <= limit:
            return bound
        return scale * float((b @ a).abs().max())

    # ------------------------------------------------------------------ description
    def summary(self, config: LoraConfig, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
        ranks = sorted({int(p["lora_A"].shape[0]) for p in tensors.values()})
        rank = f"r={ranks[0]}" if len(ranks) == 1 else f"r={ranks[0]}..{ranks[-1]}"
        rs = " rslora" if config.use_rslora else ""
        return f"lora {rank} alpha={config.alpha:g}{rs}"

    # ------------------------------------------------------------------ PEFT codec
    def config_from_peft(self, data: Mapping[str, Any], source: str) -> LoraConfig:
        for key in _NEUTRAL:
            if key in data and not _neutral(key, data[key]):
                raise UnsupportedError(
                    f"{source}: {_FEATURE[key]} is not supported ({key}={data[key]!r}); "
                    "re-train the adapter as plain LoRA"
                )
        unknown = sorted(set(data) - _READ - _IGNORED - set(_NEUTRAL))
        if unknown:
            warnings.warn(f"{source}: ignoring unknown PEFT config key(s) {unknown}", UserWarning, stacklevel=4)
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

    def config_to_peft(self, config: LoraConfig, base_model: str | None) -> dict[str, Any]:
        target = config.target_modules
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": base_model,
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

    def tensors_to_peft(self, config: LoraConfig, site: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"{part}.weight": t for part, t in tensors.items()}

    def unknown_peft_key(self, key: str) -> str:
        return ("LoRA on embedding layers" if "lora_embedding" in key else
                "DoRA magnitude vectors" if "lora_magnitude_vector" in key else
                "extra saved modules (modules_to_save)" if "modules_to_save" in key or "lora_" not in key else
                "LoRA biases" if key.endswith(".bias") else f"tensor {key!r}")

    def tensors_from_peft(self, config: LoraConfig, site: str, parts: Mapping[str, torch.Tensor],
                          where: str) -> dict[str, torch.Tensor]:
        if set(parts) != {"lora_A", "lora_B"}:
            raise CorruptAdapterError(f"{where}: site {site!r} has {sorted(parts)}, needs lora_A and lora_B")
        self.check_tensors(config, site, parts, where)
        a, b = parts["lora_A"], parts["lora_B"]
        linear = a.dim() == 2 and b.dim() == 2
        conv = a.dim() == 4 and b.dim() == 4 and tuple(b.shape[2:]) == (1, 1)      # PEFT's Conv2d LoRA
        if not (linear or conv) or a.shape[0] != b.shape[1]:
            raise CorruptAdapterError(
                f"{where}: site {site!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                "expected [r, d_in] and [d_out, r] (a Conv2d: [r, C_in, kh, kw] and [C_out, r, 1, 1])"
            )
        if a.shape[0] != config.rank(site):
            raise CorruptAdapterError(
                f"{where}: site {site!r} has rank {a.shape[0]} but the config says {config.rank(site)} "
                "(check r / rank_pattern)"
            )
        return {"lora_A": a, "lora_B": b}


LORA = Lora()
