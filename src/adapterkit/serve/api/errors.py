"""The one place where errors become HTTP answers: typed exception -> status code + OpenAI error body.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Library errors (adapterkit.errors, the engine's, the cache's) keep their types; the service only
says which request field an error is about (`blame`). Other adapterkit errors: a RuntimeError kind
(e.g. the engine's EngineStoppedError while shutting down) is 503, any other kind 400. Anything else
is a 500 whose message names only the exception type (the traceback goes to the server log).
Library messages name server paths for the operator; `redact` (the service's) turns them into
`<store>/...`, `<adapters:N>/...` or `.../last-part` before a client sees them.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator, Mapping, Optional

from ...errors import (AdapterkitError, AdapterNameError, AdapterNotFoundError, BaseMismatchError,
                       ConfigError, CorruptAdapterError, StaleSourceError, UnsupportedError)
from ..cache.adapter_cache import NoFreeSlotError
from ..cache.roots import AdapterPathError
from ..requests import ContextLengthError, QueueFullError


class APIError(Exception):
    """An error the HTTP layer found itself (not the library): bad body, auth, size."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class InvalidRequestError(APIError):
    """A body that is not valid JSON, a wrong type, a value out of range, an unsupported option."""


class AuthenticationError(APIError):
    """No `Authorization: Bearer KEY` header, or the wrong key."""


class ModelNotFoundError(APIError):
    """A `model` that is neither the base, nor a served adapter, nor `base:adapter` of this base."""


class RouteNotFoundError(APIError):
    """No such path (or method) on this server."""


class PayloadTooLargeError(APIError):
    """The request body is over the server's limit."""


class ServiceUnavailableError(APIError):
    """The server is shutting down."""


# (exception type, HTTP status, OpenAI error type, default code). First match wins: subclasses first.
STATUS: tuple[tuple[type, int, str, Optional[str]], ...] = (
    (InvalidRequestError, 400, "invalid_request_error", None),
    (AuthenticationError, 401, "authentication_error", "invalid_api_key"),
    (ModelNotFoundError, 404, "not_found_error", "model_not_found"),
    (RouteNotFoundError, 404, "not_found_error", None),
    (PayloadTooLargeError, 413, "invalid_request_error", "request_too_large"),
    (ServiceUnavailableError, 503, "service_unavailable", None),
    (AdapterNotFoundError, 404, "not_found_error", "model_not_found"),
    (QueueFullError, 429, "rate_limit_error", "queue_full"),
    (NoFreeSlotError, 429, "rate_limit_error", "adapter_slots_busy"),
    (ContextLengthError, 400, "invalid_request_error", "context_length_exceeded"),
    (AdapterPathError, 400, "invalid_request_error", "adapter_path_not_allowed"),
    (CorruptAdapterError, 400, "invalid_request_error", "invalid_adapter"),
    (BaseMismatchError, 400, "invalid_request_error", "adapter_base_mismatch"),
    (StaleSourceError, 400, "invalid_request_error", "adapter_sources_changed"),
    (AdapterNameError, 400, "invalid_request_error", "invalid_adapter_name"),
    (UnsupportedError, 400, "invalid_request_error", "unsupported"),
    (ConfigError, 400, "invalid_request_error", None),
    (APIError, 400, "invalid_request_error", None),
)


def error_status(exc: BaseException, redact: Callable[[str], str] = str) -> tuple[int, dict[str, Any]]:
    """HTTP status and OpenAI error body for any exception. `redact` rewrites library messages
    (they may name server paths); the HTTP layer's own messages (APIError) are shown as they are."""
    param = getattr(exc, "param", None)
    code = getattr(exc, "code", None)
    message = str(exc) if isinstance(exc, APIError) else redact(str(exc))
    for kind, status, typ, default_code in STATUS:
        if isinstance(exc, kind):
            return status, error_body(message, typ, param, code or default_code)
    if isinstance(exc, AdapterkitError):
        if isinstance(exc, RuntimeError):       # a state of the server (the engine is stopping...): retry later
            return 503, error_body(message, "service_unavailable", param, code)
        return 400, error_body(message, "invalid_request_error", param, code)
    return 500, error_body(f"internal server error ({type(exc).__name__}); the server log has the details",
                           "server_error", None, None)


_ABSOLUTE = re.compile(r"(?<![\w.~<>-])/(?:[^\s'\"()\[\],;]+/)*([^\s'\"()\[\],;/]*)")


def path_redactor(roots: Mapping[str, str]) -> Callable[[str], str]:
    """A function that replaces each root path (longest first) by its label, then any other absolute
    path by `.../<last part>`: clients learn which adapter, not where the server keeps it."""
    ordered = sorted(((p.rstrip("/"), label) for p, label in roots.items() if p and p != "/"),
                     key=lambda kv: -len(kv[0]))

    patterns = [(re.compile(re.escape(path) + r"(?=/|$|[\s'\"()\[\],;])"), label) for path, label in ordered]

    def redact(text: str) -> str:
        for pattern, label in patterns:
            text = pattern.sub(label, text)
        return _ABSOLUTE.sub(lambda m: ".../" + m.group(1) if m.group(1) else "/", text)
    return redact


def error_headers(status: int) -> dict[str, str]:
    """Headers that go with an error status (the client's next step)."""
    return {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": "1"}, 503: {"Retry-After": "5"}}.get(status, {})


def error_body(message: str, typ: str, param: Optional[str] = None, code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": typ, "param": param, "code": code}}


@contextlib.contextmanager
def blame(param: str) -> Iterator[None]:
    """Library errors raised inside name `param` as the request field at fault (unless they name one)."""
    try:
        yield
    except (AdapterkitError, APIError) as exc:
        if getattr(exc, "param", None) is None:
            exc.param = param       # type: ignore[attr-defined]
        raise
