"""`model="auto"` and `model="<router>"`: the server asks a stored router which adapter(s) serve a
request (no web-framework import; service.py calls it).

    routing = Routing(engine, store)
    if routing.is_router(model):
        decision = routing.decide(model, text)      # in a worker thread: it runs an encoder forward
        adapters = decision.adapters or None        # {name: weight}; {} -> the bare base

Routers are loaded once per name, non-strict: an adapter deleted or replaced in the store since the
router was fitted is never chosen, and a prompt that would have gone to it falls back (the decision
says why). A router fitted with the served base as its encoder encodes with that same model, with
adapters switched off, under the runtime lock (between engine steps); any other encoder (MiniLM)
is loaded once and runs on its own.

A learned gate router decides per token inside the forward (serve/gating.py), so there is no
decision before generation: the request goes to the engine with the gate; the answer reports each
adapter's share of the gate weight over the request's tokens (JSON field and header). A streamed
answer's header, sent before any token, names the gate and its candidate adapters instead
(`gate:NAME(a,b,c)`); its finish chunk carries the shares; /metrics counts it under adapter
"(per-token)".
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Optional

from ...errors import BaseMismatchError, ConfigError

HEADER = "x-adapterkit-adapters"
PER_TOKEN = "(per-token)"


def header_value(adapters: dict[str, float]) -> str:
    """`name=weight,...`, or `base` for the bare base."""
    return ",".join(f"{n}={w:.4g}" for n, w in adapters.items()) or "base"


def routed_header(routed: dict[str, Any]) -> str:
    """The header of a routed answer; a gate's before its tokens exist: `gate:NAME(candidates)`."""
    if routed.get("gate") and routed.get("adapters") is None:
        return f"gate:{routed['router_name']}({','.join(routed['candidates'])})"
    return header_value(routed["adapters"])


class Routing:
    def __init__(self, engine: Any, store: Any) -> None:
        self.engine = engine
        self.store = store
        self._routers: dict[str, Any] = {}
        self._encoders: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.decisions: collections.Counter[tuple[str, str, bool]] = collections.Counter()  # (router, top, fallback)

    def names(self) -> list[str]:
        """Routers a request may name ("auto" when the store has a default router)."""
        if self.store is None:
            return []
        from ...route import default_router, list_routers

        return (["auto"] if default_router(self.store) else []) + list_routers(self.store)

    def is_router(self, model: str) -> bool:
        """"auto", or the name of a router in the store (one stat; names are validated first)."""
        if model == "auto":
            return True
        if self.store is None:
            return False
        from ...core.adapter import validate_name
        from ...errors import AdapterNameError
        from ...route.common import ROUTER_JSON, router_path

        try:
            validate_name(model)
        except AdapterNameError:
            return False
        return (router_path(self.store, model) / ROUTER_JSON).is_file()

    def router(self, model: str) -> Any:
        """The loaded router, reloaded (and so re-verified against the store) whenever the store's
        catalog, the router's file or the default router changed: an adapter replaced or deleted
        while serving is never routed to."""
        sig = self._signature(model)
        with self._lock:
            cached = self._routers.get(model)
            if cached is None or cached[0] != sig:
                self._routers[model] = (sig, self._load(model))
            return self._routers[model][1]

    def _signature(self, model: str) -> tuple[Any, ...]:
        from ...route import default_router
        from ...route.common import ROUTER_JSON, router_path

        if self.store is None:
            return ()
        name = default_router(self.store) if model == "auto" else model
        if not name:
            return ()

        def mtime(p: Any) -> int:
            return p.stat().st_mtime_ns if p.exists() else 0
        return (name, mtime(router_path(self.store, name) / ROUTER_JSON), self.store.change_mark())

    def _load(self, model: str) -> Any:
        from ...route import ENCODER_TYPES, RouterNotFoundError, load_router
        from ...route.common import read_router

        if self.store is None:
            raise RouterNotFoundError(f"no router {model!r}: this server has no adapter store (--store)")
        meta, _ = read_router(self.store, model)
        if meta["type"] not in ENCODER_TYPES:              # a learned gate: runs inside the engine
            gate = load_router(self.store, model, strict=False)
            gate.check_base(self.engine.runtime.fingerprint, self.engine.base_name)
            return gate
        encoder = self._encoder(meta["encoder"])
        router = load_router(self.store, model, encoder=encoder, strict=False)
        router.check_base(self.engine.runtime.fingerprint, self.engine.base_name)
        return router

    def _encoder(self, spec: dict[str, Any]) -> Any:
        from ...route import Encoder

        rt = self.engine.runtime
        if spec["fingerprint"] == rt.fingerprint:       # the served base itself, adapters off
            return Encoder(rt.model, self.engine.tokenizer, self.engine.base_name, rt.fingerprint,
                           int(spec.get("max_length", 128)), runtime=rt,
                           processor=getattr(self.engine, "processor", None))     # an image base: reads images
        key = spec["fingerprint"]
        if key not in self._encoders:
            enc = Encoder.load(spec["name"], max_length=int(spec.get("max_length", 128)))
            if enc.fingerprint != key:
                raise BaseMismatchError(f"the router's encoder {spec['name']} ({key}) is not the one installed "
                                        f"here ({enc.fingerprint}); refit the router")
            self._encoders[key] = enc
        return self._encoders[key]

    def decide(self, model: str, text: str) -> Any:
        """The router's Decision for one prompt, or the GateRouter itself (it decides per token in
        the engine). Blocking: call it from a worker thread."""
        router = self.router(model)
        if router.kind == "gate":
            return router
        if router.encoder.runtime is not None:           # shares the engine's model: between steps
            with self.engine.cache.locked():
                [decision] = router.route([text])
        else:
            [decision] = router.route([text])
        self.record(model, decision.top, bool(decision.fallback))
        return decision

    def decide_images(self, model: str, images: list[Any]) -> list[Any]:
        """The retrieval router's Decision for each image (an image base's server). Blocking: call it from a
        worker thread; it runs between the engine's batches (they share the model)."""
        router = self.router(model)
        if router.kind == "gate" or not getattr(router.encoder, "images", False):
            raise ConfigError(f"router {model!r} routes text ({router.kind}); this base reads images: fit a router "
                              "over its image adapters (adapterkit route fit) or name an adapter as the model")
        with self.engine.exclusive():                    # the forward lock: it shares the engine's model
            decisions = router.route(images)
        for d in decisions:
            self.record(model, d.top, bool(d.fallback))
        return decisions

    def record(self, model: str, top: Optional[str], fallback: bool = False) -> None:
        """Count one routing decision for /metrics (top None: the base)."""
        with self._lock:
            self.decisions[(model, top or "base", fallback)] += 1

    def counts(self) -> dict[tuple[str, str, bool], int]:
        with self._lock:
            return dict(self.decisions)


def gate_body(model: str, gate: Any) -> dict[str, Any]:
    """The `adapterkit` field of a gated request; gate_done() fills in what the gate did."""
    return {"router": model, "router_name": gate.name, "gate": True, "adapters": None, "confidence": None,
            "fallback": False, "candidates": [n for n in gate.names if n not in gate.unusable],
            "reason": f"per-token gate {gate.name!r} (top-{gate.top_k} of {len(gate.names)} adapters at each of "
                      f"{len(gate.layers)} layers)"}


def gate_done(routed: dict[str, Any], usage: Optional[dict[str, float]]) -> dict[str, Any]:
    """adapters = each adapter's share of the gate weight over the request's tokens and layers."""
    routed["adapters"] = dict(sorted((usage or {}).items(), key=lambda kv: -kv[1]))
    routed["reason"] += "; adapters: share of the gate weight over the request's tokens and layers"
    return routed


def decision_body(model: str, decision: Any) -> dict[str, Any]:
    """The `adapterkit` field of a routed response: which adapter(s) served it and why."""
    return {"router": model, "adapters": decision.adapters, "confidence": decision.confidence,
            "fallback": decision.fallback, "reason": decision.reason}


def route_text(prompt: Optional[str], messages: Optional[list[dict[str, Any]]]) -> str:
    """What a router reads: the prompt, or the last user message of a chat."""
    if prompt is not None:
        return prompt
    for m in reversed(messages or []):
        if m.get("role") == "user":
            return str(m.get("content") or "")
    return ""
