"""Counters of the adapter cache (hits, misses, loads, evictions, load-time histogram) for /metrics.
Not thread-safe on its own: the cache calls it under its bookkeeping lock."""

from __future__ import annotations

from collections import Counter
from typing import Any

# Upper bounds (seconds) of the load-time histogram buckets (Prometheus `le`), plus +Inf.
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
KEYS = ("slot_hits", "slot_misses", "ram_hits", "ram_misses", "loads", "load_errors", "attach_errors",
        "busy_errors", "evictions_slot", "evictions_ram", "ram_rejects", "prefetches", "replaced")


class CacheCounters:
    def __init__(self) -> None:
        self.count: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()              # acquires per adapter name
        self._hist = [0] * (len(LOAD_BUCKETS) + 1)           # per bucket (not cumulative), last = +Inf
        self._sum = 0.0

    def record_load(self, seconds: float) -> None:
        self.count["loads"] += 1
        self._sum += seconds
        i = next((i for i, le in enumerate(LOAD_BUCKETS) if seconds <= le), len(LOAD_BUCKETS))
        self._hist[i] += 1

    def snapshot(self) -> dict[str, Any]:
        cumulative, total = {}, 0
        for le, n in zip([*map(str, LOAD_BUCKETS), "+Inf"], self._hist):
            total += n
            cumulative[le] = total
        return {**{k: self.count[k] for k in KEYS},
                "load_seconds": {"sum": self._sum, "count": self.count["loads"], "buckets": cumulative},
                "requests": dict(self.requests)}
