"""HTTP routes of the OpenAI-compatible server (FastAPI); the logic is service.py's.

    GET  /health                       open (no key): liveness for load balancers
    GET  /metrics                      Prometheus text
    GET  /v1/models, /v1/models/{id}   the base and every served adapter (parent = the base)
    POST /v1/completions               prompt -> text; "stream": true for server-sent events
    POST /v1/chat/completions          messages -> chat template -> text; streams likewise
    POST /v1/load_lora_adapter         vLLM's {lora_name, lora_path} (paths confined to the adapter roots)
    POST /v1/unload_lora_adapter       vLLM's {lora_name}

Every route but /health needs `Authorization: Bearer KEY` when a key is configured. Bodies larger
than the limit are refused (413) before they are read in full. Bodies are parsed by protocol.py, so
errors of every kind leave through errors.error_status, the one exception -> status map.
A client that disconnects cancels its request in the engine (streaming or not).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...errors import AdapterkitError
from . import protocol as P
from .errors import (APIError, InvalidRequestError, PayloadTooLargeError, RouteNotFoundError, error_body,
                     error_headers, error_status)
from .metrics import CONTENT_TYPE
from .routing import HEADER, routed_header
from .service import ApiSettings, EventStream, OpenAIService

log = logging.getLogger("adapterkit.serve")


def error_response(exc: BaseException) -> JSONResponse:
    status, body = error_status(exc)
    if status >= 500:
        log.error("request failed", exc_info=exc)
    return JSONResponse(body, status_code=status, headers=error_headers(status))


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, by Content-Length or as it streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = PayloadTooLargeError(f"the request body is larger than the server's limit of {self.limit} bytes",
                                       code="request_too_large")
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.limit:
                    await error_response(too_big)(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_big
            return message

        await self.app(scope, limited, send)


class SSEResponse(StreamingResponse):
    """Server-sent events whose request is cancelled however the response ends (done, error, disconnect)."""

    def __init__(self, events: EventStream) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if events.routed is not None:
            headers[HEADER] = routed_header(events.routed)
        super().__init__(events.chunks(), media_type="text/event-stream", headers=headers)
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.events.close()


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work`; cancel it (and so its engine request) if the client disconnects first.
    The body must have been read already: the next ASGI message is then the disconnect."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)   # both clean up (the engine stream)
    if task.cancelled():
        return Response(status_code=499)      # nobody is listening; the engine request is cancelled
    return task.result()


async def _body(request: Request) -> bytes:
    return await request.body()


def create_app(engine: Any, settings: Optional[ApiSettings] = None) -> FastAPI:
    """The ASGI app over a built engine. Starting and stopping the engine is the caller's (server.py)."""
    service = OpenAIService(engine, settings)
    app = FastAPI(title="adapterkit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(RouteNotFoundError(f"no route {request.method} {request.url.path}"))
        return JSONResponse(error_body(f"{exc.detail}: {request.method} {request.url.path}", "invalid_request_error"),
                            status_code=exc.status_code, headers=exc.headers)

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = P.field_path(tuple(first.get("loc", ()))[1:])
        return error_response(InvalidRequestError(f"{param}: {first['msg']}" if param else first["msg"],
                                                  param=param or None))

    app.add_exception_handler(APIError, on_error)
    app.add_exception_handler(AdapterkitError, on_error)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_error)
    app.add_middleware(BodyLimit, limit=service.settings.max_body_bytes)

    async def auth(request: Request) -> None:
        service.check_auth(request.headers.get("authorization"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return service.health()

    v1 = APIRouter(dependencies=[Depends(auth)])

    @v1.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(service.metrics_text(), media_type=CONTENT_TYPE)

    @v1.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return service.list_models()

    @v1.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        return service.get_model(model_id)

    async def generate(request: Request, model: type, run: Callable[[Any], Awaitable[Any]]) -> Response:
        req = P.parse_body(model, await _body(request))
        result = await _until_disconnect(request, run(req))
        if isinstance(result, EventStream):
            return SSEResponse(result)
        if isinstance(result, Response):
            return result
        routed = result.get("adapterkit")
        return JSONResponse(result, headers={HEADER: routed_header(routed)} if routed else None)

    @v1.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, P.CompletionRequest, service.completion)

    @v1.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, P.ChatCompletionRequest, service.chat)

    @v1.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> dict[str, Any]:
        return await service.load_adapter(P.parse_body(P.LoadAdapterRequest, await _body(request)))

    @v1.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> dict[str, Any]:
        return await service.unload_adapter(P.parse_body(P.UnloadAdapterRequest, await _body(request)))

    app.include_router(v1)
    return app


