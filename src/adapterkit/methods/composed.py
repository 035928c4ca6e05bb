"""What the composition families share (scalearn.py, fusion.py): an adapter over frozen source adapters
that learns only how to combine their outputs at every site the sources share.

Tensors at a site: the family's own (trainable: ScaLearn's ω, AdapterFusion's projections) and the
sources' own tensors, frozen, under "s<i>_" (e.g. "s0_lora_A"), stored with the composition so that
it loads, serves and moves as one folder. The config pins each source's name, method config and content
fingerprint (the store and the server refuse a composition whose source was since replaced or deleted).

The pool runs each source through its own family's pool (one slot each) on the units routed to the
composition, giving each source's output o_i there, and the family's `combine` makes the new output
from the site's output so far and the o_i; a unit at weight w gets v + w·(combine - v). Every family's
kernel is reused, and a row may use a composition while the next uses one of its sources alone.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, ClassVar, Mapping, Sequence

import torch

from ..errors import BaseMismatchError, ConfigError
from .base import ATTACH_INPUT, ATTACH_OUTPUT, Method, SiteInfo, TensorKind, tuple_fields

STAGE_COMPOSED = 35       # after the sources' own stages (delta 10, scale 20, series 30): it reads y so far
_SOURCE_KEY = re.compile(r"^s\d+_")          # a source's tensor, not the family's own


def check_composed_config(config: Any, title: str) -> None:
    """In a composition config's __post_init__: the source lists agree, sources differ, none composes."""
    tuple_fields(config, "sources", "source_configs", "target_modules", "fingerprints", "exclude_modules")
    n = len(config.sources)
    if not n:
        raise ConfigError(f"a {title} composition needs at least one source adapter")
    if len(config.source_configs) != n:
        raise ConfigError(f"{title}: {n} sources but {len(config.source_configs)} source configs")
    if config.fingerprints and len(config.fingerprints) != n:
        raise ConfigError(f"{title}: {n} sources but {len(config.fingerprints)} fingerprints")
    if len(set(config.sources)) != n:
        raise ConfigError(f"{title} sources must differ; got {list(config.sources)}")
    for name, text in zip(config.sources, config.source_configs):
        method, _ = _parse_source(text)             # also refuses a malformed source config, by its family
        if getattr(method, "composes", False):
            raise ConfigError(f"{title} source {name!r} is itself a composition ({method.name}); compose its "
                              "sources directly")


@functools.lru_cache(maxsize=256)
def _parse_source(text: str) -> tuple[Method, Any]:
    from .registry import config_from_dict as parse, get_method    # the registry imports this module

    cfg = parse(json.loads(text))
    return get_method(cfg.type), cfg


def source_config_json(config: Any) -> str:
    """A source's config as the canonical JSON a composition config keeps."""
    return json.dumps(config.to_dict(), sort_keys=True)


def source_of(config: Any, i: int) -> tuple[Method, Any]:
    """(method, config) of a composition's source i."""
    return _parse_source(config.source_configs[i])


def _prefix(i: int) -> str:
    return f"s{i}_"


class ComposedMethod(Method):
    """A composition family: subclasses declare their own tensors (own_kinds / own_shapes / own_init) and
    `combine`; everything about the sources is here."""

    stage = STAGE_COMPOSED
    attach = ATTACH_OUTPUT
    site_kinds = frozenset({"linear", "module"})
    composes: ClassVar[bool] = True

    # ------------------------------------------------------------------ the family's own part
    def own_kinds(self, config: Any) -> dict[str, TensorKind]:
        raise NotImplementedError

    def own_shapes(self, config: Any, site: SiteInfo) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def own_init(self, config: Any, site: SiteInfo, gen: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def combine(self, config: Any, own: Mapping[str, torch.Tensor], base: torch.Tensor,
                outs: Sequence[torch.Tensor], training: bool) -> torch.Tensor:
        """The new output from the site's output so far `base` [n, L, d] and each source's output there."""
        raise NotImplementedError

    # ------------------------------------------------------------------ sources
    def site_width(self, config: Any, site: SiteInfo) -> int:
        """The width of what the sources change here: the input's at an input site, else the output's."""
        return site.in_features if self.attach_at(config, site.name) == ATTACH_INPUT else site.out_features

    def attach_at(self, config: Any, site: str) -> str:
        """Where the sources attach at this site; they must agree (LoRA on a Linear and a bottleneck around a
        block share no site)."""
        ways = {m.attach_at(c, site) for m, c in (source_of(config, i) for i in range(len(config.sources)))}
        if len(ways) != 1:
            raise ConfigError(f"{self.title} sources attach to {site} in different ways ({sorted(ways)}); compose "
                              "sources of one attachment (LoRA with LoRA or IA3 outputs, bottleneck with bottleneck)")
        return ways.pop()

    def source_tensors(self, tensors: Mapping[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        p = _prefix(i)
        return {k[len(p):]: t for k, t in tensors.items() if k.startswith(p)}

    def own_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: t for k, t in tensors.items() if not _SOURCE_KEY.match(k)}

    def tensor_kinds(self, config: Any) -> dict[str, TensorKind]:
        kinds = dict(self.own_kinds(config))
        for i in range(len(config.sources)):
            method, cfg = source_of(config, i)
            for key, kind in method.tensor_kinds(cfg).items():
                kinds[_prefix(i) + key] = TensorKind(dtype=kind.dtype, trainable=False)
        return kinds

    def tensor_shapes(self, config: Any, site: SiteInfo) -> dict[str, tuple[int, ...]]:
        shapes = dict(self.own_shapes(config, site))
        for i in range(len(config.sources)):
            method, cfg = source_of(config, i)
            shapes.update({_prefix(i) + k: v for k, v in method.tensor_shapes(cfg, site).items()})
        return shapes

    def check_fit(self, config: Any, site: SiteInfo, tensors: Mapping[str, torch.Tensor], adapter_name: str,
                  module_name: str) -> None:
        """The family's own shapes here, then each source's own check (a family may allow shapes that vary)."""
        for key, want in self.own_shapes(config, site).items():
            if key in tensors and tuple(tensors[key].shape) != tuple(want):
                raise BaseMismatchError(f"adapter {adapter_name!r} does not fit this base at {module_name}: {key} is "
                                        f"{tuple(tensors[key].shape)}, the base needs {tuple(want)}; it was made "
                                        "for another base model")
        for i in range(len(config.sources)):
            method, cfg = source_of(config, i)
            method.check_fit(cfg, site, self.source_tensors(tensors, i), adapter_name, module_name)

    def check_tensors(self, config: Any, site: str, tensors: Mapping[str, torch.Tensor], where: str) -> None:
        super().check_tensors(config, site, tensors, where)
        for i in range(len(config.sources)):
            method, cfg = source_of(config, i)
            method.check_tensors(cfg, site, self.source_tensors(tensors, i), f"{where} (source {config.sources[i]!r})")

    def init_tensors(self, config: Any, site: SiteInfo, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The family's own init; the sources' tensors from their own init (a composition of real sources
        replaces them with the sources' tensors: train/compose.py)."""
        out = dict(self.own_init(config, site, gen))
        for i in range(len(config.sources)):
            method, cfg = source_of(config, i)
            out.update({_prefix(i) + k: t for k, t in method.init_tensors(cfg, site, gen).items()})
        return out

    def make_pool(self, site: SiteInfo, capacity: int) -> "ComposedPool":
        return ComposedPool(self, site)

    def reference(self, config: Any, site: SiteInfo, tensors: Mapping[str, torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor | None) -> torch.Tensor:
        """combine over the sources' float64 references (base: y, or x at an input site)."""
        base = (x if y is None else y).double()
        outs = [method.reference(cfg, site, self.source_tensors(tensors, i), x, y).double()
                for i, (method, cfg) in enumerate(source_of(config, i) for i in range(len(config.sources)))]
        own = {k: t.double() for k, t in self.own_tensors(tensors).items()}
        shape = base.shape
        flat = lambda t: t.reshape(1, -1, shape[-1])                     # noqa: E731
        return self.combine(config, own, flat(base), [flat(o) for o in outs], False).reshape(shape)


class ComposedPool:
    """All compositions of one family at one site, by slot: each holds its own tensors (the adapter's: the
    dense path's gradients reach them) and one single-slot pool of its family per source."""

    def __init__(self, method: ComposedMethod, site: SiteInfo) -> None:
        self.method = method
        self.site = site
        self.held: dict[int, tuple[Any, dict[str, torch.Tensor], list[Any]]] = {}

    def __len__(self) -> int:
        return len(self.held)

    def add(self, slot: int, config: Any, tensors: Mapping[str, torch.Tensor], site_name: str) -> None:
        pools = []
        for i in range(len(config.sources)):
            method, cfg = source_of(config, i)
            pool = method.make_pool(self.site, 1)
            pool.add(1, cfg, self.method.source_tensors(tensors, i), site_name)
            pools.append(pool)
        self.held[slot] = (config, self.method.own_tensors(tensors), pools)

    def remove(self, slot: int) -> None:
        self.held.pop(slot, None)

    def resize(self, capacity: int) -> None:
        pass                                  # every composition has its own single-slot source pools

    def refresh(self, slot: int) -> None:
        pass                                  # the own tensors are read live; the sources are frozen

    def apply(self, x: torch.Tensor, y: torch.Tensor | None, batch: Any, training: bool) -> torch.Tensor:
        from ..core.batching import build_batch

        base = x if y is None else y
        out = base
        for slot in batch.unique:
            if slot not in self.held:
                continue
            config, own, pools = self.held[slot]
            key = ("composed-units", slot)
            if key not in batch.memo:           # the units routed to this composition, at weight 1
                units = (batch.ids == slot).any(dim=1).long()[:, None]
                batch.memo[key] = build_batch(units, mode=batch.mode, kernel="dense", dtype=batch.dtype,
                                              device=batch.device)
            sub = batch.memo[key]
            # each source's output on those units (its kernels add in place: give each its own copy)
            outs = [pool.apply(x.clone(), None, sub, False) if y is None else pool.apply(x, y.clone(), sub, False)
                    for pool in pools]
            view = batch.view_input
            new = self.method.combine(config, {k: t.to(base.dtype) for k, t in own.items()}, view(base),
                                      [view(o) for o in outs], training)
            w = batch.slot_weights[slot].to(base.dtype)                      # [n, 1, 1]
            out = out + (w * (new - view(base))).reshape(base.shape)
        return out
