"""Scale-out on Ray Serve: N engine replicas behind one OpenAI endpoint (the only module that imports ray).

    adapterkit serve --replicas 2 [--ray-address ADDR] ...      (every other serve flag keeps its meaning)

Deployments:
  Ingress   the HTTP endpoint. It does not parse or validate requests: it reads the body's `model` (for
            the generation and classify routes) only to pick a replica, and forwards method, path,
            headers and body. /health and /metrics it answers itself from what the replicas report.
  Replica   one Engine with its own adapter cache, and the single-process app (create_app) over it,
            called in process through ASGI: every endpoint, error shape, status, SSE stream, API key,
            router (`auto`) and header is the single-process server's own.
  Registry  a small Ray actor: the adapters loaded or unloaded through the API (name -> path, with a
            version) and each replica's last report (metrics text, health), sent every REPORT_S.

Routing: a request naming an adapter goes to the replica its adapter hashes to on a consistent-hash
ring of the live replicas (ROUTINGS: or through Ray's model multiplexing), so one replica's cache
holds it (cache affinity); base and router requests go to any replica. Load and unload are validated by one replica (its answer is the reply),
then recorded in the registry; every replica applies the registry's table before it serves a request
whose version it has not seen, so a load reaches every replica and an unloaded adapter is served by
none. A replaced adapter on disk is caught by each replica's cache (content fingerprints), as in one
process. A replica that dies: its requests in flight get a 503 in OpenAI's error shape (a stream that
had started ends with an error event); Serve starts a new one, which applies the table on first use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Optional

import ray
from ray import serve

log = logging.getLogger("adapterkit.serve.ray")
REGISTRY = "adapterkit-registry"
APP = "adapterkit"
REPORT_S = 2.0                    # replicas report metrics and health this often (each report costs CPU)
STALE_S = 10.0                    # a replica silent this long is reported unreachable
FORGET_S = 60.0                   # ... and this long, no longer reported
REPLICA_HEADER = "x-adapterkit-replica"
# "hash": consistent hashing of the adapter over the live replicas (Ray's ConsistentHashRouter, keyed by
#         the adapter as its session id): an adapter's requests all go to one replica, from the first
#         request on, and on to the next replica of the ring only when that one has max_ongoing_requests
#         in flight; a replica added or lost moves only its share of the adapters.
# "multiplex": Ray's model multiplexing: a replica is preferred once it has reported serving the adapter
#         (every 0.1 s through the controller), so a burst of an adapter's requests that arrives before
#         the report spreads (affinity 0.88-0.97 in benchmarks/serve_ray.py).
# "any":  no preference (power of two choices): for measuring what affinity gives.
ROUTINGS = ("hash", "multiplex", "any")
HASH_ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"
ROUTED = ("/v1/completions", "/v1/chat/completions", "/v1/classify", "/classify")
# Ray's periodic background work, slowed down for a local Ray that `start` launches (the environment
# wins where set; a cluster started with `ray start` keeps its own). On 2 cores a decode uses both, and
# every wake-up of another process stalls it: with Ray's defaults the replica's mean engine step was
# 145 ms against 121 ms in one process, with these and a 1 s controller loop 124-133 ms
# (benchmarks/serve_ray_knobs.py, results/serve_ray_knobs.jsonl). The controller's loop stays at Ray's
# 0.1 s: at 1 s, which replica holds which adapter reached the router too late for a burst, and
# affinity fell from 0.97 to 0.81 (benchmarks/serve_ray.py).
QUIET_RAY = {"RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "2000",      # Serve's own metrics (default 100 ms)
             "RAY_SERVE_EVENT_LOOP_MONITORING_INTERVAL_S": "60",  # event-loop lag probes (default 5 s)
             "RAY_raylet_report_resources_period_milliseconds": "1000"}   # raylet -> GCS (default 100 ms)


@dataclass(frozen=True)
class RaySettings:
    """What `adapterkit serve --replicas N` passes to every replica (plain data: it travels to Ray)."""
    base: str
    replicas: int = 2
    store: Optional[str] = None
    adapter_dirs: tuple[str, ...] = ()
    engine: dict[str, Any] = field(default_factory=dict)         # EngineConfig fields
    max_loaded_adapters: int = 8
    ram_cache_mb: float = 1024.0
    device: str = "cpu"
    dtype: Optional[str] = None
    api_key: Optional[str] = None
    max_body_bytes: int = 1 << 20
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    threads: Optional[int] = None                                  # torch threads per replica (default: its cpus)
    routing: str = "hash"         # how a request naming an adapter picks its replica: ROUTINGS


@ray.remote(num_cpus=0)
class Registry:
    """Loaded adapters (name -> path or None for unloaded) with a version; the replicas' reports."""

    def __init__(self) -> None:
        self.version = 0
        self.table: dict[str, Optional[str]] = {}
        self.reports: dict[str, dict[str, Any]] = {}

    def record(self, name: str, path: Optional[str]) -> int:
        self.table[name] = path
        self.version += 1
        return self.version

    def current(self) -> tuple[int, dict[str, Optional[str]]]:
        return self.version, dict(self.table)

    def report(self, replica: str, metrics: str, health: dict[str, Any]) -> None:
        self.reports[replica] = {"metrics": metrics, "health": health, "at": time.time()}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        for r in [r for r, v in self.reports.items() if now - v["at"] > FORGET_S]:
            del self.reports[r]                    # a replica gone for good (Serve replaced it)
        return {r: {**v, "age_s": now - v["at"]} for r, v in self.reports.items()}


def _registry() -> Any:
    return ray.get_actor(REGISTRY, namespace=APP)


async def call_asgi(app: Any, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                    body: bytes) -> AsyncIterator[Any]:
    """Run one HTTP request through an ASGI app in process: yields (status, headers), then body chunks.
    Closing the generator early is a client disconnect (the app cancels the engine request)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
             "headers": headers, "client": ("ray-ingress", 0), "server": ("adapterkit-replica", 80)}
    queue: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await queue.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await queue.put(None)

    task = asyncio.create_task(run())
    try:
        while True:
            message = await queue.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                yield (message["status"], [(k.decode("latin-1"), v.decode("latin-1"))
                                           for k, v in message.get("headers", [])])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body"):
                    break
        await task
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, timeout=5.0)
            except (asyncio.TimeoutError, Exception):
                task.cancel()


class Replica:
    """One engine and the single-process app over it (Serve runs N of these)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import torch

        from .api import ApiSettings, create_app
        from .engine import Engine, EngineConfig
        from ..store import AdapterStore

        s = RaySettings(**{**settings, "adapter_dirs": tuple(settings.get("adapter_dirs", ()))})
        torch.set_num_threads(s.threads or max(1, int(s.replica_cpus)))
        self.engine = Engine.build(s.base, store=AdapterStore(s.store) if s.store else None,
                                   adapter_dirs=s.adapter_dirs, config=EngineConfig(**s.engine),
                                   max_loaded_adapters=s.max_loaded_adapters, ram_cache_mb=s.ram_cache_mb,
                                   device=s.device, dtype=s.dtype).start()
        self.app = create_app(self.engine, ApiSettings(api_key=s.api_key, max_body_bytes=s.max_body_bytes))
        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        self.id = str(getattr(rid, "unique_id", None) or getattr(ctx, "replica_tag", None) or os.getpid())
        self.version = 0
        self.registry = _registry()
        self._sync_lock = asyncio.Lock()
        self._reporter = asyncio.get_event_loop().create_task(self._report_forever())

    async def _report_forever(self) -> None:
        from .api import metrics as prom

        while True:
            try:
                text = prom.render(self.engine.metrics(), self.engine.cache.stats(), {})
                health = {"status": "ok", "adapters": len(self.engine.cache.names()), "pid": os.getpid()}
                await self.registry.report.remote(self.id, text, health)
            except Exception:        # a report is best effort; the next one comes REPORT_S later
                pass
            await asyncio.sleep(REPORT_S)

    @serve.multiplexed(max_num_models_per_replica=64)
    async def adapter(self, model_id: str) -> str:
        """Ray's multiplexing calls this the first time this replica serves `model_id`: the engine's cache
        attaches adapters on demand, so there is nothing to load here; returning marks the affinity."""
        return model_id

    async def _sync(self, version: int) -> None:
        """Apply the registry's load/unload table when the ingress has seen a newer one than we have."""
        if version <= self.version:
            return
        async with self._sync_lock:
            if version <= self.version:
                return
            now, table = await self.registry.current.remote()
            for name, path in table.items():
                try:
                    if path is None:
                        await asyncio.to_thread(self.engine.cache.unload, name)
                    elif name not in self.engine.cache.names():
                        await asyncio.to_thread(self.engine.cache.load, name, path)
                except Exception as exc:   # e.g. already unloaded: the request itself says what is wrong
                    log.warning("replica %s: applying %s %r failed: %s", self.id,
                                "unload" if path is None else "load", name, exc)
            self.version = now

    async def http(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                   version: int) -> AsyncIterator[Any]:
        if serve.get_multiplexed_model_id():
            await self.adapter(serve.get_multiplexed_model_id())
        await self._sync(version)
        first = True
        async for part in call_asgi(self.app, method, path, query, headers, body):
            if first:                         # which replica answered (clients and benchmarks can see it)
                status, out = part
                part, first = (status, [*out, (REPLICA_HEADER, self.id)]), False
            yield part

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop(drain=False, timeout=1.0)


def _model_of(path: str, body: bytes) -> str:
    """The `model` a generation or classify request names ("" when absent or unreadable: any replica
    answers, with the app's own 400)."""
    if path not in ROUTED:
        return ""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return ""
    return model if isinstance(model, str) else ""


def _route_options(routing: str, model: str) -> dict[str, str]:
    """Handle options that send a request for `model` (an adapter, "auto", "" or the base) by `routing`."""
    if not model or model == "auto" or routing == "any":
        return {}                       # base, router and unparsable requests: any replica
    return {"session_id": model} if routing == "hash" else {"multiplexed_model_id": model}


class Ingress:
    """The HTTP endpoint: forwards to a replica by adapter; answers /health and /metrics itself."""

    def __init__(self, replicas: Any, settings: dict[str, Any]) -> None:
        from .api import ApiSettings

        self.replicas = replicas
        self.settings = RaySettings(**{**settings, "adapter_dirs": tuple(settings.get("adapter_dirs", ()))})
        self.api = ApiSettings(api_key=self.settings.api_key, max_body_bytes=self.settings.max_body_bytes)
        self.registry = _registry()
        self.version = 0

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

        path = request.url.path
        try:
            if path == "/health":
                return JSONResponse(await self._health())
            if path == "/metrics":
                self._check_auth(request.headers.get("authorization"))       # as create_app's routes do
                from .api.metrics import CONTENT_TYPE

                return PlainTextResponse(await self._metrics(), media_type=CONTENT_TYPE)
            body = await request.body()
            model = _model_of(path, body)
            if self.version == 0:
                self.version = (await self.registry.current.remote())[0]
            headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]
            handle = self.replicas.options(stream=True, **_route_options(self.settings.routing, model))
            parts = handle.http.remote(request.method, path, request.url.query.encode(), headers, body,
                                       self.version)
            status, out_headers = await parts.__anext__()
        except Exception as exc:
            return self._failure(exc)
        if path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter") and status == 200:
            chunks = [c async for c in parts]
            await self._record(path, body)
            return Response(b"".join(chunks), status_code=status, headers=dict(out_headers))
        media = dict((k.lower(), v) for k, v in out_headers).get("content-type", "")
        if media.startswith("text/event-stream"):
            return StreamingResponse(self._relay(parts), status_code=status, headers=dict(out_headers))
        try:
            chunks = [c async for c in parts]
        except Exception as exc:
            return self._failure(exc)
        return Response(b"".join(chunks), status_code=status, headers=dict(out_headers))

    async def _relay(self, parts: Any) -> AsyncIterator[bytes]:
        """An SSE body; a replica lost mid-stream ends it with an error event in OpenAI's shape."""
        try:
            async for chunk in parts:
                yield chunk
        except Exception as exc:
            from .api.errors import ServiceUnavailableError, error_status

            _, body = error_status(ServiceUnavailableError(f"the replica serving this stream failed ({type(exc).__name__}); "
                                                           "retry the request"))
            yield f"data: {json.dumps(body)}\n\n".encode()

    def _failure(self, exc: BaseException) -> Any:
        """A replica lost (or never reached): 503 in OpenAI's error shape, never another model's answer."""
        from starlette.responses import JSONResponse

        from .api.errors import APIError, ServiceUnavailableError, error_headers, error_status

        if not isinstance(exc, APIError):
            exc = ServiceUnavailableError(f"no replica could serve the request ({type(exc).__name__}); retry it")
        status, body = error_status(exc)
        return JSONResponse(body, status_code=status, headers=error_headers(status))

    def _check_auth(self, authorization: Optional[str]) -> None:
        from .api.service import check_bearer

        check_bearer(self.api.api_key, authorization)

    async def _record(self, path: str, body: bytes) -> None:
        req = json.loads(body)
        name = req["lora_name"]
        self.version = await self.registry.record.remote(name, req.get("lora_path") if "unload" not in path else None)

    async def _health(self) -> dict[str, Any]:
        reports = await self.registry.snapshot.remote()
        replicas = [{"replica": r, **v["health"], "age_s": round(v["age_s"], 2),
                     **({"status": "unreachable"} if v["age_s"] > STALE_S else {})}
                    for r, v in sorted(reports.items())]
        live = sum(r["status"] == "ok" for r in replicas)
        return {"status": "ok" if live else "unavailable", "base": self.settings.base, "replicas": replicas,
                "replicas_live": live, "replicas_wanted": self.settings.replicas}

    async def _metrics(self) -> str:
        """Every replica's Prometheus text, each sample labelled replica="ID" (HELP/TYPE lines once)."""
        reports = await self.registry.snapshot.remote()
        return label_replicas({r: v["metrics"] for r, v in reports.items() if v["age_s"] <= STALE_S})


def label_replicas(texts: dict[str, str]) -> str:
    """Merge Prometheus texts of several replicas: each sample gets replica="ID"; HELP/TYPE once."""
    seen: set[str] = set()
    meta: list[str] = []
    samples: dict[str, list[str]] = {}
    for replica, text in sorted(texts.items()):
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                if line not in seen:
                    seen.add(line)
                    meta.append(line)
                continue
            name_part, _, value = line.rpartition(" ")
            if "{" in name_part:
                name, _, labels = name_part.partition("{")
                labelled = f'{name}{{replica="{replica}",{labels}'
            else:
                name, labelled = name_part, f'{name_part}{{replica="{replica}"}}'
            samples.setdefault(name, []).append(f"{labelled} {value}")
    out: list[str] = []
    for line in meta:                          # each family's HELP/TYPE, then its samples
        out.append(line)
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "TYPE":
            for name in [n for n in samples if n == parts[2] or n.startswith(parts[2] + "_")]:
                out.extend(samples.pop(name))
    for rest in samples.values():
        out.extend(rest)
    return "\n".join(out) + "\n"


def build_app(settings: RaySettings) -> Any:
    """The Serve application: N replicas (each `replica_cpus` CPUs, `replica_gpus` GPUs) and the ingress."""
    if settings.routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {settings.routing!r}")
    data = {**asdict(settings), "adapter_dirs": list(settings.adapter_dirs)}
    router = {"request_router_config": {"request_router_class": HASH_ROUTER}} if settings.routing == "hash" else {}
    replica = serve.deployment(Replica, name="replica", num_replicas=settings.replicas, max_ongoing_requests=256,
                               ray_actor_options={"num_cpus": settings.replica_cpus,
                                                  "num_gpus": settings.replica_gpus}, **router)
    ingress = serve.deployment(Ingress, name="ingress", max_ongoing_requests=4096,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica.bind(data), data)


def start(settings: RaySettings, *, host: str = "127.0.0.1", port: int = 8000, address: Optional[str] = None,
          num_cpus: Optional[float] = None, timeout_s: float = 300.0) -> str:
    """Connect to (or start) Ray, create the registry, run the app; returns its URL."""
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Serve gives its HTTP proxy 5 s to come up; on a busy small machine importing it takes longer and
        # Serve kills and restarts it in a loop (seen on 2 busy cores): allow a minute
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
        os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
        for key, value in QUIET_RAY.items():
            os.environ.setdefault(key, value)
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "namespace": APP}
        if address:
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = num_cpus if num_cpus is not None else max(
                os.cpu_count() or 1, settings.replicas * settings.replica_cpus)
        ray.init(**kwargs)
    Registry.options(name=REGISTRY, namespace=APP, get_if_exists=True, lifetime="detached").remote()
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings), name=APP, route_prefix="/", blocking=False)
    deadline = time.time() + timeout_s
    while True:                                   # every replica up (Serve waits for their __init__)
        status = serve.status().applications.get(APP)
        if status is not None and str(status.status).endswith("RUNNING"):
            break
        if status is not None and str(status.status).endswith(("DEPLOY_FAILED", "UNHEALTHY")):
            raise RuntimeError(f"the Ray Serve application failed to start: {status.message}")
        if time.time() > deadline:
            raise TimeoutError(f"the Ray Serve application was not running after {timeout_s:g} s "
                               "(are the replicas' CPU/GPU requests more than the cluster has?)")
        time.sleep(0.5)
    return f"http://{host}:{port}"


def stop() -> None:
    """Delete the app and the registry; shut Serve down (Ray stays up if it was there before)."""
    try:
        serve.shutdown()
    finally:
        try:
            ray.kill(_registry())
        except Exception:
            pass
