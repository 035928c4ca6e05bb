"""Adapter cache of the serving engine: disk -> RAM (LRU by bytes) -> active slots.

Tiers
  disk   the roots (adapter_roots.py): the store, `--adapters` folders, folders named by load().
  RAM    adapters read, structurally checked and converted to the base dtype, not attached: an
         LRU bounded by the bytes of their tensors (`ram_cache_mb`, MiB). An adapter larger than
         the whole budget is never kept there (it is read from disk again when needed). Fit to the
         base (fingerprint, shapes) is runtime.add's check, made at attach (and by load()).
  slots  adapters attached to the AdapterRuntime, at most `max_loaded` at once. An adapter leaves
         RAM when attached and goes back (most recent) when evicted from its slot, so memory held
         is at most ram_cache_mb + max_loaded adapters.

Policies
  - acquire(name) attaches the adapter if needed and counts one request in flight; release(handle)
    ends it. An adapter with requests in flight, or pinned, is never evicted; the victim is the
    least recently used idle one (use = acquire or release).
  - Every slot busy: acquire raises NoFreeSlotError at once (timeout=0: the engine keeps the
    request queued and retries next step; the API answers 429 when its queue is full), or waits up
    to `timeout` seconds for a release. The engine thread itself must use timeout=0.
  - A new adapter is attached BEFORE its victim is detached (the runtime gets max_loaded + 1
    slots), so an adapter the base refuses (runtime.add checks fingerprint and shapes) evicts
    nobody and leaves the cache as it was; the error is raised to that request only.
  - Versions: entries are keyed by the name AND the version on disk (Source.version: the store's
    content digest and folder, or a folder's stats). Every find/acquire checks the version
    cheaply (roots.current); an adapter replaced on disk (train/merge --overwrite, a folder
    swapped) is read again for the next request and is never served stale. The old version is
    retired: requests in flight finish on it, and it is detached at their last release (it
    holds its runtime slot under another key meanwhile).
  - Weights are checked when read: NaN / inf, or values (or a ΔW) that overflow the base dtype,
    fail that adapter's read (NonFiniteError) and nothing else. The task head is not read:
    generation does not use it.
  - load(name, path) reads and validates at once (attached, detached, kept in RAM): a corrupt or
    foreign adapter fails the load call (HTTP 400) and nothing is registered. A name already
    served from another folder (loaded, or in a root) is refused; the same name and folder is a no-op.
  - unload(name) stops serving the name at once (new acquires: AdapterNotFoundError). With requests
    in flight its version is retired (detached at the last release; unload returns False) and the
    name may be loaded again at once. An unloaded name stays hidden from lazy discovery until
    load(name, path) names it again.
  - pin(name) attaches it and keeps it attached until unpin/unload; at most max_loaded - 1 pins,
    so one slot always serves the others.
  - prefetch(name) reads into RAM on a background thread; idempotent; a read error is raised by
    the next acquire of that name (once).

Threads: a bookkeeping lock (short sections) and a runtime lock that every attach/detach and every
forward takes (LoraPool restacks on attach: engines run forwards in `cache.batch(rows)` or `with
cache.locked():`); order bookkeeping -> runtime, so a submit never waits for a step. Disk reads run
outside both; concurrent requests for one name share one read (a Future).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from ...core.adapter import validate_name
from ...errors import AdapterkitError, AdapterNameError, AdapterNotFoundError, ConfigError
from .roots import AdapterRoots, Source, folder_version
from .stats import CacheCounters
from .tiers import Entry, RamTier, read_entry


class NoFreeSlotError(AdapterkitError, RuntimeError):
    """Every adapter slot holds an adapter with requests in flight or pinned: queue, or HTTP 429."""


@dataclass(eq=False)
class AdapterHandle:
    """One request's hold on an attached adapter; `slot` stays valid until release."""

    name: str
    slot: int
    _cache: "AdapterCache" = field(repr=False)
    _entry: Entry = field(repr=False)
    released: bool = False

    @property
    def source(self) -> Source:
        """The version this handle holds (it stays attached until release, whatever is on disk)."""
        return self._entry.source

    def release(self) -> None:
        self._cache.release(self)

    def __enter__(self) -> "AdapterHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.released:
            self.release()


_BUSY = object()   # _victim(): every slot is busy


class AdapterCache:
    def __init__(self, runtime: Any, *, store: Any = None, adapter_dirs: Iterable[Any] = (),
                 max_loaded: int = 8, ram_cache_mb: float = 1024.0, prefetch_workers: int = 1) -> None:
        if max_loaded < 1:
            raise ConfigError(f"max_loaded must be >= 1, got {max_loaded}")
        if ram_cache_mb < 0:
            raise ConfigError(f"ram_cache_mb must be >= 0, got {ram_cache_mb}")
        if runtime.adapters:
            raise ConfigError("the adapter cache owns attach/detach: give it a runtime with no adapters attached")
        self.runtime = runtime
        self.max_loaded = max_loaded
        runtime.capacity = max(runtime.capacity, max_loaded + 1)   # the spare slot: attach before evicting
        self.roots = AdapterRoots(store, adapter_dirs, runtime.fingerprint)
        self._dtype = next(runtime.model.parameters()).dtype
        self._lock = threading.RLock()                      # bookkeeping: short sections only
        self._runtime_lock = threading.RLock()              # runtime attach/detach vs forward passes
        self._freed = threading.Condition(self._lock)       # notified when a slot may have become free
        self._sources: dict[str, Source] = self.roots.scan()  # served names (raises on a clash)
        self._hidden: set[str] = set()                       # unloaded: skipped by lazy discovery
        self._active: OrderedDict[str, Entry] = OrderedDict()  # attached current versions, least recent first
        self._retired: set[Entry] = set()                   # attached old versions with requests in flight
        self._keys = itertools.count(1)                      # runtime keys of versions that share a name
        self._pinned: set[str] = set()
        self._loading: dict[str, Future] = {}                # reads in progress, shared by waiters
        self._prefetch_errors: dict[str, BaseException] = {}
        self._active_bytes = 0
        self._stats = CacheCounters()
        self._count = self._stats.count
        self._ram = RamTier(int(ram_cache_mb * 2 ** 20), self._count)   # read, not attached
        self._executor = ThreadPoolExecutor(max_workers=prefetch_workers, thread_name_prefix="adapter-prefetch")

    @property
    def ram_budget(self) -> int:
        """Bytes the RAM tier may hold (ram_cache_mb)."""
        return self._ram.budget

    # ------------------------------------------------------------------ names
    def names(self) -> list[str]:
        """Served names (for /v1/models): discovered, lazily found or loaded, minus unloaded."""
        with self._lock:
            return sorted(self._sources)

    def find(self, name: str) -> Source:
        """Where `name` is served from (found lazily if new); AdapterNotFoundError if not served."""
        return self._source(name)

    def _source(self, name: str) -> Source:
        with self._lock:
            src = self._sources.get(name)
            blocked = name in self._hidden
        if src is not None:
            return self._current(name, src)
        if not blocked:
            found = self.roots.find(name)          # a few stats, outside the lock
            if found is not None:
                with self._lock:
                    if name not in self._hidden:
                        return self._sources.setdefault(name, found)
        why = self.roots.skipped.get(name)
        if why is not None:
            raise AdapterNotFoundError(f"adapter {name!r} is not served: {why}")
        with self._lock:
            known = sorted(self._sources)
        shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "") if known else "none"
        raise AdapterNotFoundError(f"unknown adapter {name!r}; served adapters: {shown}")

    def _current(self, name: str, src: Source) -> Source:
        """The served version of `name`: `src` unless the adapter changed on disk since, in which case
        the old version is retired (in-flight requests keep it) and the new one is served."""
        now = self.roots.current(src)              # a catalog change mark or a few stats, outside the lock
        if now is src:
            return src
        with self._lock:
            served = self._sources.get(name)
            if served is not src:                  # replaced or unloaded meanwhile by another thread
                if served is None:
                    raise AdapterNotFoundError(f"adapter {name!r} was unloaded")
                return served
            self._ram.remove(name)
            self._prefetch_errors.pop(name, None)
            e = self._active.get(name)
            if e is not None:
                self._retire(e)
            self._count["replaced"] += 1
            if now is None:
                del self._sources[name]
                raise AdapterNotFoundError(f"adapter {name!r} is no longer on disk (deleted from its root or the "
                                           "store); it is not served any more")
            self._sources[name] = now
            return now

    # ------------------------------------------------------------------ acquire / release
    def acquire(self, name: str, timeout: float = 0.0) -> AdapterHandle:
        """Attach `name` if needed and hold it (refcount + 1) until `release`. Raises
        AdapterNotFoundError, NoFreeSlotError (after `timeout` s), or the adapter's read/base error."""
        src = self._source(name)
        deadline = time.monotonic() + timeout
        loaded: Entry | None = None      # an entry read (or found) by this call, kept across retries
        first = True
        while True:
            owner, fut = False, None
            with self._lock:
                served = self._sources.get(name)
                if served is None:
                    raise AdapterNotFoundError(f"adapter {name!r} was unloaded")
                if served is not src:              # a new version appeared meanwhile: serve that one
                    src, loaded = served, None
                e = self._active.get(name)
                if e is not None:
                    if first:
                        self._count["slot_hits"] += 1
                    return self._hold(e)
                if first:
                    self._count["slot_misses"] += 1
                    err = self._prefetch_errors.pop(name, None)
                    if err is not None:
                        raise err
                e = self._ram.get(name)
                if e is None and loaded is not None and loaded.source is src:
                    e = loaded
                if first:
                    self._count["ram_hits" if e is not None else "ram_misses"] += 1
                    first = False
                if e is not None:
                    victim = self._victim()
                    if victim is not _BUSY:
                        self._attach(e, victim)
                        return self._hold(e)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._count["busy_errors"] += 1
                        if name not in self._ram:
                            self._ram.put(e)           # keep the read for a later request
                        raise NoFreeSlotError(
                            f"no free adapter slot for {name!r}: all {self.max_loaded} slots hold adapters "
                            f"with requests in flight or pinned; retry later"
                        )
                    loaded = e
                    self._freed.wait(remaining)
                    continue
                fut = self._loading.get(name)
                if fut is None:
                    fut = self._loading[name] = Future()
                    owner = True
            if owner:
                self._read_into(src, fut, prefetch=False)
            try:
                loaded = fut.result()
            except BaseException as exc:
                with self._lock:
                    if self._prefetch_errors.get(name) is exc:   # reported here, not again
                        del self._prefetch_errors[name]
                raise

    def release(self, handle: AdapterHandle) -> None:
        with self._lock:
            if handle.released:
                raise ConfigError(f"the handle on adapter {handle.name!r} was already released")
            handle.released = True
            e = handle._entry
            e.refs -= 1
            if e.refs == 0:
                if e.draining:
                    self._retired.discard(e)
                    self._unattach(e)
                elif self._active.get(handle.name) is e:
                    self._active.move_to_end(handle.name)
                self._freed.notify_all()

    def _hold(self, e: Entry) -> AdapterHandle:
        name = e.source.name
        e.refs += 1
        self._active.move_to_end(name)
        self._stats.requests[name] += 1
        return AdapterHandle(name, e.slot, self, e)

    # ------------------------------------------------------------------ tiers (lock held)
    def _victim(self) -> Any:
        """None when a slot is free, else the least recently used idle unpinned entry, else _BUSY."""
        if len(self._active) + len(self._retired) < self.max_loaded:   # retired versions hold slots too
            return None
        for name, e in self._active.items():
            if e.refs == 0 and name not in self._pinned:
                return e
        return _BUSY

    def _attach(self, e: Entry, victim: Entry | None) -> None:
        name = e.source.name
        key = name if name not in self.runtime.adapters else f"{name}#{next(self._keys)}"
        try:
            with self._runtime_lock:
                e.slot = self.runtime.add(e.attachable(), key=key)   # validates base fingerprint and shapes
                e.key = key
        except BaseException:
            self._count["attach_errors"] += 1
            self._ram.remove(name, e)                  # a refused adapter is not kept
            raise
        self._ram.remove(name, e)
        self._active[name] = e
        self._active_bytes += e.attached_nbytes
        if victim is not None:
            self._detach(victim, keep=True)
            self._count["evictions_slot"] += 1

    def _detach(self, e: Entry, keep: bool) -> None:
        """An idle current version leaves its slot (back to RAM if keep)."""
        name = e.source.name
        del self._active[name]
        self._unattach(e)
        if keep and self._sources.get(name) is e.source:
            self._ram.put(e)

    def _unattach(self, e: Entry) -> None:
        with self._runtime_lock:
            self.runtime.remove(e.key)
        self._active_bytes -= e.attached_nbytes
        e.slot, e.key = 0, ""

    def _retire(self, e: Entry) -> None:
        """A current version stops being current (replaced on disk, or unloaded): detached now if
        idle, else when its last request in flight ends."""
        del self._active[e.source.name]
        if e.refs == 0:
            self._unattach(e)
        else:
            e.draining = True
            self._retired.add(e)
        self._freed.notify_all()

    # ------------------------------------------------------------------ reading (no lock)
    def _read_into(self, src: Source, fut: Future, prefetch: bool) -> None:
        """Read `src`, record the load, resolve `fut` (prefetch: also insert into RAM)."""
        name, t0 = src.name, time.perf_counter()
        try:
            e = read_entry(src, self.roots, self._dtype)
        except BaseException as exc:
            with self._lock:
                if self._loading.get(name) is fut:
                    del self._loading[name]
                self._count["load_errors"] += 1
                if prefetch and self._sources.get(name) is src:
                    self._prefetch_errors[name] = exc
            fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        with self._lock:
            if self._loading.get(name) is fut:
                del self._loading[name]
            self._stats.record_load(time.perf_counter() - t0)
            if prefetch and self._sources.get(name) is src and name not in self._active:
                self._ram.put(e)
        fut.set_result(e)

    # ------------------------------------------------------------------ prefetch / pins
    def prefetch(self, name: str) -> Future | None:
        """Start reading `name` into RAM in the background (call when a request is queued).
        Returns the read's Future, or None when there is nothing to read. Unknown names raise now."""
        src = self._source(name)
        with self._lock:
            if name in self._active or name in self._prefetch_errors:
                return None
            if name in self._ram:
                self._ram.touch(name)
                return None
            fut = self._loading.get(name)
            if fut is not None:
                return fut
            fut = self._loading[name] = Future()
            self._count["prefetches"] += 1
            try:
                self._executor.submit(self._read_into, src, fut, True)
            except RuntimeError:                        # executor shut down
                del self._loading[name]
                raise ConfigError("the adapter cache is closed") from None
            return fut

    def pin(self, name: str, timeout: float = 0.0) -> None:
        """Attach `name` and keep it attached until unpin/unload (a hot adapter)."""
        handle = self.acquire(name, timeout)
        try:
            with self._lock:
                if name not in self._pinned and len(self._pinned) >= self.max_loaded - 1:
                    raise ConfigError(
                        f"cannot pin {name!r}: {len(self._pinned)} of {self.max_loaded} adapter slots are pinned "
                        "and one must stay free for the other adapters; unpin one or raise max_loaded"
                    )
                self._pinned.add(name)
        finally:
            self.release(handle)

    def unpin(self, name: str) -> bool:
        """Make `name` evictable again; False if it was not pinned."""
        with self._lock:
            if name not in self._pinned:
                return False
            self._pinned.discard(name)
            self._freed.notify_all()
            return True

    # ------------------------------------------------------------------ load / unload by request
    def load(self, name: str, path: Any) -> Source:
        """Serve the adapter folder `path` (confined to the roots) as `name` (vLLM's
        load_lora_adapter). Reads and validates now; the same name and folder again is a no-op."""
        validate_name(name)
        real = self.roots.resolve(path)
        in_root = self.roots.find(name)                # a root folder of that name, not yet requested
        with self._lock:
            same = self._check_free(name, real, in_root)
        if same is not None:
            return same
        src = Source(name, real, "load", folder_version(real))
        fut: Future = Future()
        self._read_into(src, fut, prefetch=False)
        e = fut.result()                               # raises the read error
        with self._lock:
            same = self._check_free(name, real, in_root)
            if same is not None:
                return same
            with self._runtime_lock:
                probe = f"{name}#{next(self._keys)}"
                try:                                   # the base's own checks (fingerprint, shapes)
                    self.runtime.add(e.attachable(), key=probe)   # a free slot: the runtime grows if needed
                except BaseException:
                    self._count["attach_errors"] += 1
                    raise
                self.runtime.remove(probe)
            self._sources[name] = src
            self._hidden.discard(name)
            self._ram.put(e)
        return src

    def _check_free(self, name: str, real: Any, in_root: Source | None) -> Source | None:
        """None if `name` may be loaded from `real`; the current Source if it already is."""
        src = self._sources.get(name)
        if src is None and in_root is not None and name not in self._hidden and in_root.path != real:
            src = in_root                               # a root serves this name from another folder
        if src is None:
            return None
        if src.path == real:
            return src
        raise AdapterNameError(f"an adapter named {name!r} is already served (from {src.path}); "
                               "unload it first or choose another name")

    def unload(self, name: str) -> bool:
        """Stop serving `name`. True: gone now; False: detached at its last in-flight release."""
        with self._lock:
            if self._sources.pop(name, None) is None:
                raise AdapterNotFoundError(f"unknown adapter {name!r}; nothing to unload")
            self._hidden.add(name)
            self._pinned.discard(name)
            self._prefetch_errors.pop(name, None)
            self._ram.remove(name)
            e = self._active.get(name)
            if e is None:
                return True
            self._retire(e)
            return not e.draining

    # ------------------------------------------------------------------ forwards, stats, close
    @contextlib.contextmanager
    def batch(self, rows: Sequence[Any], **kwargs: Any) -> Iterator[Any]:
        """runtime.batch(rows) with the runtime lock held: no attach/detach during the forward.
        Rows name adapters (None, a name, or {name: weight}); each goes to its current version."""
        def key(name: str) -> str:
            e = self._active.get(name)
            return e.key if e is not None else name
        rows = [r if r is None else key(r) if isinstance(r, str) else {key(n): w for n, w in dict(r).items()}
                for r in rows]
        with self._runtime_lock, self.runtime.batch(rows, **kwargs) as b:
            yield b

    def locked(self) -> Any:
        """The runtime lock (re-entrant) for forwards built with runtime.batch_from_ids; find and
        prefetch never wait for it."""
        return self._runtime_lock

    def stats(self) -> dict[str, Any]:
        """Counters for /metrics. Hits/misses count acquire calls: slot_* whether the adapter was
        attached, ram_* (slot misses only) whether RAM had it; loads = disk reads."""
        with self._lock:
            return {
                **self._stats.snapshot(),
                "ram_bytes": self._ram.nbytes, "ram_budget_bytes": self._ram.budget, "ram_adapters": self._ram.names(),
                "active_bytes": self._active_bytes, "max_loaded": self.max_loaded,
                "active": {n: {"slot": e.slot, "refs": e.refs, "pinned": n in self._pinned, "draining": e.draining}
                           for n, e in self._active.items()},
                "draining": sorted(e.source.name for e in self._retired),
                "pinned": sorted(self._pinned), "served": len(self._sources),
            }

    def close(self) -> None:
        """Finish background reads and stop the prefetch thread."""
        self._executor.shutdown(wait=True)

    def __enter__(self) -> "AdapterCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
