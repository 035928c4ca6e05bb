"""IA3 (Liu et al. 2022, "(IA)^3"): a learned vector l per site that scales a Linear's output
(y' = l ⊙ y, attention keys and values) or, at a "feedforward" site, its input (x' = l ⊙ x, the MLP
down projection). Initialised to ones, so a fresh adapter is the identity.

Tensor "ia3_l" in PEFT's layout: [d_out, 1] at an output site, [1, d_in] at a feedforward site, so
PEFT's format maps one to one. ΔW (exact, given the base weight): W ⊙ (l - 1) on the rows (output)
or the columns (input) of W, and b ⊙ (l - 1) for an output site's bias.

Weights. In a mixed batch a row with IA3 adapters i at weights w_i scales by 1 + Σ w_i (l_i - 1): the
weight scales the change, as a LoRA weight scales ΔW, so a top-k gate that mixes an IA3 adapter with a
LoRA adapter pulls the IA3 scale toward the identity. When the weights sum to 1 this equals PEFT's
`add_weighted_adapter` for IA3 (l = Σ w_i l_i), the definition the weight-space merges use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ..errors import ConfigError, CorruptAdapterError
from ..vision.mobilenet import MODEL_TYPE as MOBILENET, POINTWISE, PROJECTIONS
from .base import ATTACH_INPUT, ATTACH_OUTPUT, STAGE_SCALE, Method, SiteInfo, TensorKind, config_from_dict, config_to_dict, tuple_fields

INITS = ("default", "nonzero")
# PEFT's per-architecture defaults (peft.utils.constants TRANSFORMERS_MODELS_TO_IA3_*_MAPPING)
DEFAULT_TARGETS = {"llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
                   "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
                   "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
                   "bert": (("key", "value", "output.dense"), ("output.dense",)),
                   "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
                   # MobileNetV2 (an image base): the 1x1 convolutions, the projections' inputs scaled
                   MOBILENET: (POINTWISE, PROJECTIONS)}
# PEFT config keys: read, ignored (no effect on a loaded adapter), or refused unless neutral
_READ = {"peft_type", "target_modules", "feedforward_modules", "exclude_modules", "fan_in_fan_out"}
_IGNORED = {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
            "init_ia3_weights", "layers_to_transform", "layers_pattern"}
_NEUTRAL = {"modules_to_save": (None,)}


@dataclass(frozen=True)
class Ia3Config:
    target_modules: tuple[str, ...] | str = DEFAULT_TARGETS["llama"][0]
    # the targets whose INPUT is scaled (PEFT: must be a subset of target_modules)
    feedforward_modules: tuple[str, ...] | str = DEFAULT_TARGETS["llama"][1]
    exclude_modules: tuple[str, ...] | str | None = None
    fan_in_fan_out: bool = False          # kept for PEFT round trips; the layout is read from the module
    # "default": ones (the identity, for training); "nonzero": 1 + N(0, init_std) (tests, benchmarks)
    init: str = "default"
    init_std: float = 0.1
    type: ClassVar[str] = "ia3"

    def __post_init__(self) -> None:
        tuple_fields(self, "target_modules", "feedforward_modules", "exclude_modules")
        if not self.target_modules:
            raise ConfigError("IA3 target_modules is empty: name the modules to scale, e.g. ['k_proj', 'v_proj']")
        if self.init not in INITS:
            raise ConfigError(f"IA3 init must be one of {INITS}, got {self.init!r}")
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, tuple) and isinstance(targets, tuple) and not set(ff) <= set(targets):
            raise ConfigError(f"IA3 feedforward_modules {list(ff)} must be among target_modules {list(targets)} "
                              "(a feedforward module is a target whose input is scaled)")

    @classmethod
    def for_model(cls, model_type: str, **kwargs: Any) -> "Ia3Config":
        """PEFT's default targets for an architecture (llama, mistral, qwen2, bert, gpt2)."""
        if model_type not in DEFAULT_TARGETS:
            raise ConfigError(f"no IA3 default targets for a {model_type!r} model; give target_modules and "
                              f"feedforward_modules (defaults exist for {', '.join(sorted(DEFAULT_TARGETS))})")
        targets, ff = DEFAULT_TARGETS[model_type]
        return cls(target_modules=targets, feedforward_modules=ff, **kwargs)

    def feedforward(self, site: str) -> bool:
        """Whether the site's input (not output) is scaled: PEFT's rule (a regex string matches the whole
        name, a list matches the name or a dotted suffix)."""
        from ..core.targets import name_matches

        return name_matches(site, self.feedforward_modules)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Ia3Config":
        return config_from_dict(cls, data, "IA3")


class Ia3(Method):
    name = "ia3"
    title = "IA3"
    config_cls = Ia3Config
    stage = STAGE_SCALE                   # scales what the weight-linear deltas (LoRA) made
    delta_kind = "dense"                  # W ⊙ (l - 1): exact, needs the base weight
    merge_ops = frozenset({"linear"})
    peft_type = "IA3"
    peft_parts = ("ia3_l",)
    site_kinds = frozenset({"linear", "conv"})     # a conv: one scale per channel, PEFT's [1, C, 1, 1]
    shape_hint = (" (or one scales the site's input and the other its output: merge adapters with the same "
                  "feedforward_modules)")

    def attach_at(self, config: Ia3Config, site: str) -> str:
        return ATTACH_INPUT if config.feedforward(site) else ATTACH_OUTPUT

    def tensor_kinds(self, config: Ia3Config) -> dict[str, TensorKind]:
        return {"ia3_l": TensorKind()}

    def tensor_shapes(self, config: Ia3Config, site: SiteInfo) -> dict[str, tuple[int, ...]]:
        if site.kind == "conv":
            return {"ia3_l": (1, site.in_features if config.feedforward(site.name) else site.out_features, 1, 1)}
        return {"ia3_l": (1, site.in_features) if config.feedforward(site.name) else (site.out_features, 1)}

    def init_tensors(self, config: Ia3Config, site: SiteInfo, gen: torch.Generator) -> dict[str, torch.Tensor]:
        shape = self.tensor_shapes(config, site)["ia3_l"]
        l = torch.ones(shape)
        if config.init == "nonzero":
            l += config.init_std * torch.randn(shape, generator=gen)
        return {"ia3_l": l}

    def make_pool(self, site: SiteInfo, capacity: int) -> "Ia3Pool":
        return Ia3Pool(site, capacity)

    def reference(self, config: Ia3Config, site: SiteInfo, tensors: Mapping[str, torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor | None) -> torch.Tensor:
        l = tensors["ia3_l"].double().flatten()
        if site.kind == "conv":                         # channels: dim 1 of [n, C, H, W]
            l = l.view(1, -1, 1, 1)
        return (x if y is None else y).double() * l

    # ------------------------------------------------------------------ weight space
    def delta_weight(self, config: Ia3Config, site: SiteInfo, tensors: Mapping[str, torch.Tensor],
                     base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """W ⊙ (l - 1) in the module's layout: the output scale on W's rows ([d_out, d_in]; columns of a
        Conv1D's [d_in, d_out]), the input scale on its columns."""
        if base_weight is None:
            raise ConfigError("an IA3 weight change depends on the base weight: give base_weight")
        l = tensors["ia3_l"].float().flatten() - 1
        input_side = config.feedforward(site.name)
        on_rows = input_side == site.fan_in_fan_out       # Linear: output = rows; Conv1D: input = rows
        w = base_weight.float()
        if w.dim() == 4:                                  # a conv's [C_out, C_in, kh, kw]
            return w * (l.view(1, -1, 1, 1) if input_side else l.view(-1, 1, 1, 1))
        return w * (l[:, None] if on_rows else l[None, :])

    def delta_bias(self, config: Ia3Config, site: SiteInfo, tensors: Mapping[str, torch.Tensor],
                   base_bias: torch.Tensor) -> torch.Tensor | None:
        if config.feedforward(site.name):
            return None                   # scaling the input leaves the bias alone
        return base_bias.float() * (tensors["ia3_l"].float().flatten() - 1)

    # ------------------------------------------------------------------ description
    def summary(self, config: Ia3Config, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
        inputs = sum(config.feedforward(s) for s in tensors)
        return f"ia3 on {len(tensors) - inputs} outputs, {inputs} inputs"

    # ------------------------------------------------------------------ PEFT codec
    def config_from_peft(self, data: Mapping[str, Any], source: str) -> Ia3Config:
        from ..errors import UnsupportedError

        for key, neutral in _NEUTRAL.items():
            value = data.get(key)
            if value not in neutral and value != []:
                raise UnsupportedError(f"{source}: extra full modules ({key}={value!r}) are not supported; "
                                       "re-train the adapter without modules_to_save")
        unknown = sorted(set(data) - _READ - _IGNORED - set(_NEUTRAL))
        if unknown:
            import warnings

            warnings.warn(f"{source}: ignoring unknown PEFT config key(s) {unknown}", UserWarning, stacklevel=4)
        if data.get("target_modules") is None:
            raise ConfigError(f"{source}: target_modules is missing")
        return Ia3Config(target_modules=data["target_modules"],
                         feedforward_modules=data.get("feedforward_modules") or (),
                         exclude_modules=data.get("exclude_modules"),
                         fan_in_fan_out=bool(data.get("fan_in_fan_out", False)))

    def config_to_peft(self, config: Ia3Config, base_model: str | None) -> dict[str, Any]:
        def listed(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v
        return {"peft_type": "IA3", "task_type": None, "base_model_name_or_path": base_model,
                "target_modules": listed(config.target_modules),
                "feedforward_modules": listed(config.feedforward_modules),
                "exclude_modules": listed(config.exclude_modules), "fan_in_fan_out": config.fan_in_fan_out,
                "modules_to_save": None, "init_ia3_weights": True, "inference_mode": True}

    def tensors_to_peft(self, config: Ia3Config, site: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"ia3_l": tensors["ia3_l"]}

    def unknown_peft_key(self, key: str) -> str:
        return ("extra saved modules (modules_to_save)" if "modules_to_save" in key or "ia3_" not in key
                else f"tensor {key!r}")

    def tensors_from_peft(self, config: Ia3Config, site: str, parts: Mapping[str, torch.Tensor],
                          where: str) -> dict[str, torch.Tensor]:
        self.check_tensors(config, site, parts, where)
        l = parts["ia3_l"]
        want = "[1, d_in]" if config.feedforward(site) else "[d_out, 1]"
        if l.dim() == 4 and l.shape[0] == 1 and tuple(l.shape[2:]) == (1, 1):      # a Conv2d's: [1, C, 1, 1]
            return {"ia3_l": l}
        if l.dim() != 2 or (l.shape[0] != 1 if config.feedforward(site) else l.shape[1] != 1):
            raise CorruptAdapterError(f"{where}: site {site!r} has ia3_l {tuple(l.shape)}; an IA3 vector at a "
                                      f"{'feedforward' if config.feedforward(site) else 'non-feedforward'} "
                                      f"site is {want} (check feedforward_modules)")
        return {"ia3_l": l}


class Ia3Pool:
    """All IA3 adapters at one site (one attachment: output or input). Slot stack D [S+1, d] holds
    l - 1 (row 0 and free slots zero), so a unit's scale is 1 + Σ_k w_k D[slot_k]: one gather per
    adapter position, and rows without IA3 get exactly 1."""

    def __init__(self, site: SiteInfo, capacity: int) -> None:
        self.site, self.capacity = site, capacity
        self.sources: dict[int, torch.Tensor] = {}       # slot -> the adapter's own l (flat view)
        self.width = 0                                   # d (set by the first adapter)
        self.stack = torch.zeros(capacity + 1, 0, dtype=site.dtype, device=site.device)

    def __len__(self) -> int:
        return len(self.sources)

    def add(self, slot: int, config: Any, tensors: Mapping[str, torch.Tensor], site_name: str) -> None:
        l = tensors["ia3_l"]
        self.sources[slot] = l
        if l.numel() != self.width:
            self.width = l.numel()
            self._restack(self.capacity)
        self.refresh(slot)

    def remove(self, slot: int) -> None:
        self.sources.pop(slot, None)
        self.stack[slot].zero_()

    def resize(self, capacity: int) -> None:
        if capacity != self.capacity:
            self._restack(capacity)

    def refresh(self, slot: int) -> None:
        with torch.no_grad():
            self.stack[slot] = (self.sources[slot].detach().flatten() - 1).to(self.stack.dtype)

    def _restack(self, capacity: int) -> None:
        self.capacity = capacity
        self.stack = torch.zeros(capacity + 1, self.width, dtype=self.site.dtype, device=self.site.device)
        for slot in self.sources:
            self.refresh(slot)

    def apply(self, x: torch.Tensor, y: torch.Tensor | None, batch: Any, training: bool) -> torch.Tensor:
        """Scale y (an output site) or x (an input site, y None) per unit."""
        target = x if y is None else y
        if self.site.kind == "conv":                            # channels last: [n, H, W, C] (a view)
            return self._apply(target.movedim(1, -1), batch).movedim(-1, 1)
        return self._apply(target, batch)

    def _apply(self, target: torch.Tensor, batch: Any) -> torch.Tensor:
        t3 = batch.view_input(target)                           # [n, L, d]
        if batch.kernel == "dense":                             # the live tensors: gradients reach l
            change = None
            for slot, w in batch.slot_weights.items():
                l = self.sources.get(slot)
                if l is None:
                    continue
                term = w * (l.flatten().to(t3.dtype) - 1)      # [n, 1, d]
                change = term if change is None else change + term
            if change is None:
                return target
        else:                                                   # the slot stack, one gather per position
            change = None
            for idx, w in zip(*batch.gather_plan):
                term = self.stack.index_select(0, idx).unsqueeze(1).to(t3.dtype)    # [n, 1, d]
                term = term if w is None else term * w
                change = term if change is None else change + term
        return torch.addcmul(t3, t3, change).reshape(target.shape)             # t3 · (1 + change), one op


IA3 = Ia3()
