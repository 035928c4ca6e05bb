"""The adapter cache's pieces below its policy (adapter_cache.py): one read adapter (`Entry`), the
RAM tier (an LRU bounded by bytes) and the disk read that makes an Entry. No locks here: the cache
calls the tier under its bookkeeping lock, and reads outside it."""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from ...core.adapter import Adapter
from ...errors import AdapterkitError, CorruptAdapterError
from .roots import Source


@dataclass(eq=False)
class Entry:
    """One read version of an adapter, in the RAM tier or attached. A low-bit adapter stays packed here
    (its float matrices dropped, `adapter.packed` kept): the RAM tier counts and holds the packed bytes,
    and attach unpacks (`attachable`); its floats live only while it holds a slot."""

    source: Source
    adapter: Adapter        # a low-bit adapter without its packed matrices (see attachable)
    nbytes: int             # bytes as held in RAM: its tensors in the base dtype; packed codes and scales
    slot: int = 0           # runtime slot while attached, else 0
    key: str = ""           # its runtime key while attached: the name, or name#n while a retired
                            # version still holds the name there
    refs: int = 0           # requests in flight
    draining: bool = False  # retired (replaced on disk, or unloaded) in flight: detached at the last release
    dtype: torch.dtype = torch.float32     # the base's: what a packed adapter unpacks to
    attached_nbytes: int = 0               # bytes while attached: every tensor a float of the base dtype

    def attachable(self) -> Adapter:
        """The adapter with every tensor as a float of the base dtype: a packed one unpacked now (two
        vectorised ops; views of one buffer, which the slots copy)."""
        a = self.adapter
        if a.packed is None:
            return a
        full = {site: dict(parts) for site, parts in a.tensors.items()}
        for site, parts in a.packed.unpack(self.dtype, copy=False).items():
            full.setdefault(site, {}).update(parts)
        out = copy.copy(a)
        out.tensors = full
        return out


class RamTier:
    """Read, unattached entries by name, least recently used first, within `budget` bytes."""

    def __init__(self, budget: int, count: Any) -> None:
        self.budget = budget
        self.nbytes = 0
        self._count = count                                  # the cache's counters (evictions_ram, ram_rejects)
        self._entries: OrderedDict[str, Entry] = OrderedDict()

    def get(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def touch(self, name: str) -> None:
        self._entries.move_to_end(name)

    def put(self, e: Entry) -> None:
        """Insert as most recent; evict least recent entries until the byte budget holds. An entry
        larger than the whole budget is not kept."""
        name = e.source.name
        self.remove(name)
        if e.nbytes > self.budget:
            self._count["ram_rejects"] += 1
            return
        while self.nbytes + e.nbytes > self.budget:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes
            self._count["evictions_ram"] += 1
        self._entries[name] = e
        self.nbytes += e.nbytes

    def remove(self, name: str, only: Entry | None = None) -> None:
        """Drop `name` (only if it is the entry `only`, when given)."""
        e = self._entries.get(name)
        if e is not None and (only is None or e is only):
            del self._entries[name]
            self.nbytes -= e.nbytes


def read_entry(src: Source, roots: Any, dtype: torch.dtype) -> Entry:
    """Read one adapter version from disk, checked and converted to the base dtype; it stays on the host
    (attach copies it to the base's device, if that is not the host). Any failure is a typed adapterkit
    error; the task head is not read (generation does not use it, so a damaged head does not stop it)."""
    if not src.path.is_dir():
        raise CorruptAdapterError(f"adapter {src.name!r}: folder {src.path} no longer exists")
    roots.check_folder(src.path)                       # a file swapped for a symlink out since discovery
    try:
        adapter = Adapter.load(src.path, name=src.name, head=False)   # NaN / inf refused here
        adapter.check_finite(dtype)                    # and values or a ΔW that overflow the base dtype
        if src.origin == "store" and roots.store is not None:
            from ...train.compose import check_sources

            check_sources(adapter, roots.store)        # a composition whose source was replaced or deleted
    except AdapterkitError:
        raise
    except Exception as exc:
        raise CorruptAdapterError(
            f"adapter {src.name!r} at {src.path} could not be read ({type(exc).__name__}: {exc})") from None
    kinds = adapter.method.tensor_kinds(adapter.config)     # a declared dtype (an int64 index) is kept
    for parts in adapter.tensors.values():
        for key, t in parts.items():
            if kinds[key].dtype is None and t.dtype != dtype:
                parts[key] = t.to(dtype)
    attached = sum(t.numel() * t.element_size() for parts in adapter.tensors.values() for t in parts.values())
    if adapter.packed is None:
        return Entry(src, adapter, attached, dtype=dtype, attached_nbytes=attached)
    packed = {(site, key) for site, key, _ in adapter.packed.layout}
    held = copy.copy(adapter)                          # only the packed form of its matrices stays in RAM
    held.tensors = {site: {k: t for k, t in parts.items() if (site, k) not in packed}
                    for site, parts in adapter.tensors.items()}
    return Entry(src, held, held.stored_bytes(), dtype=dtype, attached_nbytes=attached)
