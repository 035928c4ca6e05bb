"""The serving engine of an image base: POST /v1/classify with images, each image scored by its
classifier adapter's head over the base's pooled features (the LLM engine's stand-in for `serve --base`
an image model; there is no text to generate, so no KV cache and no decode loop).

A request is one batch: its images (already decoded and preprocessed by the service, whose errors are
400s naming the input) go through the base once, each row with its own adapter (a mixed batch, as in
training), in chunks of `max_batch`. Requests run one at a time under a lock; every forward also holds
the cache's runtime lock (as the text engine's steps do: an adapter loaded meanwhile may restack the
pools). A request's adapters are held (cache.acquire) for its batch and released after, so the cache's
RAM tier, slots and versions work as for text. An error of one request fails that request only. The
counters have their own lock: /metrics never waits for a batch."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Optional, Sequence

import torch

from ..errors import ConfigError
from .cache.adapter_cache import AdapterCache
from .classify import Classification, ClassifierCache, classify


class ImageEngine:
    images = True                 # the service's switch: classify images; generation is a 400
    tokenizer = None
    max_context = None

    def __init__(self, runtime: Any, processor: Any, cache: AdapterCache, *, base_name: str | None = None,
                 max_batch: int = 32) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        self.runtime = runtime
        self.processor = processor
        self.cache = cache
        self.base_name = base_name or runtime.base_name or "base"
        self.max_batch = max_batch
        self.classifiers = ClassifierCache()
        runtime.model.eval()
        self._lock = threading.Lock()                 # one request at a time
        self._stats_lock = threading.Lock()           # the counters (read by /metrics)
        self._requests: Counter[str] = Counter()
        self._images = 0
        self._seconds = 0.0

    @classmethod
    def build(cls, base: Any, *, store: Any = None, adapter_dirs: Sequence[Any] = (), max_batch: int = 32,
              max_loaded_adapters: int = 8, ram_cache_mb: float = 1024.0, device: Any = "cpu",
              dtype: Any = None) -> "ImageEngine":
        from ..core.base import load_base
        from ..core.runtime import AdapterRuntime

        b = base if hasattr(base, "model") else load_base(base, dtype=dtype, device=device)
        if b.kind != "image":
            raise ConfigError(f"{b.name} is a {b.kind} model, not an image base; serve it with the text engine")
        runtime = AdapterRuntime.from_base(b, capacity=max_loaded_adapters + 1)
        cache = AdapterCache(runtime, store=store, adapter_dirs=adapter_dirs, max_loaded=max_loaded_adapters,
                             ram_cache_mb=ram_cache_mb)
        return cls(runtime, b.processor, cache, base_name=b.name, max_batch=max_batch)

    def start(self) -> "ImageEngine":
        return self

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Nothing runs between requests; a request in flight finishes under the lock."""

    def exclusive(self) -> Any:
        """What a forward holds: anything else that runs the model (a router's encoder) takes it too."""
        return self.cache.locked()

    def metrics(self) -> dict[str, Any]:
        with self._stats_lock:
            return {"queue_depth": 0, "running": 0, "requests_total": dict(self._requests),
                    "images_total": self._images, "classify_seconds_total": self._seconds}

    @torch.no_grad()
    def classify_images(self, pixels: torch.Tensor, adapters: Sequence[Optional[str]]) -> list[Classification]:
        """pixels [n, 3, H, W] (the base's preprocessing), one classifier adapter per image -> each image's
        label and probabilities. Unknown adapters, adapters without a head and damaged heads raise (the
        service maps them to 4xx on `model`)."""
        if len(adapters) != pixels.shape[0]:
            raise ConfigError(f"{pixels.shape[0]} images but {len(adapters)} adapters; give one per image")
        if any(a is None for a in adapters):
            raise ConfigError("the base model has no classification head; name a classifier adapter")
        with self._lock:
            t0 = time.perf_counter()
            out: list[Classification | None] = [None] * len(adapters)
            distinct = list(dict.fromkeys(adapters))
            step = self.cache.max_loaded                 # at most this many held at once: groups of adapters
            for g in range(0, len(distinct), step):
                group = distinct[g:g + step]
                rows = [i for i, a in enumerate(adapters) if a in group]
                self._run_group(pixels, adapters, group, rows, out)
            with self._stats_lock:
                self._requests.update(distinct)             # requests per adapter (a routed one: each it used)
                self._images += len(adapters)
                self._seconds += time.perf_counter() - t0
            return out                                   # type: ignore[return-value]   (every row filled)

    def _run_group(self, pixels: torch.Tensor, adapters: Sequence[str], group: list[str], rows: list[int],
                   out: list) -> None:
        """The rows whose adapter is in `group` (held together), in chunks of max_batch images."""
        from ..vision.hf import image_features

        handles: dict[str, Any] = {}
        try:
            for name in group:
                handles[name] = self.cache.acquire(name)
            heads = {n: self.classifiers.get(h.source).head for n, h in handles.items()}
            device = self.runtime.device
            for start in range(0, len(rows), self.max_batch):
                idx = rows[start:start + self.max_batch]
                chunk = pixels[idx].to(device=device, dtype=self.runtime.dtype)
                slots = torch.tensor([handles[adapters[i]].slot for i in idx])     # the held versions' slots
                with self.cache.locked(), self.runtime.use(self.runtime.batch_from_ids(slots)):
                    feats = image_features(self.runtime.model, chunk)                # [b, H]
                for i, row in zip(idx, feats):
                    out[i] = classify(heads[adapters[i]], row[None])
        finally:
            for h in handles.values():
                h.release()
