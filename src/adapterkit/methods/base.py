"""The method contract: what every adapter family declares (DESIGN.md, "The method contract").

A family is one file under methods/ with a `Method` subclass, plus one line in registry.py. Code
outside methods/ reaches a family only through this class: it never names a family's tensors.

  tensors       `tensor_kinds(config)`: name -> dtype and trainability (the same at every site), and
                `tensor_shapes(config, site)`. A kind with a dtype (an int64 index, packed uint8 bits)
                is kept exactly, end to end: attach, slots, save, load, byte accounting; a kind without
                one is a float (in the base's dtype once attached frozen).
  attachment    `attach`: a Linear's output, a Linear's input, or any module's output (with that
                module's input); `stage` orders several methods at one site (lower runs first).
  capabilities  `delta_kind` ("low-rank", "dense", "sparse"; None = not linear in the base weight, so
                neither merged into the base nor merged in weight space) and `merge_ops`, the weight-
                space merges defined on it (names of merge/api.py's methods).
  ΔW            `delta_weight(config, site, tensors, base_weight)` in the module's weight layout.
  reference     `reference(config, site, tensors, x, y)`: the float64 forward the tests hold every
                kernel to (y: the module's output; an input method returns the new input instead).
  codecs        the native format is generic (safetensors of the declared tensors + the config);
                `peft_type` and the `*_peft` methods where PEFT has the family.
  summary       `summary(config, tensors)`: one line for inspect, ls, show and the catalog.
  pool          `make_pool(site, capacity)`: many adapters of the family at one site, by slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Protocol

import torch

from ..errors import BaseMismatchError, CorruptAdapterError, UnsupportedError

# Where a method attaches (Site registers the hooks each needs).
ATTACH_OUTPUT = "output"   # a Linear's output: y' = f(x, y), x the Linear's input
ATTACH_INPUT = "input"     # a Linear's input: x' = f(x), before the Linear runs
ATTACH_MODULE = "module"   # any module's output with its input: y' = f(x, y) (an adapter around a block)
ATTACHES = (ATTACH_OUTPUT, ATTACH_INPUT, ATTACH_MODULE)

# Stages: the order of the methods at one site. Input methods change what the module sees; on the
# output, weight-linear deltas come first ((W + ΔW) x), then scalings of that output, then functions
# of it (a series bottleneck reads the output every earlier stage made).
STAGE_INPUT, STAGE_DELTA, STAGE_SCALE, STAGE_SERIES = 0, 10, 20, 30

DELTA_KINDS = ("low-rank", "dense", "sparse")


@dataclass(frozen=True)
class TensorKind:
    dtype: torch.dtype | None = None   # None: a float (the base's dtype when frozen); else kept exactly
    trainable: bool = True

    def accepts(self, t: torch.Tensor) -> bool:
        return t.is_floating_point() if self.dtype is None else t.dtype == self.dtype


@dataclass(frozen=True)
class SiteInfo:
    """What a method needs to know about a wrapped module."""

    name: str              # module path in the base, e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int
    fan_in_fan_out: bool   # True for GPT-2 Conv1D: weight is [in, out]
    dtype: torch.dtype
    device: torch.device = torch.device("cpu")   # where the module's weight lives: pools keep their slots there
    kind: str = "linear"   # "linear" (nn.Linear / Conv1D, has a weight), "conv" (nn.Conv2d: in/out_features are
                           # its channels), "module" (a block of linear layers) or "conv-module" (a block of
                           # convolutions: [n, C, H, W] in and out; in/out_features are channels)
    # which positional argument of the module is the block's input x (BERT's output block is called
    # with (intermediate activations, attention output): its block input is argument 1)
    input_arg: int = 0
    # a conv site's geometry, ((kh, kw), (stride_h, stride_w), (pad_h, pad_w)); a conv block's: its total stride
    # as ((1, 1), (s_h, s_w), (0, 0)); None for the other kinds
    conv: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None


class SitePool(Protocol):
    """Many adapters of one method at one site, addressed by runtime slot (0 = no adapter)."""

    # site_name: the adapter's own name for the site (config patterns are matched against it).
    def add(self, slot: int, config: Any, tensors: Mapping[str, torch.Tensor], site_name: str) -> None: ...
    def remove(self, slot: int) -> None: ...
    def resize(self, capacity: int) -> None: ...
    def refresh(self, slot: int) -> None: ...
    # x: the module's input; y: its output so far (None for an input method, which returns the new x).
    def apply(self, x: torch.Tensor, y: torch.Tensor | None, batch: Any, training: bool) -> torch.Tensor: ...
    def __len__(self) -> int: ...


class Method:
    """One adapter family. Subclasses set the class attributes and implement the methods that raise."""

    name: ClassVar[str]                       # registry key and the config's `type`
    title: ClassVar[str]                      # in messages: "LoRA", "IA3", "bottleneck"
    config_cls: ClassVar[type]                # frozen dataclass with `type`, `from_dict`, `to_dict`,
                                              # `target_modules` and `exclude_modules`
    attach: ClassVar[str] = ATTACH_OUTPUT
    stage: ClassVar[int] = STAGE_DELTA
    delta_kind: ClassVar[str | None] = None
    merge_ops: ClassVar[frozenset[str]] = frozenset()
    peft_type: ClassVar[str | None] = None    # PEFT's name for the family, where PEFT has it
    # the SiteInfo kinds it adapts; None: by its attachment (linear layers, and blocks for a module method)
    site_kinds: ClassVar[frozenset[str] | None] = None

    @property
    def an_adapter(self) -> str:
        """"a LoRA adapter", "an IA3 adapter": the family in messages."""
        return f"{'an' if self.title[:1].lower() in 'aeiou' or self.title.startswith('IA') else 'a'} {self.title} adapter"

    def attach_at(self, config: Any, site: str) -> str:
        """How the family attaches at one of its sites (its own name for it); most attach one way."""
        return self.attach

    def check_site(self, site: SiteInfo, adapter_name: str) -> None:
        """Refuse (UnsupportedError) a module of a kind the family does not adapt, e.g. a convolution for a
        family whose tensors are per feature of a Linear's last dimension."""
        kinds = self.site_kinds or frozenset({"linear", "module"} if self.attach == ATTACH_MODULE else {"linear"})
        if site.kind not in kinds:
            what = {"conv": "a convolution (nn.Conv2d)", "linear": "a linear layer", "module": "a block",
                    "conv-module": "a block of convolutions"}
            words = {"linear": "linear layers", "conv": "convolutions", "module": "blocks",
                     "conv-module": "blocks of convolutions"}
            able = " and ".join(words.get(k, k) for k in sorted(kinds, key=list(words).index))
            raise UnsupportedError(f"adapter {adapter_name!r}: {self.title} does not adapt {what[site.kind]} "
                                   f"({site.name}); it adapts {able}: choose target_modules of those kinds"
                                   f"{', or LoRA for convolutions' if site.kind == 'conv' else ''}")

    # ------------------------------------------------------------------ capabilities
    @property
    def mergeable(self) -> bool:
        """Exactly mergeable into the base weight (and unmergeable bit for bit)."""
        return self.delta_kind is not None

    def require_merge_op(self, op: str, adapter_name: str) -> None:
        """Refuse a weight-space merge `op` the family does not define, saying why."""
        if op not in self.merge_ops:
            why = ("it is not linear in the base weights, so it has no weight change to merge"
                   if self.delta_kind is None else f"it defines {sorted(self.merge_ops) or 'no weight-space merge'}")
            raise UnsupportedError(f"merge {op!r} is not defined for adapter {adapter_name!r}, {self.an_adapter}: "
                                   f"{why}; stack it at run time instead (several adapters on one row)")

    # ------------------------------------------------------------------ tensors
    def tensor_kinds(self, config: Any) -> dict[str, TensorKind]:
        raise NotImplementedError

    def tensor_shapes(self, config: Any, site: SiteInfo) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def init_tensors(self, config: Any, site: SiteInfo, gen: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def check_fit(self, config: Any, site: SiteInfo, tensors: Mapping[str, torch.Tensor], adapter_name: str,
                  module_name: str) -> None:
        """Refuse (BaseMismatchError) a site's tensors whose shapes this base's module cannot take;
        site.name is the adapter's own name for the site, module_name the base's."""
        expected = self.tensor_shapes(config, site)
        got = {k: tuple(t.shape) for k, t in tensors.items()}
        if got != {k: tuple(v) for k, v in expected.items()}:
            raise BaseMismatchError(
                f"adapter {adapter_name!r} does not fit this base at {module_name}: tensors {got}, "
                f"the base needs {expected}; it was made for another base model")

    def check_tensors(self, config: Any, site: str, tensors: Mapping[str, torch.Tensor], where: str) -> None:
        """Refuse a site's tensors whose names or dtypes are not the family's (CorruptAdapterError naming
        the tensor); shapes are checked against the base when attached. Families add their own checks
        (index ranges, duplicates) by overriding and calling this."""
        kinds = self.tensor_kinds(config)
        if set(tensors) != set(kinds):
            raise CorruptAdapterError(f"{where}: {self.an_adapter} has tensors {sorted(kinds)} at each site; "
                                      f"site {site!r} has {sorted(tensors)}: re-save the adapter")
        for key, kind in kinds.items():
            t = tensors[key]
            if not kind.accepts(t):
                want = (f"{self.title} weights are floating point" if kind.dtype is None else
                        f"{self.an_adapter}'s {key} is {_dtype(kind.dtype)}")
                raise CorruptAdapterError(f"{where}: {site}.{key} is {_dtype(t.dtype)}; {want}: re-save the adapter")

    # ------------------------------------------------------------------ forward
    def make_pool(self, site: SiteInfo, capacity: int) -> SitePool:
        raise NotImplementedError

    def reference(self, config: Any, site: SiteInfo, tensors: Mapping[str, torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor | None) -> torch.Tensor:
        """The float64 oracle for one adapter at weight 1: the new output (the new input for an input method)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ weight space
    def delta_weight(self, config: Any, site: SiteInfo, tensors: Mapping[str, torch.Tensor],
                     base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW in the module's weight layout (float32); base_weight: the module's weight, for methods
        whose change depends on it."""
        raise UnsupportedError(f"{self.an_adapter} is not linear in the base weights: it cannot be merged "
                               "into the base; run it as an adapter instead")

    def delta_bias(self, config: Any, site: SiteInfo, tensors: Mapping[str, torch.Tensor],
                   base_bias: torch.Tensor) -> torch.Tensor | None:
        """Δb of a module with a bias (float32), None when the family leaves biases alone (LoRA)."""
        return None

    def tied(self, config: Any, sites: list[str]) -> list[tuple[str, list[str]]]:
        """Tensors trained as one parameter: (tensor name, the sites sharing it) groups (none by default;
        ScaLearn++ shares ω across layers). Stored at each site; the trainer ties them while training."""
        return []

    # what a shape clash between two adapters of the family may mean besides another base
    shape_hint: ClassVar[str] = ""

    def site_shape(self, config: Any, site: str, tensors: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
        """The shape of the site as the tensors tell it (merges refuse inputs that disagree):
        LoRA (d_out, d_in); a family without a weight change, its tensors' shapes."""
        return tuple(d for t in tensors.values() for d in t.shape)

    def max_delta(self, config: Any, site_name: str, tensors: Mapping[str, torch.Tensor],
                  limit: float) -> float | None:
        """max |ΔW| of a site (float64; an upper bound is enough when it is <= limit), for refusing
        an adapter whose change overflows the base dtype; None: nothing beyond the tensors to check."""
        return None

    # ------------------------------------------------------------------ description and formats
    def summary(self, config: Any, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
        raise NotImplementedError

    def config_to_peft(self, config: Any, base_model: str | None) -> dict[str, Any]:
        raise UnsupportedError(f"PEFT has no {self.name} format")

    def config_from_peft(self, data: Mapping[str, Any], source: str) -> Any:
        raise UnsupportedError(f"PEFT has no {self.name} format")

    # PEFT's tensor key parts of the family (the segment after the module path, e.g. "lora_A")
    peft_parts: ClassVar[tuple[str, ...]] = ()

    def tensors_to_peft(self, config: Any, site: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{PEFT key suffix after the module path, e.g. "lora_A.weight": tensor}."""
        raise UnsupportedError(f"PEFT has no {self.name} format")

    def tensors_from_peft(self, config: Any, site: str, parts: Mapping[str, torch.Tensor],
                          where: str) -> dict[str, torch.Tensor]:
        """The family's tensors of one site from PEFT's {part: tensor}, checked (CorruptAdapterError)."""
        raise UnsupportedError(f"PEFT has no {self.name} format")

    def unknown_peft_key(self, key: str) -> str:
        """What a PEFT tensor key outside `peft_parts` holds, for the refusal ("DoRA magnitude vectors")."""
        return f"tensor {key!r}"

    def __repr__(self) -> str:
        return f"<method {self.name}>"


def tuple_fields(config: Any, *keys: str) -> None:
    """In a frozen config's __post_init__: JSON lists of module names become tuples (hashable, comparable)."""
    for key in keys:
        value = getattr(config, key)
        if isinstance(value, list):
            object.__setattr__(config, key, tuple(value))


def config_to_dict(config: Any) -> dict[str, Any]:
    """A family config as JSON: its `type` first, tuples as lists."""
    from dataclasses import asdict

    return {"type": config.type, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}}


def config_from_dict(cls: type, data: Mapping[str, Any], title: str) -> Any:
    """Parse a family config from JSON, refusing another family's type and unknown fields by name."""
    from ..errors import ConfigError

    data = dict(data)
    if data.pop("type", cls.type) != cls.type:
        raise ConfigError(f"not a {title} config: type {data.get('type')!r}")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {title} config field(s) {unknown}; known: {sorted(known)}")
    return cls(**data)


def pattern_value(patterns: Mapping[str, Any], site: str) -> Any:
    """PEFT's per-site pattern lookup (rank_pattern, alpha_pattern...): the first key that matches the
    site name or a dotted suffix of it; None when none does."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", site):
            return value
    return None


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
