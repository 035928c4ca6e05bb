"""Prometheus text exposition (format 0.0.4) of engine.metrics() and engine.cache.stats().

Pure functions of the two dicts, so a scrape never touches the engine loop beyond its snapshot.
Every family gets # HELP and # TYPE; histograms are `_bucket{le=...}` (cumulative), `_sum`, `_count`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "adapterkit_"


def escape(value: str) -> str:
    """A label value: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return repr(float(v))


def _labels(labels: Optional[Mapping[str, str]]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape(str(v))}"' for k, v in labels.items()) + "}"


class Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> str:
        full = PREFIX + name
        self.lines.append(f"# HELP {full} {help_text}")
        self.lines.append(f"# TYPE {full} {kind}")
        return full

    def sample(self, name: str, value: float, labels: Optional[Mapping[str, str]] = None) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_num(value)}")

    def gauge(self, name: str, value: float, help_text: str) -> None:
        self.sample(self.family(name, "gauge", help_text), value)

    def counter(self, name: str, value: float, help_text: str) -> None:
        self.sample(self.family(name + "_total", "counter", help_text), value)

    def labelled(self, name: str, kind: str, label: str, values: Mapping[str, float], help_text: str) -> None:
        full = self.family(name, kind, help_text)
        for key in sorted(values):
            self.sample(full, values[key], {label: key})

    def histogram(self, name: str, snap: Mapping[str, Any], help_text: str) -> None:
        """snap: {"buckets": {le: cumulative count, ..., "+Inf": n}, "sum": s, "count": n}."""
        full = self.family(name, "histogram", help_text)
        buckets = dict(snap.get("buckets", {}))
        finite = sorted((k for k in buckets if k != "+Inf"), key=float)
        for le in finite:
            self.sample(full + "_bucket", buckets[le], {"le": le})
        self.sample(full + "_bucket", buckets.get("+Inf", snap.get("count", 0)), {"le": "+Inf"})
        self.sample(full + "_sum", snap.get("sum", 0.0))
        self.sample(full + "_count", snap.get("count", 0))

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(engine: Mapping[str, Any], cache: Mapping[str, Any],
           routes: Optional[Mapping[tuple[str, str, bool], int]] = None) -> str:
    """The /metrics body. engine: Engine.metrics(); cache: AdapterCache.stats(); routes: routing
    decisions {(router, adapter or "base", fallback): count}."""
    e = Exposition()
    if routes is not None:
        full = e.family("routing_decisions_total", "counter", "Requests routed by a router, per chosen adapter.")
        for (router, adapter, fallback), n in sorted(routes.items()):
            e.sample(full, n, {"router": router, "adapter": adapter, "fallback": str(bool(fallback)).lower()})
    e.gauge("queue_depth", engine.get("queue_depth", 0), "Requests waiting for a batch slot.")
    e.gauge("running_requests", engine.get("running", 0), "Sequences in the running batch.")
    e.gauge("tokens_per_second", engine.get("tokens_per_second", 0.0), "Generated tokens per second (recent window).")
    e.counter("prompt_tokens", engine.get("prompt_tokens_total", 0), "Prompt tokens prefilled.")
    e.counter("generation_tokens", engine.get("generation_tokens_total", 0), "Tokens generated.")
    e.labelled("requests_total", "counter", "model", engine.get("requests_total", {}),
               "Requests submitted, per adapter (or the base model).")
    e.labelled("requests_finished_total", "counter", "finish_reason", engine.get("finished_total", {}),
               "Requests finished, per finish reason.")
    for key, name, help_text in (
            ("ttft_seconds", "time_to_first_token_seconds", "Time from submit to the first token."),
            ("tpot_seconds", "time_per_output_token_seconds", "Mean time per output token after the first."),
            ("step_seconds", "engine_step_seconds", "Duration of one engine step (forward + sampling)."),
            ("queue_wait_seconds", "queue_wait_seconds", "Time a request waited before admission.")):
        if key in engine:
            e.histogram(name, engine[key], help_text)
    for key in ("kv_reserved", "kv_budget"):
        if key in engine:
            e.gauge(key + "_tokens", engine[key], f"KV cache tokens: {key.split('_')[1]}.")

    e.labelled("adapter_cache_hits_total", "counter", "tier",
               {"slot": cache.get("slot_hits", 0), "ram": cache.get("ram_hits", 0)},
               "Adapter acquires served by an attached slot, or (slot misses) by the RAM tier.")
    e.labelled("adapter_cache_misses_total", "counter", "tier",
               {"slot": cache.get("slot_misses", 0), "ram": cache.get("ram_misses", 0)},
               "Adapter acquires that missed the slots, or (slot misses) also missed RAM.")
    e.labelled("adapter_evictions_total", "counter", "tier",
               {"slot": cache.get("evictions_slot", 0), "ram": cache.get("evictions_ram", 0)},
               "Adapters evicted from a slot (back to RAM) or from RAM.")
    e.counter("adapter_loads", cache.get("loads", 0), "Adapters read from disk.")
    e.counter("adapter_load_errors", cache.get("load_errors", 0), "Adapter reads that failed.")
    e.counter("adapter_attach_errors", cache.get("attach_errors", 0), "Adapters the base refused at attach.")
    e.counter("adapter_busy_errors", cache.get("busy_errors", 0), "Acquires refused: every slot busy.")
    e.counter("adapter_prefetches", cache.get("prefetches", 0), "Background adapter reads started.")
    if "load_seconds" in cache:
        e.histogram("adapter_load_seconds", cache["load_seconds"], "Time to read and convert one adapter.")
    e.gauge("adapter_ram_bytes", cache.get("ram_bytes", 0), "Bytes of adapters held in the RAM tier.")
    e.gauge("adapter_ram_budget_bytes", cache.get("ram_budget_bytes", 0), "Byte budget of the RAM tier.")
    e.gauge("adapters_active", len(cache.get("active", {})), "Adapters attached to a slot.")
    e.gauge("adapter_slots", cache.get("max_loaded", 0), "Adapter slots (--max-loaded-adapters).")
    e.gauge("adapters_served", cache.get("served", 0), "Adapters that can be requested.")
    e.labelled("adapter_acquires_total", "counter", "adapter", cache.get("requests", {}),
               "Adapter acquires (engine admissions) per adapter.")
    return e.text()
