"""AdapterRuntime: many adapters attached to one frozen base, mixed freely inside one batch.

    rt = AdapterRuntime.from_base(load_base("smollm2-135m"))
    rt.add(Adapter.load("adapters/math"));  rt.add(Adapter.load("adapters/code"))
    with rt.batch(["math", None, {"code": 0.5, "math": 0.5}]):    # one entry per row
        logits = rt.model(input_ids).logits

Each attached adapter gets a slot (1..capacity; 0 = no adapter). A batch maps rows or tokens to
slots (see batching.AdapterBatch); every wrapped site reads that one object.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from ..errors import AdapterNameError, AdapterNotFoundError, BaseMismatchError, ConfigError
from .adapter import Adapter, validate_name
from .batching import AdapterBatch, build_batch
from .merging import MergingMixin
from .sites import Site, pool_key
from .targets import site_info

# A row's adapters: none, one name, or several names with weights.
RowAdapters = Union[None, str, Mapping[str, float], Sequence[tuple[str, float]]]


class AdapterRuntime(MergingMixin):
    def __init__(self, model: nn.Module, *, fingerprint: str | None = None, base_name: str | None = None,
                 capacity: int = 8) -> None:
        self.model = model
        self.fingerprint = fingerprint
        self.base_name = base_name
        self.capacity = capacity
        self.adapters: dict[str, Adapter] = {}
        self._slots: dict[str, int] = {}
        self._site_maps: dict[str, dict[str, str]] = {}      # adapter -> {its site name: model module}
        self._sites: dict[str, Site] = {}
        self._modules = dict(model.named_modules())
        self._infos: dict[tuple[str, str], Any] = {}       # (module, attach) -> SiteInfo (see _site_info)
        self._dtype = next(model.parameters()).dtype
        self._device = next(model.parameters()).device
        self._versions: dict[str, int] = {}                   # trainable adapter -> tensor version sum
        self._originals: dict[tuple[str, str], torch.Tensor] = {}   # (module, weight|bias) -> before any merge
        self._merged: list[str] = []
        self._merge_weights: dict[str, float] = {}       # name -> the weight it was merged with
        self._under: dict[str, tuple[str, ...]] = {}           # adapter -> adapters every row of it also gets
        self._current: AdapterBatch | None = None
        self._default: AdapterBatch | None = None
        self.tokenizer: Any = None                            # set by from_base
        self.processor: Any = None                            # an image base's preprocessing (from_base)

    @classmethod
    def from_base(cls, base: Any, capacity: int = 8) -> "AdapterRuntime":
        rt = cls(base.model, fingerprint=base.fingerprint, base_name=base.name, capacity=capacity)
        rt.tokenizer = base.tokenizer
        rt.processor = getattr(base, "processor", None)
        return rt

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    # ------------------------------------------------------------------ attach / detach
    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def slot(self, name: str) -> int:
        try:
            return self._slots[name]
        except KeyError:
            known = ", ".join(self.adapters) or "none attached"
            raise AdapterNotFoundError(f"unknown adapter {name!r}; attached adapters: {known}") from None

    def add(self, adapter: Adapter, *, key: str | None = None) -> int:
        """Attach an adapter; returns its slot. Validates name, base fingerprint and shapes first,
        so a refused adapter leaves the runtime unchanged. `key` (default: its name) is what rows,
        slot() and remove() call it (a serving cache attaches two versions of one name at once)."""
        name = validate_name(adapter.name)
        key = name if key is None else key
        if key in self.adapters:
            raise AdapterNameError(f"an adapter named {key!r} is already attached; remove it first or rename it")
        fp = adapter.meta.base_fingerprint
        if fp and self.fingerprint and fp != self.fingerprint:
            raise BaseMismatchError(
                f"adapter {name!r} was made for base {adapter.meta.base_name or '?'} ({fp}), but this base "
                f"is {self.base_name or '?'} ({self.fingerprint}); load it onto its own base"
            )
        spec = adapter.method
        kinds = spec.tensor_kinds(adapter.config)
        site_map = self._resolve_sites(adapter)
        tensors, infos = {}, {}
        for own, module_name in site_map.items():
            # Config patterns (rank_pattern...) refer to the adapter's own site names.
            info = infos[module_name] = self._site_info(module_name, spec.attach_at(adapter.config, own))
            named = info if own == module_name else replace(info, name=own)
            spec.check_site(info, name)
            spec.check_fit(adapter.config, named, adapter.tensors[own], name, module_name)
            spec.check_tensors(adapter.config, own, adapter.tensors[own], f"adapter {name!r}")   # dtypes
            away = {k: str(t.device) for k, t in adapter.tensors[own].items()
                    if t.requires_grad and t.device != self._device}
            if away:
                raise ConfigError(f"adapter {name!r}: trainable tensors at {module_name} are on {away}, the base on "
                                  f"{self._device}; move them to the base's device first (train() does)")
            tensors[module_name] = (own, {k: self._cast(t, kinds[k]) for k, t in adapter.tensors[own].items()})
        slot = self._free_slot()
        for module_name, (own, parts) in tensors.items():
            site = self._sites.get(module_name)
            if site is None:
                site = self._sites[module_name] = Site(lambda: self.active_batch, infos[module_name],
                                                       self._modules[module_name])
            site.add(spec, self.capacity, spec.attach_at(adapter.config, own), slot, adapter.config, parts, own)
        self.adapters[key], self._slots[key], self._site_maps[key] = adapter, slot, site_map
        if _trainable(adapter):
            self._versions[key] = _version(adapter)
        return slot

    def _site_info(self, module_name: str, attach: str) -> Any:
        """site_info of a module, kept (attach runs it for every site of every adapter it adds)."""
        key = (module_name, attach)
        info = self._infos.get(key)
        weight = getattr(self._modules[module_name], "weight", None)
        if info is None or (isinstance(weight, torch.Tensor) and (weight.dtype, weight.device) != (info.dtype,
                                                                                                  info.device)):
            info = self._infos[key] = site_info(module_name, self._modules[module_name], attach)
        return info

    def remove(self, name: str) -> Adapter:
        slot = self.slot(name)
        if name in self._merged:
            raise ConfigError(f"adapter {name!r} is merged into the base; unmerge() before removing it")
        adapter = self.adapters[name]
        for own, module_name in self._site_maps.pop(name).items():
            site = self._sites[module_name]
            site.remove(_pool_key(adapter, own), slot)
            if site.empty():
                site.close()
                del self._sites[module_name]
        del self._slots[name]
        self._versions.pop(name, None)
        if any(name in under for under in self._under.values()):
            self._under = {n: u for n, u in self._under.items() if name not in u}   # its stacks end with it
        return self.adapters.pop(name)

    def modules_of(self, name: str) -> list[str]:
        """The base's module names the attached adapter `name` adapts."""
        self.slot(name)                                   # AdapterNotFoundError for an adapter not attached
        return list(self._site_maps[name].values())

    def refresh(self, name: str) -> None:
        """Re-copy an adapter's (trained) tensors into the stacked slots read by fast kernels."""
        slot = self.slot(name)
        adapter = self.adapters[name]
        for own, module_name in self._site_maps[name].items():
            self._sites[module_name].pools[_pool_key(adapter, own)].refresh(slot)
        if name in self._versions:
            self._versions[name] = _version(adapter)

    def _cast(self, t: torch.Tensor, kind: Any) -> torch.Tensor:
        # Frozen float tensors are held in the base dtype, on its device; a tensor of a declared dtype (an
        # int64 index, packed bits) keeps it exactly; trainable ones stay the caller's tensors (the dense
        # kernel runs them in their own dtype: fp32 master weights on a bf16 base).
        if t.requires_grad:
            return t
        return t.to(device=self._device, dtype=self._dtype if kind.dtype is None else kind.dtype)

    def _free_slot(self) -> int:
        used = set(self._slots.values())
        for slot in range(1, self.capacity + 1):
            if slot not in used:
                return slot
        self.capacity *= 2
        for site in self._sites.values():
            for pool in site.pools.values():
                pool.resize(self.capacity)
        return self._free_slot()

    def _resolve_sites(self, adapter: Adapter) -> dict[str, str]:
        """Map the adapter's site names onto module names of this model. PEFT adapters saved from
        a wrapper class (e.g. BertForSequenceClassification: "bert.encoder...") are aligned by
        dropping or adding one leading path component."""
        prefixes = [""] + [n + "." for n, _ in self.model.named_children()]
        for transform in ("same", "strip", *prefixes[1:]):
            mapping = {}
            for own in adapter.tensors:
                if transform == "same":
                    cand = own
                elif transform == "strip":
                    cand = own.split(".", 1)[1] if "." in own else own
                else:
                    cand = transform + own
                if cand not in self._modules:
                    break
                mapping[own] = cand
            else:
                return mapping
        missing = [s for s in adapter.tensors if s not in self._modules][:3]
        raise BaseMismatchError(
            f"adapter {adapter.name!r} targets module(s) {missing} that this base does not have; "
            "it was made for another base model"
        )

    # ------------------------------------------------------------------ batches
    @property
    def active_batch(self) -> AdapterBatch | None:
        return self._current if self._current is not None else self._default

    def make_batch(self, rows: Sequence[RowAdapters], *, kernel: str = "auto",
                   per_token: bool = False) -> AdapterBatch:
        """One entry per row (or per token with per_token=True): None, a name, or {name: weight}."""
        entries = [self._row_slots(r) for r in rows]
        width = max((len(e) for e in entries), default=1) or 1
        ids = torch.zeros(len(entries), width, dtype=torch.long)
        weights = torch.zeros(len(entries), width)
        for i, pairs in enumerate(entries):
            for j, (slot, w) in enumerate(pairs):
                ids[i, j], weights[i, j] = slot, w
        return self.batch_from_ids(ids, weights, mode="token" if per_token else "row", kernel=kernel)

    def batch_from_ids(self, ids: torch.Tensor, weights: torch.Tensor | None = None, *,
                       mode: str = "row", kernel: str = "auto") -> AdapterBatch:
        """Low-level entry for engines: ids are slots ([n] or [n, K], 0 = none)."""
        used = set(torch.as_tensor(ids, device="cpu").flatten().tolist()) - {0}
        by_slot = {s: n for n, s in self._slots.items()}
        unknown = sorted(s for s in used if s not in by_slot)
        if unknown:
            raise AdapterNotFoundError(f"unknown adapter slot(s) {unknown}; attached: {self._slots}")
        names = [by_slot[s] for s in used]
        merged = [n for n in names if n in self._merged]
        if merged:
            raise ConfigError(f"adapter(s) {merged} are merged into the base; unmerge() before routing rows to them")
        needs_grad = torch.is_grad_enabled() and any(n in self._versions for n in names)
        if not needs_grad:
            for n in names:
                if n in self._versions and self._versions[n] != _version(self.adapters[n]):
                    self.refresh(n)
        return build_batch(ids, weights, mode=mode, kernel=kernel, needs_grad=needs_grad, dtype=self._dtype,
                           device=self._device)

    def underlay(self, name: str, under: Sequence[str]) -> None:
        """Every row that names `name` also gets the adapters `under` at weight 1 (a stack trained as one:
        the task adapter of `train --stack-on`); an empty `under` ends it."""
        for n in (name, *under):
            self.slot(n)                                  # AdapterNotFoundError for one not attached
        if name in under:
            raise ConfigError(f"adapter {name!r} cannot be stacked on itself")
        if under:
            self._under[name] = tuple(under)
        else:
            self._under.pop(name, None)

    def _row_slots(self, entry: RowAdapters) -> list[tuple[int, float]]:
        if entry is None:
            return []
        items = [(entry, 1.0)] if isinstance(entry, str) else entry.items() if isinstance(entry, Mapping) else entry
        pairs = [(str(n), float(w)) for n, w in items]
        named = {n for n, _ in pairs}
        pairs += [(u, 1.0) for n, _ in list(pairs) for u in self._under.get(n, ()) if u not in named]
        return [(self.slot(n), w) for n, w in pairs]

    @contextlib.contextmanager
    def use(self, batch: AdapterBatch) -> Iterator[AdapterBatch]:
        previous, self._current = self._current, batch
        try:
            yield batch
        finally:
            self._current = previous

    def batch(self, rows: Sequence[RowAdapters], *, kernel: str = "auto", per_token: bool = False):
        """Context manager: forward passes inside route each row (or token) to its adapters."""
        return self.use(self.make_batch(rows, kernel=kernel, per_token=per_token))

    def activate(self, adapters: RowAdapters) -> None:
        """Apply the same adapter(s) to every row of every forward until deactivate() (training)."""
        self._default = self.make_batch([adapters]) if adapters is not None else None
        if self._default is not None:
            self._default = build_batch(self._default.ids, self._default.weights, mode="all", dtype=self._dtype,
                                        device=self._device)

    def deactivate(self) -> None:
        self._default = None

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the bare base (or the merged base) inside."""
        saved = self._current, self._default
        self._current = self._default = None
        try:
            yield
        finally:
            self._current, self._default = saved


def _pool_key(adapter: Adapter, own: str) -> str:
    """Which pool of a site holds the adapter's site `own` (its own name for it)."""
    return pool_key(adapter.method, adapter.method.attach_at(adapter.config, own))


def _trainable(adapter: Adapter) -> bool:
    return any(t.requires_grad for parts in adapter.tensors.values() for t in parts.values())


def _version(adapter: Adapter) -> int:
    return sum(t._version for parts in adapter.tensors.values() for t in parts.values())
