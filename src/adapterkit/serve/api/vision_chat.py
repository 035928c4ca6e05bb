"""Chat requests with image parts, for vision-language adapters: the named adapter must have an image projector
(else 400: it is text-only), every image must decode within the limits (else 400 naming it), and the prompt
is rendered and tokenised exactly as training rendered it (vision/vl_prompt.py), with the image base's
features beside it for the engine to project (serve/vl.py)."""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from ...core.generate import pad_id
from ...errors import AdapterNotFoundError, BaseMismatchError, BaseNotAvailableError, ConfigError
from ...vision.images import ImageError
from ...vision.vl_prompt import encode_images, render_chat
from ..requests import ImageInput
from .errors import InvalidRequestError


def _projector(service: Any, adapter: str) -> Any:
    engine = service.engine
    try:
        source = engine.cache.find(adapter)
    except AdapterNotFoundError as exc:
        exc.param = "model"                      # type: ignore[attr-defined]
        raise
    projector = engine.projectors.kind(source)
    if projector is None:
        raise InvalidRequestError(f"adapter {adapter!r} is text-only (it has no image projector): send images to a "
                                  "vision-language adapter (one trained on an image task such as easy-vqa-colour), "
                                  "or leave the images out", param="messages")
    return projector


def _encode(service: Any, adapter: str, projector: Any, messages: Sequence[Any],
            images: list[str]) -> tuple[list[int], ImageInput]:
    tok, reader = service.engine.tokenizer, service.image_reader
    try:
        text, n = render_chat(tok, [{"role": m.role, "content": m.parts(), **({"name": m.name} if m.name else {})}
                                    for m in messages], True)
    except ConfigError as exc:
        raise InvalidRequestError(str(exc), param="messages") from None
    except Exception as exc:                      # jinja: e.g. "roles must alternate user/assistant"
        raise InvalidRequestError(f"the chat template refused these messages: {exc}", param="messages") from None
    if n != len(images):
        raise InvalidRequestError(f"the chat template kept {n} of the {len(images)} images; put images in user "
                                  "messages", param="messages")
    try:
        reader.base(projector)                     # the image base its projector names, loaded once
    except (ConfigError, BaseMismatchError, BaseNotAvailableError) as exc:
        raise InvalidRequestError(f"adapter {adapter!r}: its image base {projector.image_base!r} "
                                  f"cannot be used here ({exc})", param="model") from None
    try:
        features, fingerprint = reader.read(projector, images)
    except ImageError as exc:
        raise InvalidRequestError(str(exc), param="messages") from None
    prompt = encode_images(tok, text, projector.n_tokens, pad_id(tok))
    return prompt.ids, ImageInput(tuple(prompt.slots), features, fingerprint)


async def encode_image_chat(service: Any, adapter: str, messages: Sequence[Any]) -> tuple[list[int], ImageInput]:
    """(prompt ids with image placeholders, the images' features) for a chat naming VL adapter `adapter`."""
    projector = await asyncio.to_thread(_projector, service, adapter)
    images = [url for m in messages for url in m.images()]
    return await asyncio.to_thread(_encode, service, adapter, projector, messages, images)
