"""Continuous-batching generation engine: one base, many adapters, mixed in every step.

    engine = Engine.build("smollm2-135m", store=AdapterStore(), config=EngineConfig(max_batch=32))
    engine.start()
    stream = engine.submit(GenerationRequest(prompt_ids, adapter="math", params=SamplingParams(max_tokens=64)))

Scheduling (iteration level, one background thread):
  every step  1. drops cancelled sequences (frees their KV cache and adapter slot);
              2. admits waiting requests in arrival order while the batch has room (max_batch), the
                 KV budget has room for prompt + max_tokens, this step's prefill tokens stay within
                 max_prefill_tokens (the first prefill of a step is always allowed), and the
                 adapter gets a slot (a request whose adapter finds every slot busy waits without
                 blocking requests behind it whose adapters are attached);
              3. runs ONE forward over the new prompts and one token of every running sequence
                 (forward.FlatDecoder: flat ragged batch; KV in a capacity-classed arena, kv_arena.py,
                 so decode attention is one call per arena chunk), each token routed
                 to its sequence's adapter by the runtime's mixed-batch kernels;
              4. picks the next token per sequence, streams text, finishes on EOS / stop string /
                 max_tokens and releases what the sequence held.
Decodes run every step and prefill is bounded per step, so neither starves the other.

A request may carry a learned per-token gate instead of fixed adapters: it holds a slot for each of
the gate's adapters and, at every gated layer, its tokens go to the adapters the gate picks there
(gating.py); other rows of the step keep their fixed adapters.

Admission errors are per request: an unknown adapter fails submit() (HTTP 404); an adapter that
fails to load or attach ends only its own request with finish_reason "error". So does anything else
confined to one request: non-finite logits (its adapter overflowed), a failing sampler or detokenizer,
or a forward that raises (the step is then re-run sequence by sequence, caches rolled back).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch

from ..errors import AdapterkitError, ConfigError, NonFiniteError
from .cache.adapter_cache import AdapterCache, AdapterHandle, NoFreeSlotError
from .classify import Classification, ClassifierCache, Classifier, classify
from .detok import Detokenizer
from .engine_metrics import EngineMetrics
from .forward import FlatDecoder, SeqCache, Segment
from .kv_arena import ArenaCache
from .gating import GateState, gate_layers, layer_routing
from .requests import (ContextLengthError, GenerationRequest, QueueFullError, RequestStream, StreamEvent,
                       Usage)
from .sampling import choose, make_generator
from .vl import ProjectorCache, project


class EngineStoppedError(AdapterkitError, RuntimeError):
    """The engine is shutting down and takes no new requests: HTTP 503."""


ATTENTION = ("batched", "per-sequence")


@dataclass
class EngineConfig:
    max_batch: int = 32                  # sequences decoding together
    max_queue: int = 256                 # waiting requests before submit raises QueueFullError
    max_prefill_tokens: int = 1024       # prompt tokens per step (the first prompt of a step may exceed it)
    kv_cache_mb: float = 2048.0          # KV memory for all sequences (prompt + max_tokens reserved each)
    kv_budget_tokens: Optional[int] = None   # overrides kv_cache_mb when given
    # "batched": K/V in a KV arena (kv_arena.py: <= 1.1x prompt + max_tokens), decode attention per chunk;
    # "per-sequence": one exact cache and attention call per sequence (the reference batched is tested against)
    attention: str = "batched"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION:
            raise ConfigError(f"attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        for name in ("max_batch", "max_queue", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_budget_tokens is not None and self.kv_budget_tokens < 1:
            raise ConfigError(f"kv_budget_tokens must be >= 1, got {self.kv_budget_tokens}")
        if self.kv_cache_mb <= 0:
            raise ConfigError(f"kv_cache_mb must be > 0, got {self.kv_cache_mb}")


@dataclass(eq=False)
class _Seq:
    stream: RequestStream
    handles: list[AdapterHandle]         # one per adapter on the row, released at the end
    cache: SeqCache | ArenaCache
    detok: Detokenizer
    generator: Optional[torch.Generator]
    pending: list[int]                   # tokens to feed next step (the prompt, then the last token)
    generated: int = 0
    slots: list[tuple[int, float]] = field(default_factory=list)   # (runtime slot, weight) per adapter
    gate: Optional[GateState] = None     # a gated request: per-token adapters from its gate
    classifier: Optional[Classifier] = None   # a classification request: its adapter's head
    # a prompt with images: (positions [k] in the prompt, image tokens [k, d]) that replace those tokens'
    # embeddings in the prefill; None once the prompt is in the cache
    embeds: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def params(self):
        return self.stream.request.params


@dataclass(eq=False)
class _Waiting:
    stream: RequestStream
    queued_at: float = field(default_factory=time.monotonic)


class Engine:
    def __init__(self, runtime: Any, tokenizer: Any, cache: AdapterCache, config: EngineConfig | None = None,
                 *, base_name: str | None = None) -> None:
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.cache = cache
        self.config = config or EngineConfig()
        self.base_name = base_name or runtime.base_name or "base"
        runtime.model.eval()
        self.decoder = FlatDecoder(runtime.model)
        self.kv = self.decoder.new_arena() if self.config.attention == "batched" else None
        self.max_context = self.decoder.max_context
        self.kv_budget = self.config.kv_budget_tokens or max(
            1, int(self.config.kv_cache_mb * 2 ** 20) // self.decoder.bytes_per_token())
        self.eos_ids = _eos_ids(runtime.model, tokenizer)
        self.classifiers = ClassifierCache()      # heads of classifier adapters, read on first use
        self.projectors = ProjectorCache()        # image projectors of vision-language adapters (serve/vl.py)
        self.metrics_ = EngineMetrics()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._running: list[_Seq] = []
        self._exact_reserved = 0                 # per-sequence caches: KV tokens reserved by running sequences
        self._accepting = True
        self._stop = False
        self._cancel_all = False
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def build(cls, base: Any = "smollm2-135m", *, store: Any = None, adapter_dirs: Iterable[Any] = (),
              config: EngineConfig | None = None, max_loaded_adapters: int = 8,
              ram_cache_mb: float = 1024.0, device: Any = "cpu", dtype: Any = None) -> "Engine":
        """Load the base (on `device` in `dtype`: base.load_base; or a Base already loaded), make a runtime and
        an adapter cache over the store and adapter folders."""
        from ..core.base import load_base
        from ..core.runtime import AdapterRuntime

        b = base if hasattr(base, "model") else load_base(base, dtype=dtype, device=device)
        runtime = AdapterRuntime.from_base(b, capacity=max_loaded_adapters + 1)
        cache = AdapterCache(runtime, store=store, adapter_dirs=adapter_dirs, max_loaded=max_loaded_adapters,
                             ram_cache_mb=ram_cache_mb)
        return cls(runtime, b.tokenizer, cache, config, base_name=b.name)

    # ------------------------------------------------------------------ client side
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="adapterkit-engine", daemon=True)
            self._thread.start()
        return self

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; returns its stream at once. Raises before queueing on an unknown adapter,
        a prompt that does not fit the context, a full queue or a stopping engine."""
        p = request.params
        n, need = len(request.prompt_ids), request.kv_need
        if need > self.max_context:
            raise ContextLengthError(
                f"the input has {n} tokens, more than the model's context of {self.max_context}; shorten it"
                if request.classify else
                f"the prompt has {n} tokens and max_tokens is {p.max_tokens}: {n + p.max_tokens} > the model's "
                f"context of {self.max_context} tokens; shorten the prompt or lower max_tokens")
        reserve = self.kv.capacity_for(need) if self.kv is not None else need
        if reserve > self.kv_budget:
            held = f" (held as {reserve}, its KV capacity class)" if reserve != need else ""
            raise ContextLengthError(
                f"prompt + max_tokens = {need} tokens{held} exceed the engine's KV budget of "
                f"{self.kv_budget} tokens; lower max_tokens or raise --kv-cache-mb")
        if request.gate is not None:
            self._gate_layers(request.gate)          # ConfigError: a gate of another model
            if not request.adapters:
                raise ConfigError(f"gate {request.gate.name!r} has no usable adapter: "
                                  + "; ".join(request.gate.unusable.values()))
        if len(request.adapters) > self.cache.max_loaded:   # it would wait for slots forever
            raise ConfigError(f"the request needs {len(request.adapters)} adapters at once; the server holds at "
                              f"most {self.cache.max_loaded} (raise --max-loaded-adapters)")
        for name in request.adapters:
            src = self.cache.find(name)              # AdapterNotFoundError; finds new folders lazily
            if request.classify:
                self.classifiers.get(src)            # ConfigError: no head; CorruptAdapterError: a damaged one
        stream = RequestStream(request)
        with self._lock:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down; no new requests are taken")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(f"the request queue is full ({self.config.max_queue} waiting); retry later")
            self._waiting.append(_Waiting(stream))
            self.metrics_.observe_submit(request.label or self.base_name)
            self._wake.notify()
        for name in request.adapters:
            try:
                self.cache.prefetch(name)
            except AdapterkitError:
                pass                                   # acquire raises it for this request
        return stream

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop taking requests; finish (drain=True) or cancel everything in flight, then join.
        Anything still running after `timeout` seconds is cancelled."""
        with self._lock:
            self._accepting = False
            self._cancel_all = not drain
            self._wake.notify()
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            with self._lock:
                if not self._waiting and not self._running:
                    break
            time.sleep(0.01)
        with self._lock:
            self._cancel_all = True
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def metrics(self) -> dict[str, Any]:
        with self._lock:
            return self.metrics_.snapshot(queue_depth=len(self._waiting), running=len(self._running),
                                          kv_reserved=self._reserved, kv_budget=self.kv_budget)

    @property
    def _reserved(self) -> int:
        """KV tokens held for running sequences (the arena: every allocated slot x its class capacity)."""
        return self.kv.reserved_tokens if self.kv is not None else self._exact_reserved

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stop and not self._waiting and not self._running:
                    return
                cancel_all = self._cancel_all
            try:
                self.step(cancel_all)
            except Exception as exc:              # a bug in a step fails the sequences in it, not the server
                self._fail_running(exc)
            if self._stop and cancel_all:
                with self._lock:
                    if not self._running and not self._waiting:
                        return

    def step(self, cancel_all: bool = False) -> None:
        """One iteration: drop cancelled, admit, forward, sample, stream. A failure confined to one
        request (its forward, its logits, its sampling, its text) ends that request only."""
        self._drop_cancelled(cancel_all)
        new = self._admit()
        batch = [s for s in self._running if s not in new] + new
        if not batch:
            if self._waiting:                     # every waiting adapter is busy: let releases happen
                time.sleep(0.002)
            return
        t0 = time.perf_counter()
        rows = self._logits_isolated(batch)
        ok = [i for i, r in enumerate(rows) if isinstance(r, torch.Tensor)]     # next-token logits to sample
        picked: list[Any] = list(rows)
        if ok:
            chosen = choose(torch.stack([rows[i] for i in ok]), [batch[i].params for i in ok],
                            [batch[i].generator for i in ok])
            for i, c in zip(ok, chosen):
                picked[i] = c
        self.metrics_.observe_step(time.perf_counter() - t0, prompt_tokens=sum(len(s.pending) for s in new),
                                   batch=len(batch))
        for s, token in zip(batch, picked):
            try:
                if isinstance(token, BaseException):
                    raise token
                if isinstance(token, Classification):        # scored, not generated: done in one step
                    s.stream.classification = token
                    self._finish(s, "stop", [], "")
                    continue
                self._advance(s, token)
            except Exception as exc:                  # this request only; the others go on
                self._finish(s, "error", [], "", error=self._row_error(s, exc))

    def _logits_isolated(self, batch: list[_Seq]) -> list[Any]:
        """Next-token logits [V] per sequence (a Classification for a classify request), or the
        exception its forward raised. One forward for
        the batch; if it raises, each sequence runs alone so only the failing ones fail (caches
        and gate counts are rolled back first: a failed forward leaves no trace)."""
        saved = [(s.cache.length, s.gate.usage.clone() if s.gate is not None else None) for s in batch]

        def rollback(seqs: list[_Seq], states: list[Any]) -> None:
            for s, (length, usage) in zip(seqs, states):
                s.cache.length = length
                if usage is not None:
                    s.gate.usage = usage.clone()
        try:
            return list(self._forward(batch))
        except Exception as exc:
            rollback(batch, saved)
            if len(batch) == 1:
                return [exc]
        out: list[Any] = []
        for s, state in zip(batch, saved):
            try:
                out.append(self._forward([s])[0])
            except Exception as exc:
                rollback([s], [state])
                out.append(exc)
        return out

    def _forward(self, batch: list[_Seq]) -> list[Any]:
        """One flat forward over every sequence's pending tokens -> per sequence its next-token logits
        [V] float32, or, for a classify request, its head's Classification of the whole prompt."""
        k = max(1, max(len(s.slots) for s in batch))           # adapters per row, padded with slot 0
        tokens, positions, segments, slots, weights, last = [], [], [], [], [], []
        for s in batch:
            start = len(tokens)
            tokens += s.pending
            positions += range(s.cache.length, s.cache.length + len(s.pending))
            row = s.slots + [(0, 0.0)] * (k - len(s.slots))
            slots += [[slot for slot, _ in row]] * len(s.pending)
            weights += [[w for _, w in row]] * len(s.pending)
            segments.append(Segment(s.cache, start, len(s.pending)))
            last.append(len(tokens) - 1)
        # Routing ids / weights [T, k] stay on the host (batch_from_ids plans there and moves what the
        # kernels read); tokens, positions and the picked rows go to the model's device.
        dev = self.decoder.device
        host = torch.device("cpu")
        ids, ws, idx = (torch.tensor(slots, device=host), torch.tensor(weights, device=host),
                        torch.tensor(last, device=host))
        tok, pos = torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev)
        gated = [(seg.start, seg.n, s.gate) for s, seg in zip(batch, segments) if s.gate is not None]
        images = [(seg.start + s.embeds[0], s.embeds[1]) for s, seg in zip(batch, segments) if s.embeds is not None]
        embeds = ((torch.cat([i for i, _ in images]).to(dev), torch.cat([e for _, e in images]).to(dev))
                  if images else None)
        with self.cache.locked(), torch.inference_mode():
            before = layer_routing(self.runtime, ids, ws, gated) if gated else None
            with self.runtime.use(self.runtime.batch_from_ids(ids, ws, mode="token")):
                h = self.decoder.hidden(tok, pos, segments, before_layer=before, embeds=embeds)
            with self.runtime.use(self.runtime.batch_from_ids(ids[idx], ws[idx], mode="token")):
                rows: list[Any] = list(self.decoder.logits(h[idx.to(dev)]))
        for i, (s, seg) in enumerate(zip(batch, segments)):
            if s.classifier is not None:                        # its prompt, pooled as its head was trained
                rows[i] = classify(s.classifier.head, h[seg.start:seg.start + seg.n])
        return rows

    def _row_error(self, s: _Seq, exc: BaseException) -> BaseException:
        """The error one request ends with: typed errors as they are; numbers that blew up blame the
        request's adapter(s) (their weights overflow on this input); anything else is internal."""
        if isinstance(exc, AdapterkitError):
            return exc
        names = sorted(s.stream.request.adapters)
        if isinstance(exc, ArithmeticError) and names:      # NonFiniteLogitsError among them
            err = NonFiniteError(
                f"adapter(s) {', '.join(map(repr, names))} made the model's output non-finite (NaN or inf) on "
                "this request: their weights overflow on this input; check or re-train the adapter")
            err.param = "model"                        # type: ignore[attr-defined]
            return err
        return RuntimeError(f"generation failed for this request ({type(exc).__name__}: {exc})")

    def _advance(self, s: _Seq, token: int) -> None:
        s.generated += 1
        s.pending = [token]
        s.embeds = None                                    # the prompt (and its images) is in the cache now
        p = s.params
        if token in self.eos_ids and not p.ignore_eos:
            self._finish(s, "stop", [], s.detok.flush())
            return
        text, hit_stop = s.detok.add(token)
        if hit_stop:
            self._finish(s, "stop", [token], text)
        elif s.generated >= p.max_tokens:
            self._finish(s, "length", [token], text + s.detok.flush())
        else:
            s.stream.emit(StreamEvent(text, (token,)))

    def _finish(self, s: _Seq, reason: str, tokens: list[int], text: str, error: BaseException | None = None) -> None:
        usage = Usage(len(s.stream.request.prompt_ids), len(s.stream.token_ids) + len(tokens))
        with self._lock:
            running = s in self._running
            if running:
                self._running.remove(s)
                if self.kv is None:
                    self._exact_reserved -= s.cache.capacity
        if running and self.kv is not None:     # the arena is the engine thread's: its copies run outside the lock
            self.kv.free(s.cache)
        for h in s.handles:
            h.release()
        if s.gate is not None:
            s.stream.adapter_usage = s.gate.shares()
        s.stream.emit(StreamEvent(text, tuple(tokens), finish_reason=reason, usage=usage, error=error))
        self.metrics_.observe_finish(s.stream, reason)

    def _drop_cancelled(self, cancel_all: bool) -> None:
        for s in list(self._running):
            if cancel_all or s.stream.cancelled:
                self._finish(s, "cancelled", [], s.detok.flush())
        with self._lock:
            gone = [w for w in self._waiting if cancel_all or w.stream.cancelled]
            for w in gone:
                self._waiting.remove(w)
        for w in gone:
            self._end_waiting(w.stream, "cancelled")

    def _end_waiting(self, stream: RequestStream, reason: str, error: BaseException | None = None) -> None:
        stream.emit(StreamEvent("", (), finish_reason=reason, usage=Usage(len(stream.request.prompt_ids), 0),
                                 error=error))
        self.metrics_.observe_finish(stream, reason)

    def _admit(self) -> list[_Seq]:
        new: list[_Seq] = []
        prefill = 0
        with self._lock:
            waiting = list(self._waiting)
        for w in waiting:
            req = w.stream.request
            need = req.kv_need
            fits = (self.kv.extra_tokens(need, self.kv_budget) is not None if self.kv is not None
                    else self._exact_reserved + need <= self.kv_budget)
            if len(self._running) >= self.config.max_batch or not fits:
                break                                        # in order: no overtaking on capacity
            if new and prefill + len(req.prompt_ids) > self.config.max_prefill_tokens:
                break
            handles: list[AdapterHandle] = []
            try:
                for name in req.adapters:
                    handles.append(self.cache.acquire(name, timeout=0))
                # the head of the very version acquired (the adapter may have been replaced since submit)
                classifier = self.classifiers.get(handles[0].source) if req.classify else None
                embeds = project(self.projectors.get(handles[0].source), req.images, self.decoder.width) \
                    if req.images is not None else None
            except NoFreeSlotError:
                for h in handles:
                    h.release()
                continue                                     # its adapters wait; others may go
            except AdapterkitError as exc:                   # unloaded, corrupt, foreign base
                self._refuse(w, handles, exc)
                continue
            weights = req.adapters
            detok = Detokenizer(self.tokenizer, req.params.stop)
            gen = None if req.params.greedy else make_generator(req.params.seed)
            gate = None
            if req.gate is not None:                         # no fixed adapters: the gate picks per token
                by_name = {h.name: h.slot for h in handles}
                gate = GateState(req.gate, torch.tensor([by_name.get(n, 0) for n in req.gate.names]),
                                 self._gate_layers(req.gate))
            # last, after anything that may raise: the slot is the arena's until _finish frees it
            try:
                kv = self.kv.allocate(need, self.kv_budget) if self.kv is not None else self.decoder.new_cache(need)
            except RuntimeError as exc:                      # out of memory: this request ends, the batch goes on
                self._refuse(w, handles, RuntimeError(f"no memory for this request's KV cache: {exc}"))
                continue
            s = _Seq(w.stream, handles, kv, detok, gen, list(req.prompt_ids),
                     slots=[] if gate else [(h.slot, weights[h.name]) for h in handles], gate=gate,
                     classifier=classifier, embeds=embeds)
            with self._lock:
                self._waiting.remove(w)
                self._running.append(s)
                if self.kv is None:
                    self._exact_reserved += need
            self.metrics_.observe_queue(time.monotonic() - w.queued_at)
            prefill += len(req.prompt_ids)
            new.append(s)
        return new

    def _refuse(self, w: _Waiting, handles: list[AdapterHandle], exc: BaseException) -> None:
        """A waiting request that cannot start ends with `exc`; what it acquired is released."""
        for h in handles:
            h.release()
        with self._lock:
            self._waiting.remove(w)
        self._end_waiting(w.stream, "error", exc)

    def _gate_layers(self, gate: Any) -> dict[int, int]:
        """The gate's layer map on this base (BaseMismatchError / ConfigError for another base)."""
        gate.check_base(self.runtime.fingerprint, self.base_name)
        return gate_layers(gate, self.runtime.model, self.decoder.layers)

    def _fail_running(self, exc: BaseException) -> None:
        err = exc if isinstance(exc, AdapterkitError) else RuntimeError(f"engine step failed: {exc!r}")
        for s in list(self._running):
            self._finish(s, "error", [], "", error=err)


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(i) for i in src)
    return frozenset(ids)
