"""Counters and latency histograms of the engine, read by /metrics (Prometheus) and benchmarks.

Histograms are cumulative like Prometheus' (`le` upper bounds in seconds, then "+Inf").
Updated from the engine thread; snapshot() is taken under the engine lock.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKENS_PER_SECOND_WINDOW = 10.0        # seconds of recent steps behind tokens_per_second


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = next((j for j, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[i] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> dict[str, Any]:
        cumulative, total = {}, 0
        for le, n in zip([*map(str, self.bounds), "+Inf"], self.counts):
            total += n
            cumulative[le] = total
        return {"buckets": cumulative, "sum": self.sum, "count": self.count}


class EngineMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: collections.Counter[str] = collections.Counter()     # submitted, per adapter or base
        self.finished: collections.Counter[str] = collections.Counter()     # per finish_reason
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram()
        self.tpot = Histogram()
        self.step = Histogram()
        self.queue_wait = Histogram()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()   # (time, tokens made)

    def observe_submit(self, name: str) -> None:
        with self._lock:
            self.requests[name] += 1

    def observe_step(self, seconds: float, *, prompt_tokens: int, batch: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.step.observe(seconds)
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += batch
            self._recent.append((now, batch))
            while self._recent and self._recent[0][0] < now - TOKENS_PER_SECOND_WINDOW:
                self._recent.popleft()

    def observe_queue(self, seconds: float) -> None:
        with self._lock:
            self.queue_wait.observe(seconds)

    def observe_finish(self, stream: Any, reason: str) -> None:
        with self._lock:
            self.finished[reason] += 1
            if stream.first_token_at is not None:
                self.ttft.observe(stream.first_token_at - stream.created)
                n = len(stream.token_ids)
                if n > 1 and stream.finished_at is not None:
                    self.tpot.observe((stream.finished_at - stream.first_token_at) / (n - 1))

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in self._recent if t >= now - TOKENS_PER_SECOND_WINDOW]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span

    def snapshot(self, **gauges: Any) -> dict[str, Any]:
        with self._lock:
            return {
                **gauges,
                "prompt_tokens_total": self.prompt_tokens,
                "generation_tokens_total": self.generation_tokens,
                "requests_total": dict(self.requests),
                "finished_total": dict(self.finished),
                "tokens_per_second": self.tokens_per_second(),
                "ttft_seconds": self.ttft.snapshot(),
                "tpot_seconds": self.tpot.snapshot(),
                "step_seconds": self.step.snapshot(),
                "queue_wait_seconds": self.queue_wait.snapshot(),
            }
