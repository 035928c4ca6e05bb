"""What every router shares: the Decision, typed errors, the adapter records a router is bound to,
and router artifacts in the store.

A router is an artifact in the store beside the adapters, written atomically:

    <store>/routers/<name>/router.json          type, format_version, kind, adapters (name, content
                                                fingerprint, base fingerprint, task), encoder, examples
                                                used, calibration, created
    <store>/routers/<name>/router.safetensors   the router's tensors (descriptors, or gate weights)
    <store>/routers/DEFAULT                     the name `model="auto"` resolves to

A router records the content fingerprint of every adapter it routes to. If the store's adapter of
that name has since been deleted or replaced (another fingerprint), the router refuses to route to
it and says which (StaleRouterError, or a fallback decision with the reason when loaded non-strict).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from .._atomic import atomic_write_dir, atomic_write_text, recover_dir
from ..core.adapter import Adapter, check_same_base, validate_name
from ..errors import (AdapterkitError, AdapterNameError, AdapterNotFoundError, BaseMismatchError,
                      ConfigError, CorruptAdapterError)
from ..formats.safetensors_io import read_tensors, write_tensors

FORMAT_VERSION = 1
ROUTER_JSON, ROUTER_TENSORS, DEFAULT_FILE = "router.json", "router.safetensors", "DEFAULT"
AUTO = "auto"                     # the name that means "the store's default router"


class RouterNotFoundError(AdapterNotFoundError):
    """No router of that name in the store (HTTP 404)."""


class StaleRouterError(AdapterkitError, RuntimeError):
    """An adapter the router was fitted on has been deleted or replaced in the store since (HTTP 409)."""


class EmptyPromptError(ConfigError):
    """A prompt with no text to route on (HTTP 400)."""


@dataclass(frozen=True)
class Decision:
    """Where one request goes. adapters: {name: weight} (weights sum to 1; empty = the bare base)."""

    adapters: dict[str, float]
    scores: dict[str, float]       # the router's raw score per adapter (cosine similarity; gate: mean prob)
    confidence: float              # calibrated probability that the top adapter is right
    fallback: bool                 # True: the router did not trust its choice (or could not use it)
    reason: str                    # one line a person can read

    @property
    def top(self) -> str | None:
        """The adapter with the largest weight (None: the base)."""
        return max(self.adapters, key=self.adapters.__getitem__) if self.adapters else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AdapterRecord:
    """What a router remembers of each adapter it routes to."""

    name: str
    fingerprint: str               # content fingerprint (merge.common.content_fingerprint)
    base_fingerprint: str | None
    base_name: str | None
    task: str | None

    @classmethod
    def of(cls, adapter: Adapter) -> "AdapterRecord":
        from ..merge.common import content_fingerprint

        return cls(adapter.name, content_fingerprint(adapter), adapter.meta.base_fingerprint,
                   adapter.meta.base_name, adapter.meta.task)


def check_adapters(adapters: Sequence[Adapter]) -> list[AdapterRecord]:
    """Refuse no adapters, one adapter twice, and adapters of different bases (naming both)."""
    if len(adapters) < 1:
        raise ConfigError("a router needs at least one adapter; --adapters is empty")
    names = [a.name for a in adapters]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"adapter(s) {twice} are listed more than once; list each adapter once")
    check_same_base(adapters, "route between adapters", "a router serves the adapters of one base")
    return [AdapterRecord.of(a) for a in adapters]


def check_base(records: Sequence[AdapterRecord], fingerprint: str | None, base_name: str | None) -> None:
    """The adapters were made for this base (the one the router runs them on)."""
    for r in records:
        if r.base_fingerprint and fingerprint and r.base_fingerprint != fingerprint:
            raise BaseMismatchError(
                f"adapter {r.name!r} was made for base {r.base_name or '?'} ({r.base_fingerprint}), but the "
                f"router runs on {base_name or '?'} ({fingerprint}); pass the adapters' base with --base")


def stale_adapters(records: Sequence[AdapterRecord], store: Any,
                   pinned: str = "the router was fitted on") -> dict[str, str]:
    """{name: why} for each recorded adapter that the store no longer holds as it was (`pinned`: who
    recorded the fingerprint, in the message)."""
    from ..merge.common import content_fingerprint

    stale: dict[str, str] = {}
    for r in records:
        if r.name not in store:
            stale[r.name] = f"adapter {r.name!r} was deleted from the store"
            continue
        try:
            now = content_fingerprint(store.get(r.name))
        except AdapterkitError as exc:
            stale[r.name] = f"adapter {r.name!r} cannot be read ({exc})"
            continue
        if now != r.fingerprint:
            stale[r.name] = f"adapter {r.name!r} was replaced in the store (content {now}, {pinned} {r.fingerprint})"
    return stale


def stale_error(router: str, stale: dict[str, str]) -> StaleRouterError:
    return StaleRouterError(
        f"router {router!r} refuses to route to {', '.join(repr(n) for n in stale)}: "
        f"{'; '.join(stale.values())}; fit the router again (adapterkit route fit ... --overwrite)")


# ---------------------------------------------------------------------------- storage
def routers_dir(store: Any) -> Path:
    return Path(store.root) / "routers"


def router_path(store: Any, name: str) -> Path:
    return routers_dir(store) / validate_name(name)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_router_name(store: Any, name: str, overwrite: bool) -> None:
    """A free router name: well-formed, not 'auto', not an adapter's name (the server puts adapters
    and routers in one model namespace), not taken unless overwrite."""
    validate_name(name)
    if name == AUTO:
        raise AdapterNameError(f"{AUTO!r} means the store's default router; give the router another name "
                               "(the first router fitted becomes the default)")
    if name in store:
        raise AdapterNameError(f"{name!r} is an adapter in the store at {store.root}; routers and adapters share "
                               "one model namespace: choose another router name")
    if not overwrite and (router_path(store, name) / ROUTER_JSON).is_file():
        raise AdapterNameError(f"a router named {name!r} is already in the store at {store.root}; choose another "
                               "name or pass --overwrite to replace it")


def save_router(store: Any, name: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write router.json + router.safetensors atomically; the first router becomes the default."""
    def write(tmp: Path) -> None:
        write_tensors(tmp / ROUTER_TENSORS, tensors)
        (tmp / ROUTER_JSON).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    path = atomic_write_dir(router_path(store, name), write)
    if default_router(store) is None:
        set_default_router(store, name)
    return path


def read_router(store: Any, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if name == AUTO:
        name = default_router(store) or ""
        if not name:
            raise RouterNotFoundError(f"no default router in the store at {store.root}: fit one with "
                                      "`adapterkit route fit --adapters a,b --name NAME`")
    path = router_path(store, name)
    recover_dir(path)
    if not (path / ROUTER_JSON).is_file():
        known = list_routers(store)
        raise RouterNotFoundError(f"no router named {name!r} in the store at {store.root}; routers: "
                                  f"{', '.join(known) if known else 'none (fit one with adapterkit route fit)'}")
    try:
        meta = json.loads((path / ROUTER_JSON).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CorruptAdapterError(f"{path / ROUTER_JSON} is not valid JSON ({exc}); fit the router again") from None
    if not str(meta.get("type", "")).startswith("adapterkit.router.") or meta.get("format_version", 0) > FORMAT_VERSION:
        raise CorruptAdapterError(f"{path / ROUTER_JSON} is type {meta.get('type')!r} version "
                                  f"{meta.get('format_version')!r}; this adapterkit reads adapterkit.router.* up "
                                  f"to version {FORMAT_VERSION}: upgrade adapterkit")
    top_k, n = meta.get("top_k"), len(meta.get("adapters") or [])
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n:
        raise CorruptAdapterError(f"{path / ROUTER_JSON} records top_k {top_k!r} for {n} adapter(s); top_k must be "
                                  f"in [1, {n}]: fit the router again (adapterkit route fit ... --overwrite)")
    return meta, read_tensors(path / ROUTER_TENSORS)


def list_routers(store: Any) -> list[str]:
    root = routers_dir(store)
    return sorted(p.name for p in root.iterdir() if (p / ROUTER_JSON).is_file()) if root.is_dir() else []


def default_router(store: Any) -> str | None:
    path = routers_dir(store) / DEFAULT_FILE
    name = path.read_text(encoding="utf-8").strip() if path.is_file() else ""
    return name if name and (router_path(store, name) / ROUTER_JSON).is_file() else None


def set_default_router(store: Any, name: str) -> None:
    if not (router_path(store, name) / ROUTER_JSON).is_file():
        raise RouterNotFoundError(f"no router named {name!r} in the store at {store.root}")
    atomic_write_text(routers_dir(store) / DEFAULT_FILE, name + "\n")


def check_prompts(texts: Sequence[str]) -> list[str]:
    """Refuse a non-string, an empty or a whitespace-only prompt, naming its index."""
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise EmptyPromptError(f"prompt(s) at index {bad} are empty or whitespace only; a router chooses the "
                               "adapter from the prompt's text: send text, or name an adapter as the model")
    return texts


# ---------------------------------------------------------------------------- option checks
def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """Refuse a non-integer count or one below `minimum`; `name` says which option (and its flag)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_positive(name: str, value: Any, *, zero: bool = False) -> float:
    """Refuse a non-finite number, or one <= 0 (< 0 with zero=True)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not zero):
        raise ConfigError(f"{name} must be a finite number {'>=' if zero else '>'} 0, got {value!r}")
    return float(value)


def check_top_k(top_k: Any, names: Sequence[str]) -> int:
    """1 <= top_k <= the number of adapters the router chooses from (naming both numbers)."""
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise ConfigError(f"top_k must be a positive integer, got {top_k!r}")
    if top_k > len(names):
        raise ConfigError(f"top_k must be an integer in [1, {len(names)}] (the number of adapters), got {top_k}: "
                          f"the router has {len(names)} adapter(s) ({', '.join(names)}), so at most {len(names)} "
                          f"can be active; pass --top-k {len(names)} or less")
    return top_k


def check_writable(folder: str | os.PathLike, what: str, fix: str) -> None:
    """Before any long work: the folder (or its nearest existing ancestor: missing folders are made
    when writing) is a folder we may write to."""
    parent = Path(folder)
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write {what}: {parent} is a file, not a folder; {fix}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {what}: the folder {parent} is not writable; {fix}")


def check_output_path(path: str | os.PathLike, what: str, fix: str) -> Path:
    """Before any long work: refuse an output file path that is a folder or cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"the {what} {path} is a folder, not a file; {fix}")
    check_writable(path.parent, f"the {what} {path}", fix)
    return path


def records_from_meta(meta: dict[str, Any]) -> list[AdapterRecord]:
    return [AdapterRecord(**r) for r in meta["adapters"]]


def verify_router(router: Any, records: Sequence[AdapterRecord], store: Any, strict: bool) -> dict[str, str]:
    """Compare a router's recorded adapters with the store. strict: raise StaleRouterError naming
    them; else mark them unusable on the router (never chosen) and return {name: why}."""
    stale = stale_adapters(list(records), store)
    if stale and strict:
        raise stale_error(router.name, stale)
    router.unusable = stale
    return stale
