"""LoRA: ΔW = scale · B @ A with A [r, d_in], B [d_out, r]; scale = alpha / r (or alpha / sqrt(r)).

Tensors per site use PEFT's names and layout ("lora_A" [r, d_in], "lora_B" [d_out, r]) so the
PEFT format maps one to one. At a site, `LoraPool` keeps the adapters' own tensors (read by the
dense kernel, so gradients reach them) and stacked, rank-padded, scale-folded copies per slot
(read by the gather and segment kernels).
"""

from __future__ import annotations

import math
import re
from functools import partial
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from ..kernels import dense_kernel, gather_kernel, segment_kernel
from . import MethodSpec, SiteInfo, register_method

INITS = ("default", "nonzero")


def _pattern_value(patterns: Mapping[str, Any], site: str):
    """PEFT's rank_pattern / alpha_pattern lookup: key matches the site name or a dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", site):
            return value
    return None


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
        value = _pattern_value(self.rank_pattern, site)
        return int(value) if value is not None else self.r

    def scale(self, site: str) -> float:
        value = _pattern_value(self.alpha_pattern, site)
        alpha = float(value) if value is not None else float(self.alpha)
        r = self.rank(site)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if isinstance(data["target_modules"], tuple):
            data["target_modules"] = list(data["target_modules"])
        if isinstance(data["exclude_modules"], tuple):
            data["exclude_modules"] = list(data["exclude_modules"])
        return {"type": self.type, **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoraConfig":
        data = dict(data)
        if data.pop("type", cls.type) != cls.type:
            raise ConfigError(f"not a LoRA config: type {data.get('type')!r}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown LoRA config field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


def _check_rank(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"LoRA {what} must be a positive integer, got {value!r}: set r >= 1")


def _check_alpha(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"LoRA {what} must be a non-negative number, got {value!r}")


def tensor_shapes(config: LoraConfig, site: SiteInfo) -> dict[str, tuple[int, ...]]:
    r = config.rank(site.name)
    return {"lora_A": (r, site.in_features), "lora_B": (site.out_features, r)}


def init_tensors(config: LoraConfig, site: SiteInfo, gen: torch.Generator) -> dict[str, torch.Tensor]:
    r = config.rank(site.name)
    a = torch.empty(r, site.in_features)
    # PEFT's default: kaiming_uniform_(a=sqrt(5)) on A, i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)).
    bound = 1.0 / math.sqrt(site.in_features)
    a.uniform_(-bound, bound, generator=gen)
    b = torch.zeros(site.out_features, r)
    if config.init == "nonzero":
        b.normal_(0.0, config.init_std, generator=gen)
    return {"lora_A": a, "lora_B": b}


def delta_weight(config: LoraConfig, site: SiteInfo, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """ΔW = scale · B @ A in the module's layout ([d_out, d_in]; transposed for Conv1D)."""
    a, b = tensors["lora_A"].float(), tensors["lora_B"].float()
    delta = config.scale(site.name) * (b @ a)
    return delta.t() if site.fan_in_fan_out else delta


def max_delta(config: LoraConfig, site_name: str, tensors: Mapping[str, torch.Tensor], limit: float) -> float:
    """max |scale · B @ A|: the bound scale · r · max|B| · max|A| when it is below `limit`, else exact
    (float64), so the usual case costs two max() and no matmul."""
    a, b = tensors["lora_A"].double(), tensors["lora_B"].double()
    scale = config.scale(site_name)
    bound = scale * a.shape[0] * float(a.abs().max()) * float(b.abs().max())
    if bound <= limit:
        return bound
    return scale * float((b @ a).abs().max())


class LoraPool:
    """All LoRA adapters at one site. Slot tensors: A [S+1, d_in, R], B [S+1, R, d_out], row 0 zero."""

    def __init__(self, site: SiteInfo, capacity: int) -> None:
        self.site = site
        self.rank = 0                      # R: max rank of the adapters held (stacks are padded to it)
        self.capacity = capacity
        # slot -> (A [r, d_in], B [d_out, r], scale, dropout): the adapter's own tensors.
        self.sources: dict[int, tuple[torch.Tensor, torch.Tensor, float, float]] = {}
        self.a_stack = torch.zeros(capacity + 1, site.in_features, 0, dtype=site.dtype, device=site.device)
        self.b_stack = torch.zeros(capacity + 1, 0, site.out_features, dtype=site.dtype, device=site.device)

    def __len__(self) -> int:
        return len(self.sources)

    def add(self, slot: int, config: LoraConfig, tensors: Mapping[str, torch.Tensor], site_name: str) -> None:
        a, b = tensors["lora_A"], tensors["lora_B"]
        self.sources[slot] = (a, b, config.scale(site_name), config.dropout)
        if a.shape[0] > self.rank:
            self._restack(a.shape[0], self.capacity)
        self.refresh(slot)

    def remove(self, slot: int) -> None:
        self.sources.pop(slot, None)
        self.a_stack[slot].zero_()
        self.b_stack[slot].zero_()

    def resize(self, capacity: int) -> None:
        if capacity != self.capacity:
            self._restack(self.rank, capacity)

    def refresh(self, slot: int) -> None:
        """Copy a slot's own tensors (maybe just trained) into the stacks, scale folded into B."""
        a, b, scale, _ = self.sources[slot]
        r = a.shape[0]
        with torch.no_grad():
            self.a_stack[slot].zero_()
            self.b_stack[slot].zero_()
            self.a_stack[slot, :, :r] = a.t().to(self.site.dtype)
            self.b_stack[slot, :r, :] = (b.t() * scale).to(self.site.dtype)

    def _restack(self, rank: int, capacity: int) -> None:
        self.rank, self.capacity = rank, capacity
        self.a_stack = torch.zeros(capacity + 1, self.site.in_features, rank, dtype=self.site.dtype,
                                   device=self.site.device)
        self.b_stack = torch.zeros(capacity + 1, rank, self.site.out_features, dtype=self.site.dtype,
                                   device=self.site.device)
        for slot in self.sources:
            self.refresh(slot)

    def apply(self, x: torch.Tensor, y: torch.Tensor, batch: Any, training: bool) -> torch.Tensor:
        """x: module input [..., d_in]; y: base output [..., d_out]; returns y + this site's deltas."""
        x3, y3 = batch.view_input(x), batch.view_input(y)
        if batch.kernel == "dense":
            terms = []
            for slot, w in batch.dense_w.items():
                src = self.sources.get(slot)
                if src is None:
                    continue
                a, b, scale, p = src
                # Dropout is per adapter (PEFT: lora_B(lora_A(dropout(x)))), training only.
                pre = partial(nn.functional.dropout, p=p, training=True) if training and p > 0 else None
                terms.append((a, b, w * scale, pre))
            if not terms:
                return y
            y3 = dense_kernel(x3, y3, terms)
        elif batch.kernel == "gather":
            y3 = gather_kernel(x3, y3, self.a_stack, self.b_stack, batch.gather_idx, batch.gather_w)
        elif batch.kernel == "segment":
            y3 = segment_kernel(x3, y3, self.a_stack, self.b_stack, batch.order, batch.bounds,
                                batch.seg_slots, batch.seg_w)
        return y3.view(y.shape)


LORA = register_method(
    MethodSpec(
        name="lora",
        config_cls=LoraConfig,
        init_tensors=init_tensors,
        tensor_shapes=tensor_shapes,
        make_pool=LoraPool,
        delta_weight=delta_weight,
        peft_type="LORA",
        max_delta=max_delta,
    )
)
