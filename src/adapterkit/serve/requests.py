"""What a client asks the engine for, and the stream of events it gets back.

    params = SamplingParams(max_tokens=64, temperature=0.0, stop=["\\n\\n"])
    stream = engine.submit(GenerationRequest(prompt_ids=ids, adapter="math", params=params))
    for ev in stream:                  # thread: blocking iterator;  asyncio: `async for ev in stream`
        print(ev.text, end="")         # text delta (never cut inside a stop string)
    stream.final                       # the last event: finish_reason, all token ids, usage

Threads: the engine thread calls `emit`; a client thread or the asyncio loop the stream was made
on reads. `cancel()` is safe from anywhere; the engine drops the sequence at its next step and
frees its KV cache and adapter slot.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Mapping, Optional, Union

from ..errors import AdapterkitError, ConfigError

FINISH_REASONS = ("stop", "length", "cancelled", "error")
# The smallest temperature > 0: logits / T must stay finite in float32 for any sane logit, and a
# smaller T is greedy in all but name (use 0). vLLM treats T < 1e-5 as greedy; we refuse instead.
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 100.0
_ids = itertools.count(1)


class QueueFullError(AdapterkitError, RuntimeError):
    """The engine's waiting queue is at its limit: HTTP 429, retry later."""


class ContextLengthError(AdapterkitError, ValueError):
    """Prompt + max_tokens exceed the model's context: HTTP 400."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    seed: Optional[int] = None        # per-request generator: same seed, same tokens
    stop: tuple[str, ...] = ()        # output ends before the first occurrence of any
    ignore_eos: bool = False          # benchmarks: force max_tokens

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (
                t == 0.0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            raise ConfigError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                              f"got {t!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2 ** 63):
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True)
class ImageInput:
    """A prompt's images for a vision-language adapter: their image-base features, projected into the language
    model by the projector of the adapter version the engine acquires (serve/vl.py)."""

    slots: tuple[int, ...]            # [m * n] prompt positions the image tokens take, image by image
    features: Any                     # [m * n, C] the image base's grid features, in the same order
    image_fingerprint: str            # what made them (ImageProjector.feature_source(): the image base, and its
                                      # adapter if any); the acquired projector must read exactly that

    def __post_init__(self) -> None:
        if len(self.slots) != int(self.features.shape[0]):
            raise ConfigError(f"{len(self.slots)} image slots but {int(self.features.shape[0])} feature rows")


@dataclass
class GenerationRequest:
    prompt_ids: list[int]                       # already tokenised (chat template applied by the caller)
    # None = the bare base; a name; or {name: weight}: several adapters active on the row (stacking,
    # a router's top-k), each delta scaled by its weight
    adapter: Optional[Union[str, Mapping[str, float]]] = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    # a learned per-token gate (route.GateRouter) instead of fixed adapter(s): it picks each token's
    # adapters at every layer (serve/gating.py)
    gate: Any = None
    # score the prompt with the adapter's classification head instead of generating (serve/classify.py):
    # one step, no tokens; the stream's `classification` holds the result
    classify: bool = False
    # images in the prompt (a vision-language adapter's request; `adapter` names that one adapter)
    images: Optional[ImageInput] = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ConfigError("the prompt is empty; give at least one token")
        if self.images is not None and not isinstance(self.adapter, str):
            raise ConfigError("a prompt with images names exactly one vision-language adapter (its projector reads "
                              "the images)")
        if self.images is not None and any(not 0 <= s < len(self.prompt_ids) for s in self.images.slots):
            raise ConfigError("an image slot lies outside the prompt")
        if self.gate is not None and self.adapter is not None:
            raise ConfigError("a request names either adapter(s) or a gate, not both")
        if self.classify and not isinstance(self.adapter, str):
            raise ConfigError("a classification request names exactly one adapter (the one whose head classifies)")
        if isinstance(self.adapter, Mapping):
            weights = {str(k): float(v) for k, v in self.adapter.items()}
            bad = [k for k, v in weights.items() if not math.isfinite(v)]
            if bad:
                raise ConfigError(f"adapter weights must be finite numbers; {', '.join(bad)} is not")
            self.adapter = weights or None

    @property
    def adapters(self) -> dict[str, float]:
        """{name: weight} of the row ({} = the bare base); a gate's usable adapters (each may serve a token)."""
        if self.gate is not None:
            return {n: 1.0 for n in self.gate.names if n not in self.gate.unusable}
        if self.adapter is None:
            return {}
        return {self.adapter: 1.0} if isinstance(self.adapter, str) else dict(self.adapter)

    @property
    def kv_need(self) -> int:
        """KV cache tokens the request holds: the prompt, plus max_tokens when it generates."""
        return len(self.prompt_ids) + (0 if self.classify else self.params.max_tokens)

    @property
    def label(self) -> Optional[str]:
        """One name for metrics: the adapter, 'a+b' for several, 'gate:<name>', None for the base."""
        if self.gate is not None:
            return f"gate:{self.gate.name}"
        names = self.adapters
        return "+".join(sorted(names)) if names else None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class StreamEvent:
    text: str                                   # new text since the previous event (may be "")
    token_ids: tuple[int, ...]                  # new tokens since the previous event
    finish_reason: Optional[str] = None         # set on the last event only
    usage: Optional[Usage] = None               # set on the last event only
    error: Optional[BaseException] = None       # finish_reason == "error": what went wrong

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


_END = object()


class RequestStream:
    """Events of one request, in order; the last one has finish_reason set."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.created = time.monotonic()
        self.first_token_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self.text = ""                             # all text so far (stop strings cut)
        self.token_ids: list[int] = []             # all generated tokens so far
        self.final: Optional[StreamEvent] = None
        self.adapter_usage: Optional[dict[str, float]] = None   # gated: share of gate weight per adapter, at the end
        self.classification: Any = None            # classify requests: serve.classify.Classification, at the end
        self._drained = False                      # result() consumed the end marker
        self._cancel = threading.Event()
        self._sync: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        try:                                       # made on an event loop: deliver there too
            self._loop: Optional[asyncio.AbstractEventLoop] = asyncio.get_running_loop()
            self._async: Optional[asyncio.Queue] = asyncio.Queue()
        except RuntimeError:
            self._loop, self._async = None, None

    # ---------------------------------------------------------------- engine side
    def emit(self, event: StreamEvent) -> None:
        """Engine side: one more event of this stream (the final one ends it; later ones are dropped)."""
        if self.final is not None:
            return
        if event.token_ids and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.text += event.text
        self.token_ids.extend(event.token_ids)
        if event.finished:
            self.final = event
            self.finished_at = time.monotonic()
        self._put(event)
        if event.finished:
            self._put(_END)

    def _put(self, item: Any) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, item)
            except RuntimeError:                   # the loop is closed: nobody listens there
                pass
        else:
            self._sync.put(item)

    # ---------------------------------------------------------------- client side
    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop generating (client went away). The final event has finish_reason 'cancelled'."""
        self._cancel.set()

    def __iter__(self) -> Iterator[StreamEvent]:
        if self._loop is not None:
            raise RuntimeError("this stream was made on an event loop; read it with `async for`")
        while True:
            item = self._sync.get()
            if item is _END:
                return
            yield item

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        if self._async is None:
            raise RuntimeError("this stream was made outside an event loop; read it with `for`")
        while True:
            item = await self._async.get()
            if item is _END:
                return
            yield item

    def result(self, timeout: Optional[float] = None) -> StreamEvent:
        """Block until finished (thread streams only); returns the final event."""
        if self._loop is not None:
            raise RuntimeError("this stream was made on an event loop; read it with `async for`")
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.final is None or not self._drained:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s")
            try:
                if self._sync.get(timeout=left) is _END:
                    self._drained = True
            except queue.Empty:
                continue
        return self.final
