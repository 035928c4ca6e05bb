"""OpenAI-compatible request bodies (pydantic, strict) and the response / chunk shapes.

Bodies are parsed strictly: "5" is not an integer, true is not a number, unknown fields are refused
(OpenAI does the same), so a misspelt option never silently changes nothing. Options of the OpenAI
API this server does not implement (logprobs, echo, penalties, tools...) are accepted only at their
neutral value and otherwise refused with 400 naming the field. Ranges that depend on the served
model (max_tokens against the context) are the service's check.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

from ..requests import MAX_TEMPERATURE, MIN_TEMPERATURE
from .errors import InvalidRequestError

MAX_STOP = 16                   # stop strings per request
_NEUTRAL: dict[str, tuple[Any, ...]] = {   # unsupported options: the values that change nothing
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, False, True), "response_format": (None, {"type": "text"}),
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


def _is_neutral(value: Any, name: str) -> bool:
    """`value` is one of the option's neutral values, and of its JSON type: false is not 0, 1 is not
    true (`in` alone would say so: in Python False == 0 and True == 1)."""
    return any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in _NEUTRAL[name])


def _neutral_only(data: Any, names: tuple[str, ...]) -> Any:
    if isinstance(data, dict):
        for name in names:
            if name in data and not _is_neutral(data[name], name):
                raise InvalidRequestError(f"{name} is not supported by this server; omit it", param=name,
                                          code="unsupported_parameter")
    return data


class _Sampling(_Body):
    """Fields shared by completions and chat completions."""

    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE,
                               description=f"0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="0 or -1: off (vLLM extension)")
    seed: Optional[int] = Field(None, ge=0, lt=2 ** 63)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = None
    ignore_eos: bool = False          # vLLM extension: generate max_tokens tokens whatever comes
    user: Optional[str] = None        # accepted, unused
    # Unsupported OpenAI options, neutral values only (checked before the field types).
    logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError("stop must be a string or a list of strings")
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(v)}")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if 0.0 < v < MIN_TEMPERATURE:           # logits / T would overflow; use 0 for greedy
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _checks(self) -> "_Sampling":
        if self.n not in (None, 1):
            raise InvalidRequestError(f"n must be 1 or absent (one choice per request), got {self.n}", param="n")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed with stream: true", param="stream_options")
        if self.stop is not None and any(not s for s in self.stop_list):
            raise InvalidRequestError("stop strings must be non-empty", param="stop")
        return self

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(16, ge=1)     # OpenAI's default for completions
    echo: Any = None
    best_of: Any = None
    suffix: Any = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        return _neutral_only(data, ("logprobs", "echo", "best_of", "suffix", "presence_penalty",
                                    "frequency_penalty", "logit_bias"))

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if len(v) != 1 or not isinstance(v[0], str):
                raise ValueError("prompt must be a string or a list of ONE string (send one request per prompt)")
            return v[0]
        if not isinstance(v, str):
            raise ValueError("prompt must be a string or a list of one string")
        return v


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageUrl(_Body):
    url: str
    detail: Optional[str] = None      # accepted, unused (the image base's own resolution is used)


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageUrl


MAX_IMAGES = 8                  # images per chat request
_PART_TAGS = {"text": "TextPart", "image_url": "ImagePart"}   # capitalised: field_path drops them from error paths


def _part_tag(v: Any) -> Optional[str]:
    kind = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return _PART_TAGS.get(kind)


ContentPart = Annotated[Union[Annotated[TextPart, Tag("TextPart")], Annotated[ImagePart, Tag("ImagePart")]],
                        Discriminator(_part_tag)]


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if isinstance(v, list):
            for part in v:
                if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
                    raise ValueError('content parts are text ({"type": "text", "text": ...}) or images ({"type": '
                                     '"image_url", "image_url": {"url": "data:image/png;base64,..."}})')
        elif v is not None and not isinstance(v, str):
            raise ValueError("content must be a string or a list of text and image parts")
        return v

    def text(self) -> str:
        """The text parts (images left out): what routers read and text-only prompts hold."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def images(self) -> list[str]:
        """The image parts' URLs, in order."""
        return [p.image_url.url for p in self.content if isinstance(p, ImagePart)] \
            if isinstance(self.content, list) else []

    def parts(self) -> Any:
        """The content for a vision-language prompt (vision/vl_prompt.content_text): a string, or text and
        {"type": "image"} parts."""
        if not isinstance(self.content, list):
            return self.content
        return [{"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"}
                for p in self.content]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)

    @field_validator("messages")
    @classmethod
    def _image_count(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        n = sum(len(m.images()) for m in v)
        if n > MAX_IMAGES:
            raise ValueError(f"at most {MAX_IMAGES} images per request, got {n}")
        return v
    max_tokens: Optional[int] = Field(None, ge=1)               # None: up to the context
    max_completion_tokens: Optional[int] = Field(None, ge=1)    # OpenAI's newer name; wins when both given
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        return _neutral_only(data, ("logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
                                    "logit_bias", "tools", "tool_choice", "parallel_tool_calls",
                                    "response_format"))

    @property
    def max_new_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


MAX_INPUTS = 64                 # inputs per classification request


class ClassifyRequest(_Body):
    """vLLM's POST /classify body: each input is scored by the adapter's classification head. On an image
    base an input is an image part, as in the chat API: {"type": "image_url", "image_url": {"url":
    "data:image/png;base64,..."}}."""

    model: str = Field(min_length=1)
    input: Union[str, list[Union[str, dict[str, Any]]]]
    truncate_prompt_tokens: Optional[int] = Field(None, ge=1, description="cut each input to this many tokens")
    user: Optional[str] = None        # accepted, unused

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v: Any) -> Any:
        texts = [v] if isinstance(v, str) else v
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) or is_image_part(t) for t in texts):
            raise ValueError("input must be a string or a non-empty list of strings (or, on an image base, of image "
                             'parts {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}})')
        if len(texts) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs per request, got {len(texts)}")
        return v

    @property
    def inputs(self) -> list[Any]:
        """Each input: a text, or an image part's URL (a data URL) as {"image": url}."""
        items = [self.input] if isinstance(self.input, str) else list(self.input)
        return [t if isinstance(t, str) else {"image": t["image_url"]["url"]} for t in items]


def is_image_part(v: Any) -> bool:
    """{"type": "image_url", "image_url": {"url": str}} (OpenAI's image content part)."""
    return (isinstance(v, dict) and v.get("type") == "image_url" and isinstance(v.get("image_url"), dict)
            and isinstance(v["image_url"].get("url"), str) and set(v) <= {"type", "image_url"})


class LoadAdapterRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter body (other vLLM fields, e.g. load_inplace, are ignored)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):
    """vLLM's POST /v1/unload_lora_adapter body (lora_int_id is ignored)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str


# ---------------------------------------------------------------------- parsing
def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """Validate a JSON body; any problem is an InvalidRequestError naming the field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        err = max(errors, key=lambda e: len(e["loc"]))       # a union's deepest member error says most
        if err["type"] == "json_invalid":
            raise InvalidRequestError(f"the body is not valid JSON: {err['msg']}", code="invalid_json") from None
        param = field_path(err["loc"])
        if err["type"] == "model_type" and not param:
            raise InvalidRequestError("the body must be a JSON object", code="invalid_json") from None
        msg = err["msg"].removeprefix("Value error, ")
        if not param:
            raise InvalidRequestError(msg) from None
        if err["type"] == "missing":
            msg = f"{param} is required"
        elif err["type"] == "extra_forbidden":
            msg = f"{param} is not a known field"
        elif not msg.startswith(err["loc"][-1] if isinstance(err["loc"][-1], str) else "\0"):
            msg = f"{param}: {msg}"
        raise InvalidRequestError(msg, param=param) from None


_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def field_path(loc: tuple[Any, ...]) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'; union member tags ('list[TextPart]') dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in _TAGS and not part[0].isupper():
            out += f".{part}" if out else part
    return out


# ---------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage_dict(usage: Any) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def model_card(model_id: str, created: int, parent: Optional[str]) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "adapterkit",
            "root": model_id, "parent": parent}


def completion(rid: str, created: int, model: str, text: str, finish: str, usage: Any) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage_dict(usage), "system_fingerprint": None}


def completion_chunk(rid: str, created: int, model: str, text: str, finish: Optional[str],
                     with_usage: bool) -> dict[str, Any]:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
             "system_fingerprint": None}
    if with_usage:
        chunk["usage"] = None
    return chunk


def chat_completion(rid: str, created: int, model: str, text: str, finish: str, usage: Any) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage_dict(usage), "system_fingerprint": None}


def chat_chunk(rid: str, created: int, model: str, delta: dict[str, Any], finish: Optional[str],
               with_usage: bool) -> dict[str, Any]:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
             "system_fingerprint": None}
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(rid: str, created: int, model: str, obj: str, usage: Any) -> dict[str, Any]:
    """The last chunk before [DONE] when stream_options.include_usage: no choices, the usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage_dict(usage), "system_fingerprint": None}


def classification(rid: str, created: int, model: str, results: list[Any], prompt_tokens: int) -> dict[str, Any]:
    """vLLM's classification response; `labels` (the head's label per probability) is an extension."""
    data = [{"index": i, "label": c.label, "probs": list(c.probs), "num_classes": len(c.probs),
             "labels": list(c.labels)} for i, c in enumerate(results)]
    return {"id": rid, "object": "list", "created": created, "model": model, "data": data,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None}}
