"""POST /v1/classify on an image base (serve/image_engine.py): each input is an image part
{"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}, scored by the classifier adapter
the request names. Only data URLs are read: the server fetches nothing and opens no local file. An
image that does not decode, is over the size limits, or a text input is a 400 naming the input; the base
model (no head) and adapters without a head are 400s on `model`. A router fitted over the base's image
features (`auto` or its name) picks each image's adapter; its decisions come back in `adapterkit`."""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from ...vision.images import ImageError, image_pixels
from . import protocol as P
from .errors import InvalidRequestError, blame
from .routing import decision_body


async def classify_images(service: Any, req: P.ClassifyRequest) -> dict[str, Any]:
    engine = service.engine
    routed = service.routing.is_router(req.model)
    adapter = None if routed else service.resolve(req.model)
    if not routed and adapter is None:
        raise InvalidRequestError(f"the base model {req.model!r} has no classification head; name a classifier "
                                  "adapter (or a router) as the model", param="model")
    items = req.inputs
    urls = []
    for i, item in enumerate(items):
        where = "input" if len(items) == 1 else f"input[{i}]"
        if isinstance(item, str):
            raise InvalidRequestError(f"{where} is text but the base {engine.base_name!r} is an image model; send "
                                      'image parts {"type": "image_url", "image_url": {"url": "data:image/png;base64,'
                                      '..."}}', param=where)
        if not item["image"][:5].lower() == "data:":
            raise InvalidRequestError(f"{where}: image_url must be a data URL (data:image/png;base64,...); the server "
                                      "fetches no URL and reads no local file", param=where)
        urls.append((where, item["image"]))
    batch = await asyncio.to_thread(_pixels, urls, engine.processor)       # [n, 3, H, W]
    records = None
    if routed:                                # each image to the adapter a router over the base's features picks
        with blame("model"):
            decisions = await asyncio.to_thread(service.routing.decide_images, req.model, list(batch))
        for (where, _), d in zip(urls, decisions):
            if d.top is None:
                raise InvalidRequestError(f"{where}: the router sent it to the base model, which has no classification "
                                          f"head ({d.reason}); name a classifier adapter as the model", param=where)
        adapters = [d.top for d in decisions]
        records = [decision_body(req.model, d) for d in decisions]
    else:
        adapters = [adapter] * len(urls)
    with blame("model"):                     # an unknown adapter, one without a head, a damaged head
        results = await asyncio.to_thread(engine.classify_images, batch, adapters)
    body = P.classification(P.new_id("classify"), P.now(), req.model, results, 0)
    if records is not None:
        body["adapterkit"] = records
    return body


def _pixels(urls: list[tuple[str, str]], processor: Any) -> Any:
    """The images' pixels, each decoded, preprocessed and dropped in turn (a request never holds all of its
    decoded photos at once)."""
    rows = []
    for where, url in urls:
        try:
            rows.append(image_pixels(url, processor, where))
        except ImageError as exc:
            raise InvalidRequestError(str(exc), param=where) from None
    return torch.stack(rows)
