"""POST /v1/classify on an image base (serve/image_engine.py): each input is an image part
{"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}, scored by the classifier adapter
the request names. Only data URLs are read: the server fetches nothing and opens no local file. An
image that does not decode, is over the size limits, or a text input is a 400 naming the input; the base
model (no head), a router (routers choose from text) and adapters without a head are 400s on `model`."""

from __future__ import annotations

import asyncio
from typing import Any

from ...vision.images import ImageError, decode, pixels
from . import protocol as P
from .errors import InvalidRequestError, blame


async def classify_images(service: Any, req: P.ClassifyRequest) -> dict[str, Any]:
    engine = service.engine
    if service.routing.is_router(req.model):
        raise InvalidRequestError(f"{req.model!r} is a router; routers choose adapters from text, and this base reads "
                                  "images: name the image classifier adapter as the model", param="model")
    adapter = service.resolve(req.model)
    if adapter is None:
        raise InvalidRequestError(f"the base model {req.model!r} has no classification head; name a classifier "
                                  "adapter as the model", param="model")
    items = req.inputs
    urls = []
    for i, item in enumerate(items):
        where = "input" if len(items) == 1 else f"input[{i}]"
        if isinstance(item, str):
            raise InvalidRequestError(f"{where} is text but the base {engine.base_name!r} is an image model; send "
                                      'image parts {"type": "image_url", "image_url": {"url": "data:image/png;base64,'
                                      '..."}}', param=where)
        if not item["image"].startswith("data:"):
            raise InvalidRequestError(f"{where}: image_url must be a data URL (data:image/png;base64,...); the server "
                                      "fetches no URL and reads no local file", param=where)
        urls.append((where, item["image"]))
    batch = await asyncio.to_thread(_pixels, urls, engine.processor)
    with blame("model"):                     # an unknown adapter, one without a head, a damaged head
        results = await asyncio.to_thread(engine.classify_images, batch, [adapter] * len(urls))
    return P.classification(P.new_id("classify"), P.now(), req.model, results, 0)


def _pixels(urls: list[tuple[str, str]], processor: Any) -> Any:
    decoded = []
    for where, url in urls:
        try:
            decoded.append(decode(url, where))
        except ImageError as exc:
            raise InvalidRequestError(str(exc), param=where) from None
    return pixels(decoded, processor)
