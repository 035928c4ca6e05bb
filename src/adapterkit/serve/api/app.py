"""HTTP routes of the OpenAI-compatible server (FastAPI); the logic is service.py's.

    GET  /health                       open (no key): liveness for load balancers
    GET  /openapi.json                 open (no key): FastAPI's OpenAPI schema of these routes and bodies
    GET  /metrics                      Prometheus text
    GET  /v1/models, /v1/models/{id}   the base and every served adapter (parent = the base)
    POST /v1/completions               prompt -> text; "stream": true for server-sent events
    POST /v1/chat/completions          messages -> chat template -> text; streams likewise
    POST /v1/classify, /classify       vLLM's {model, input}: labels + probabilities from a classifier adapter
    POST /v1/load_lora_adapter         vLLM's {lora_name, lora_path} (paths confined to the adapter roots)
    POST /v1/unload_lora_adapter       vLLM's {lora_name}

Every route but /health and /openapi.json needs `Authorization: Bearer KEY` when a key is
configured. Bodies larger than the limit are refused (413) before they are read in full. Bodies are
parsed by protocol.py (their JSON schemas are declared to OpenAPI), so errors of every kind leave
through errors.error_status, the one exception -> status map. An unexpected exception is a 500 in
OpenAI's error shape and the connection stays usable (CatchAll: Starlette's own 500 path re-raises
to the server, which then drops the keep-alive connection without saying so).
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


def error_response(exc: BaseException, redact: Callable[[str], str] = str) -> JSONResponse:
    status, body = error_status(exc, redact)
    if status >= 500:
        log.error("request failed", exc_info=exc)
    return JSONResponse(body, status_code=status, headers=error_headers(status))


class CatchAll:
    """ASGI middleware: an exception no handler took becomes a 500 in OpenAI's error shape, and the
    request ends normally, so the keep-alive connection stays open for the client's next request.
    Once a response has started (a stream) nothing can be sent: the error goes on to the server."""

    def __init__(self, app: ASGIApp, redact: Callable[[str], str]) -> None:
        self.app, self.redact = app, redact

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if started:
                raise
            await error_response(exc, self.redact)(scope, receive, send)


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, by Content-Length or as it streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = PayloadTooLargeError(f"the request body is larger than the server's limit of {self.limit} bytes "
                                       "(the server's --max-body-mb sets it; images as data URLs need more)",
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


def _json_body(model: type) -> dict[str, Any]:
    """openapi_extra for a route that parses its body itself (protocol.parse_body): the body's schema."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


BODIES = (P.CompletionRequest, P.ChatCompletionRequest, P.ClassifyRequest, P.LoadAdapterRequest,
          P.UnloadAdapterRequest)


def _with_bodies(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """app.openapi that also lists the request bodies' pydantic schemas under components."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in BODIES:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(js.pop("$defs", {}))
                comps[model.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema
    return openapi


def create_app(engine: Any, settings: Optional[ApiSettings] = None) -> FastAPI:
    """The ASGI app over a built engine. Starting and stopping the engine is the caller's (server.py)."""
    service = OpenAIService(engine, settings)
    app = FastAPI(title="adapterkit", version=_version(), docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.service = service
    app.openapi = _with_bodies(app)                          # type: ignore[method-assign]

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc, service.redact)

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
    app.add_middleware(CatchAll, redact=service.redact)       # not add_exception_handler(Exception): see CatchAll
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
        return JSONResponse(result, headers={HEADER: routed_header(routed)} if routed and "router" in routed else None)

    @v1.post("/v1/completions", openapi_extra=_json_body(P.CompletionRequest))
    async def completions(request: Request) -> Response:
        return await generate(request, P.CompletionRequest, service.completion)

    @v1.post("/v1/chat/completions", openapi_extra=_json_body(P.ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await generate(request, P.ChatCompletionRequest, service.chat)

    @v1.post("/v1/classify", openapi_extra=_json_body(P.ClassifyRequest))
    @v1.post("/classify", openapi_extra=_json_body(P.ClassifyRequest))
    async def classify(request: Request) -> Response:
        req = P.parse_body(P.ClassifyRequest, await _body(request))
        result = await _until_disconnect(request, service.classify(req))
        return result if isinstance(result, Response) else JSONResponse(result)

    @v1.post("/v1/load_lora_adapter", openapi_extra=_json_body(P.LoadAdapterRequest))
    async def load_lora_adapter(request: Request) -> dict[str, Any]:
        return await service.load_adapter(P.parse_body(P.LoadAdapterRequest, await _body(request)))

    @v1.post("/v1/unload_lora_adapter", openapi_extra=_json_body(P.UnloadAdapterRequest))
    async def unload_lora_adapter(request: Request) -> dict[str, Any]:
        return await service.unload_adapter(P.parse_body(P.UnloadAdapterRequest, await _body(request)))

    app.include_router(v1)
    return app




def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adapterkit")
    except PackageNotFoundError:          # running from a source tree
        return "0"
