"""POST /v1/classify (also /classify, as vLLM serves it): text in, each input's label and
probabilities out, from a classifier adapter's head (serve/classify.py). No web-framework import.

`model` is a classifier adapter (an adapter trained with a classification head), or `auto` / a
router's name: each input is then routed on its own and classified by the adapter the router picks
(its decision is in the answer's `adapterkit` field, one entry per input). The base model has no
head: naming it, or a router falling back to it, is a 400 that says so. Every input is one engine
request, batched with whatever else the engine runs; inputs are cut to `truncate_prompt_tokens`
and to the max_length the adapter was trained with.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from ...errors import ConfigError
from ...route.common import check_prompts
from ..requests import SamplingParams
from . import protocol as P
from .errors import InvalidRequestError, blame
from .routing import decision_body

_ONE_STEP = SamplingParams(max_tokens=1, temperature=0.0)     # unused by classification; a valid placeholder


async def classify(service: Any, req: P.ClassifyRequest) -> dict[str, Any]:
    if getattr(service.engine, "images", False):
        from .classifying_images import classify_images

        return await classify_images(service, req)
    texts = req.inputs
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            where = _field("input", i, len(texts))
            raise InvalidRequestError(f"{where} is an image but the base {service.engine.base_name!r} reads text; "
                                      "classify images on a server of an image base (adapterkit serve --base "
                                      "mobilenet-v2)", param=where)
    picks = [await _pick(service, req.model, text, i, len(texts)) for i, text in enumerate(texts)]
    with blame("model"):                             # an unknown adapter, one without a head, a damaged head
        ids = [await asyncio.to_thread(_encode, service, text, adapter, req.truncate_prompt_tokens)
               for text, (adapter, _) in zip(texts, picks)]
    streams = []
    try:
        for i, (row, (adapter, _)) in enumerate(zip(ids, picks)):
            streams.append(service._submit(row, adapter, _ONE_STEP, _field("input", i, len(texts)), classify=True))
        for stream in streams:
            async for _ in stream:
                pass
    finally:
        for stream in streams:
            if stream.final is None:                 # cancelled (client gone) or an earlier input failed
                stream.cancel()
    results = []
    for stream in streams:
        final = stream.final
        if final.finish_reason != "stop" or stream.classification is None:
            from .service import _failure
            raise _failure(final)
        results.append(stream.classification)
    body = P.classification(P.new_id("classify"), P.now(), req.model, results, sum(len(r) for r in ids))
    routed = [r for _, r in picks]
    if any(r is not None for r in routed):
        body["adapterkit"] = routed
    return body


async def _pick(service: Any, model: str, text: str, i: int, n: int) -> tuple[str, Optional[dict[str, Any]]]:
    """(the classifier adapter for input i, the routing record or None)."""
    where = _field("input", i, n)
    if not service.routing.is_router(model):
        adapter = service.resolve(model)
        if adapter is None:
            raise InvalidRequestError(f"the base model {model!r} has no classification head; name a classifier "
                                      "adapter (or 'auto') as the model", param="model")
        return adapter, None
    try:
        check_prompts([text])
    except ConfigError as exc:
        raise InvalidRequestError(f"{where}: {exc}", param=where) from None
    decision = await asyncio.to_thread(service.routing.decide, model, text)
    if getattr(decision, "kind", None) == "gate":
        raise InvalidRequestError(f"router {model!r} is a per-token gate; it picks adapters per token, not one "
                                  "classifier per input: route with a retrieval router or name the adapter",
                                  param="model")
    if decision.top is None:
        raise InvalidRequestError(f"{where}: the router sent it to the base model, which has no classification "
                                  f"head ({decision.reason}); name a classifier adapter as the model", param=where)
    return decision.top, decision_body(model, decision)


def _encode(service: Any, text: str, adapter: str, truncate: Optional[int]) -> list[int]:
    """Token ids as training encoded them (special tokens added), cut to the shortest of
    truncate_prompt_tokens, the adapter's training max_length and the model's context."""
    engine = service.engine
    if engine.tokenizer is None:
        raise ConfigError(f"the base {engine.base_name!r} has no tokenizer; it cannot classify text")
    trained = engine.classifiers.get(engine.cache.find(adapter)).max_length
    limit = min(x for x in (truncate, trained, engine.max_context) if x is not None)
    return list(engine.tokenizer(text, add_special_tokens=True, truncation=True, max_length=limit)["input_ids"])


def _field(name: str, i: int, n: int) -> str:
    return name if n == 1 else f"{name}[{i}]"
