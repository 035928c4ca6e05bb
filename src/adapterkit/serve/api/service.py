"""What the OpenAI-compatible endpoints do, without any web framework (router.py maps HTTP onto it).

Model names: `model` is the base's name (the bare base), a served adapter's name, or
`BASE:ADAPTER` whose BASE part must be the served base. Anything else is an error (404): a request
is never answered by the base in place of an adapter it named.

Chat prompts: the tokenizer's chat template with add_generation_prompt=True, tokenised without
adding special tokens again (the template writes them). A tokenizer without a chat template gets a
plain rendering instead, one "role: content" line per message and then "assistant:".

Cancellation: every request's engine stream is cancelled when the coroutine serving it is cancelled
(client gone) or the SSE body is closed before the end, so the engine frees its batch row, KV cache
and adapter slot at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional

from ...core.adapter import validate_name
from ...errors import (AdapterkitError, AdapterNameError, AdapterNotFoundError, BaseMismatchError, ConfigError,
                       CorruptAdapterError)
from ..requests import ContextLengthError, GenerationRequest, RequestStream, SamplingParams, StreamEvent
from ..vl import ImageReader
from ...route.common import check_prompts
from . import metrics as prom
from .routing import PER_TOKEN, Routing, decision_body, gate_body, gate_done, route_text
from . import protocol as P
from .errors import (AuthenticationError, InvalidRequestError, ModelNotFoundError, ServiceUnavailableError,
                     blame, error_status, path_redactor)

DEFAULT_MAX_BODY_BYTES = 1 << 20     # 1 MiB


@dataclass(frozen=True)
class ApiSettings:
    api_key: Optional[str] = None                 # Bearer key for every route but /health; None: open
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies: 413

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ConfigError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty; give a non-empty key or none")


def check_bearer(key: Optional[str], authorization: Optional[str]) -> None:
    """`Authorization: Bearer KEY` must carry the configured key (constant-time compare); no key: open."""
    if key is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise AuthenticationError("missing API key: send the header 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise AuthenticationError("invalid API key")


def sse(obj: Any) -> str:
    """One server-sent event: `data: {json}` and a blank line."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class EventStream:
    """A streamed answer: `chunks()` yields SSE strings; `close()` cancels an unfinished request.
    The service has read the first engine event already, so errors before any token were raised
    as HTTP errors instead of a 200 stream. A routed answer's finish chunk carries the `adapterkit`
    field (for a gate: each adapter's share of the gate weight, known only at the end)."""

    def __init__(self, stream: RequestStream, first: StreamEvent, rest: AsyncIterator[StreamEvent],
                 render: Callable[[StreamEvent, bool], list[Any]], tail: Callable[[StreamEvent], list[Any]],
                 redact: Callable[[str], str] = str) -> None:
        self.stream = stream
        self._redact = redact
        self.routed: Optional[dict[str, Any]] = None      # set for `auto` / router requests
        self.note: Optional[dict[str, Any]] = None        # set when a classifier adapter generates
        self._first, self._rest = first, rest
        self._render, self._tail = render, tail

    async def chunks(self) -> AsyncIterator[str]:
        try:
            ev, first = self._first, True
            while True:
                if ev.finished and ev.finish_reason not in ("stop", "length"):
                    for obj in self._render(StreamEvent(ev.text, ev.token_ids), first):
                        yield sse(obj)
                    yield sse(error_status(_failure(ev), self._redact)[1])
                    break
                for obj in self._render(ev, first):
                    yield sse(obj)
                if ev.finished:
                    tail = self._tail(ev)
                    if self.routed is not None and self.routed.get("gate"):
                        gate_done(self.routed, self.stream.adapter_usage)
                    if (self.routed is not None or self.note) and tail:   # the finish chunk says who served it
                        tail[0]["adapterkit"] = {**(self.routed or {}), **(self.note or {})}
                    for obj in tail:
                        yield sse(obj)
                    break
                first = False
                ev = await self._rest.__anext__()
            yield SSE_DONE
        finally:
            self.close()

    def close(self) -> None:
        if self.stream.final is None:
            self.stream.cancel()


def _failure(ev: StreamEvent) -> BaseException:
    """The exception behind a final event that is neither stop nor length. Errors of the adapter the
    request named (unreadable, foreign, non-finite, unloaded) are about its `model` field."""
    if ev.finish_reason == "cancelled":
        return ServiceUnavailableError("the request was cancelled before it finished (the server is shutting down)")
    if ev.error is None:
        return RuntimeError(f"generation ended with {ev.finish_reason!r}")
    if isinstance(ev.error, (CorruptAdapterError, BaseMismatchError, AdapterNotFoundError)):
        return _param(ev.error, "model")
    return ev.error


class OpenAIService:
    def __init__(self, engine: Any, settings: ApiSettings | None = None) -> None:
        self.engine = engine
        self.settings = settings or ApiSettings()
        self.created = P.now()
        self.routing = Routing(engine, engine.cache.roots.store)
        self.redact = path_redactor(_root_labels(engine.cache.roots))
        # image bases of vision-language adapters, loaded on their first image request (serve/vl.py)
        self.image_reader = ImageReader(getattr(getattr(engine, "decoder", None), "device", "cpu"))

    # ------------------------------------------------------------------ auth, health, metrics
    def check_auth(self, authorization: Optional[str]) -> None:
        check_bearer(self.settings.api_key, authorization)

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "base": self.engine.base_name, "adapters": len(self.engine.cache.names())}

    def metrics_text(self) -> str:
        return prom.render(self.engine.metrics(), self.engine.cache.stats(), self.routing.counts())

    # ------------------------------------------------------------------ models
    def list_models(self) -> dict[str, Any]:
        """The base, its adapters, then `auto` and the routers; each id once (a router's name wins
        over an adapter folder of the same name, as it does for requests)."""
        base = self.engine.base_name
        routers = self.routing.names()
        data = [P.model_card(base, self.created, None)]
        data += [P.model_card(name, self.created, base) for name in self.engine.cache.names()
                 if name not in routers and name != base]
        data += [P.model_card(name, self.created, base) for name in routers]
        return {"object": "list", "data": data}

    def get_model(self, model_id: str) -> dict[str, Any]:
        if self.routing.is_router(model_id) and model_id in self.routing.names():
            return P.model_card(model_id, self.created, self.engine.base_name)
        adapter = self.resolve(model_id)
        if adapter is None:
            return P.model_card(self.engine.base_name, self.created, None)
        if adapter not in self.engine.cache.names():
            raise ModelNotFoundError(f"the model {model_id!r} does not exist", param="model")
        return P.model_card(adapter, self.created, self.engine.base_name)

    def resolve(self, model: str) -> Optional[str]:
        """The adapter a `model` names, or None for the base. Unknown adapters are the engine's 404."""
        base = self.engine.base_name
        if model == base:
            return None
        name = model
        if ":" in model:
            head, _, name = model.rpartition(":")
            if head != base:
                raise ModelNotFoundError(f"model {model!r}: base {head!r} is not served here; this server "
                                         f"serves {base!r} (use '{base}:ADAPTER' or the adapter name)", param="model")
        try:
            validate_name(name)
        except AdapterNameError:
            raise ModelNotFoundError(f"the model {model!r} does not exist; served: {base!r} and its adapters "
                                     "(GET /v1/models)", param="model") from None
        return name

    # ------------------------------------------------------------------ generation
    async def _pick(self, model: str, text: str, param: str) -> tuple[Any, Any, Optional[dict[str, Any]]]:
        """(adapter(s) for the engine, a per-token gate or None, the routing record or None). A
        router (`auto` or its name) chooses from the text; anything else is resolve()'s adapter or
        the base."""
        if not self.routing.is_router(model):
            return self.resolve(model), None, None
        try:
            check_prompts([text])                         # EmptyPromptError, also for a gate
            decision = await asyncio.to_thread(self.routing.decide, model, text)
        except AdapterNotFoundError as exc:
            raise _param(exc, "model")
        except ConfigError as exc:                        # an empty or whitespace prompt
            raise _param(exc, param)
        if getattr(decision, "kind", None) == "gate":
            return None, decision, gate_body(model, decision)
        decision = await asyncio.to_thread(self._no_classifiers, decision)
        return decision.adapters or None, None, decision_body(model, decision)

    def _classifier(self, name: Any) -> Any:
        """The Classifier of adapter `name` (it has a classification head), else None; errors of an
        unknown or damaged adapter are left to the request that uses it."""
        if not isinstance(name, str):
            return None
        try:
            return self.engine.classifiers.kind(self.engine.cache.find(name))
        except AdapterkitError:
            return None

    def _no_classifiers(self, decision: Any) -> Any:
        """Generation is never routed to a classifier (an adapter trained for its head: its text is
        only the base's through it): such a decision falls back to the base and says why. Naming a
        classifier as the model still generates with it, and the answer says it is one."""
        picked = [n for n in decision.adapters if self._classifier(n) is not None]
        if not picked:
            return decision
        return dataclasses.replace(decision, adapters={}, fallback=True, reason=(
            f"{decision.reason}; {', '.join(map(repr, picked))} {'is a classifier' if len(picked) == 1 else 'are classifiers'}"
            ": text generation goes to the base (POST /v1/classify for a label)"))

    def _classifier_note(self, adapter: Any) -> Optional[dict[str, Any]]:
        found = self._classifier(adapter)
        if found is None:
            return None
        return {"classifier": {"adapter": adapter, "labels": list(found.head.labels),
                               "note": f"{adapter!r} was trained as a classifier: this text is the base's language "
                                       "model through it; POST /v1/classify returns its label"}}

    def _generates(self) -> None:
        """An image base generates no text: a 400 that says what it serves instead."""
        if getattr(self.engine, "images", False):
            raise InvalidRequestError(f"the base {self.engine.base_name!r} is an image model: it classifies images "
                                      '(POST /v1/classify with input [{"type": "image_url", ...}]) and generates no '
                                      "text", param="model")

    async def completion(self, req: P.CompletionRequest) -> dict[str, Any] | EventStream:
        self._generates()
        adapter, gate, routed = await self._pick(req.model, route_text(req.prompt, None), "prompt")
        note = await asyncio.to_thread(self._classifier_note, adapter)
        ids = await asyncio.to_thread(self._encode, req.prompt, True)
        params = self._params(req, len(ids), req.max_tokens, "max_tokens", "prompt")
        rid, created, model = P.new_id("cmpl"), P.now(), req.model
        if req.stream:
            usage = req.include_usage

            def render(ev: StreamEvent, first: bool) -> list[Any]:
                return [P.completion_chunk(rid, created, model, ev.text, None, usage)] if ev.text or first else []

            def tail(ev: StreamEvent) -> list[Any]:
                out = [P.completion_chunk(rid, created, model, "", ev.finish_reason, usage)]
                return out + ([P.usage_chunk(rid, created, model, "text_completion", ev.usage)] if usage else [])
            return await self._stream(ids, adapter, params, "prompt", render, tail, routed, gate, note)
        text, final = await self._collect(ids, adapter, params, "prompt", gate, routed)
        return _routed(P.completion(rid, created, model, text, final.finish_reason, final.usage), routed, note)

    async def chat(self, req: P.ChatCompletionRequest) -> dict[str, Any] | EventStream:
        self._generates()
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in req.messages]
        images = None
        if any(m.images() for m in req.messages):         # a vision-language adapter's request (serve/vl.py)
            from .vision_chat import encode_image_chat

            adapter, gate, routed, note = self.resolve_images(req.model), None, None, None
            ids, images = await encode_image_chat(self, adapter, req.messages)
        else:
            adapter, gate, routed = await self._pick(req.model, route_text(None, messages), "messages")
            note = await asyncio.to_thread(self._classifier_note, adapter)
            ids = await asyncio.to_thread(self._encode_chat, messages)
        params = self._params(req, len(ids), req.max_new_tokens, req.max_tokens_param, "messages")
        rid, created, model = P.new_id("chatcmpl"), P.now(), req.model
        if req.stream:
            usage = req.include_usage

            def render(ev: StreamEvent, first: bool) -> list[Any]:
                out = [P.chat_chunk(rid, created, model, {"role": "assistant", "content": ""}, None, usage)] \
                    if first else []
                if ev.text:
                    out.append(P.chat_chunk(rid, created, model, {"content": ev.text}, None, usage))
                return out

            def tail(ev: StreamEvent) -> list[Any]:
                out = [P.chat_chunk(rid, created, model, {}, ev.finish_reason, usage)]
                return out + ([P.usage_chunk(rid, created, model, "chat.completion.chunk", ev.usage)] if usage else [])
            return await self._stream(ids, adapter, params, "messages", render, tail, routed, gate, note, images)
        text, final = await self._collect(ids, adapter, params, "messages", gate, routed, images)
        return _routed(P.chat_completion(rid, created, model, text, final.finish_reason, final.usage), routed, note)

    def resolve_images(self, model: str) -> str:
        """The adapter a request with images names: a router or the bare base cannot read images (400)."""
        if self.routing.is_router(model):
            raise InvalidRequestError(f"{model!r} is a router: routers choose adapters from text; send images to a "
                                      "vision-language adapter by name", param="model")
        adapter = self.resolve(model)
        if adapter is None:
            raise InvalidRequestError(f"the base {model!r} is text-only: send images to a vision-language adapter "
                                      "(one trained on an image task such as easy-vqa-colour)", param="messages")
        return adapter

    def _encode(self, text: str, special: bool) -> list[int]:
        tok = self.engine.tokenizer
        if tok is None:
            raise ConfigError(f"the base {self.engine.base_name!r} has no tokenizer; it cannot serve text requests")
        return list(tok(text, add_special_tokens=special)["input_ids"])

    def _encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        tok = self.engine.tokenizer
        if tok is not None and getattr(tok, "chat_template", None):
            try:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:          # jinja: e.g. "roles must alternate user/assistant"
                raise InvalidRequestError(f"the chat template refused these messages: {exc}",
                                          param="messages") from None
            return self._encode(text, False)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self._encode(text, True)

    def _params(self, req: Any, n_prompt: int, max_tokens: Optional[int], max_param: str,
                prompt_param: str) -> SamplingParams:
        ctx = self.engine.max_context
        if n_prompt == 0:
            raise InvalidRequestError(f"{prompt_param} is empty: it encodes to no tokens", param=prompt_param)
        if n_prompt >= ctx:
            raise _param(ContextLengthError(
                f"{prompt_param} has {n_prompt} tokens; the model's context is {ctx} tokens (prompt + at least one "
                "generated token); shorten it"), prompt_param)
        room = ctx - n_prompt
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise _param(ContextLengthError(
                f"{max_param} is {max_tokens} but the {n_prompt}-token {prompt_param} leaves room for {room} tokens "
                f"in the model's context of {ctx}; lower {max_param}"), max_param)
        with blame(max_param):
            return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                  top_k=max(req.top_k, 0), seed=req.seed, stop=req.stop_list,
                                  ignore_eos=req.ignore_eos)

    def _submit(self, ids: list[int], adapter: Optional[str], params: SamplingParams, prompt_param: str,
                gate: Any = None, classify: bool = False, images: Any = None) -> RequestStream:
        try:
            return self.engine.submit(GenerationRequest(prompt_ids=ids, adapter=adapter, params=params, gate=gate,
                                                        classify=classify, images=images))
        except AdapterNotFoundError as exc:
            raise _param(exc, "model")
        except ContextLengthError as exc:        # the engine's KV budget
            raise _param(exc, "max_tokens")
        except ConfigError as exc:
            raise _param(exc, prompt_param)

    async def _collect(self, ids: list[int], adapter: Optional[str], params: SamplingParams,
                       prompt_param: str, gate: Any = None,
                       routed: Optional[dict[str, Any]] = None, images: Any = None) -> tuple[str, StreamEvent]:
        stream = self._submit(ids, adapter, params, prompt_param, gate, images=images)
        try:
            async for _ in stream:
                pass
        finally:
            if stream.final is None:        # cancelled (client gone) or the loop is closing
                stream.cancel()
        final = stream.final
        assert final is not None
        if final.finish_reason not in ("stop", "length"):
            raise _failure(final)
        if gate is not None and routed is not None:
            gate_done(routed, stream.adapter_usage)
            top = max(routed["adapters"], key=routed["adapters"].get) if routed["adapters"] else None
            self.routing.record(routed["router"], top)
        return stream.text, final

    async def _stream(self, ids: list[int], adapter: Optional[str], params: SamplingParams, prompt_param: str,
                      render: Callable[[StreamEvent, bool], list[Any]],
                      tail: Callable[[StreamEvent], list[Any]], routed: Optional[dict[str, Any]] = None,
                      gate: Any = None, note: Optional[dict[str, Any]] = None, images: Any = None) -> EventStream:
        stream = self._submit(ids, adapter, params, prompt_param, gate, images=images)
        if gate is not None and routed is not None:
            self.routing.record(routed["router"], PER_TOKEN)
        events = stream.__aiter__()
        try:
            first = await events.__anext__()      # admission errors become HTTP errors, not a 200 stream
        except BaseException:
            if stream.final is None:
                stream.cancel()
            raise
        if first.finished and first.finish_reason not in ("stop", "length") and not stream.token_ids:
            raise _failure(first)
        out = EventStream(stream, first, events, render, tail, self.redact)
        out.routed, out.note = routed, note
        return out

    async def classify(self, req: P.ClassifyRequest) -> dict[str, Any]:
        from .classifying import classify

        return await classify(self, req)

    # ------------------------------------------------------------------ adapters (vLLM endpoints)
    async def load_adapter(self, req: P.LoadAdapterRequest) -> dict[str, Any]:
        name = req.lora_name
        if name == self.engine.base_name:
            raise _param(AdapterNameError(f"{name!r} is the base model's name; choose another adapter name"),
                         "lora_name")
        if name == "auto" or self.routing.is_router(name):
            raise _param(AdapterNameError(
                f"{name!r} is " + ("reserved for the default router" if name == "auto" else "a router's name") +
                "; routers and adapters share one model namespace: choose another adapter name"), "lora_name")
        try:
            validate_name(name)
            src = await asyncio.to_thread(self.engine.cache.load, name, req.lora_path)
        except AdapterNameError as exc:
            _param(exc, "lora_name")
            raise
        except AdapterkitError as exc:
            _param(exc, "lora_path")
            raise
        return {"status": "ok", "lora_name": name,
                "message": f"Success: LoRA adapter '{name}' added successfully.", "parent": self.engine.base_name,
                "origin": src.origin}

    async def unload_adapter(self, req: P.UnloadAdapterRequest) -> dict[str, Any]:
        name = req.lora_name
        with blame("lora_name"):
            gone = self.engine.cache.unload(name)
        msg = (f"Success: LoRA adapter '{name}' removed successfully." if gone else
               f"LoRA adapter '{name}' is no longer served; it is detached when its in-flight requests finish.")
        return {"status": "ok", "lora_name": name, "message": msg, "detached": gone}


def _root_labels(roots: Any) -> dict[str, str]:
    """Server paths a client must not see -> what error texts say instead (as given and resolved)."""
    import os

    labels: dict[str, str] = {}
    if roots.store is not None:
        for p in (roots.store.root, os.path.realpath(roots.store.root)):
            labels[os.path.abspath(p)] = "<store>"
    for i, d in enumerate(roots.dirs, 1):
        labels[str(d)] = f"<adapters:{i}>"
    return labels


def _routed(body: dict[str, Any], routed: Optional[dict[str, Any]],
            note: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """A routed answer says which adapter(s) served it (also in the x-adapterkit-adapters header);
    one generated by a classifier adapter says so (`classifier`)."""
    if routed is not None or note:
        body["adapterkit"] = {**(routed or {}), **(note or {})}
    return body


def _param(exc: BaseException, param: str) -> BaseException:
    """Name the request field an error is about (errors.error_status puts it in the body)."""
    if getattr(exc, "param", None) is None:
        exc.param = param            # type: ignore[attr-defined]
    return exc
