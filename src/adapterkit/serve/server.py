"""Run the OpenAI-compatible API over an engine with uvicorn: startup banner, graceful shutdown.

    engine = Engine.build("smollm2-135m", adapter_dirs=["./adapters"])
    serve(engine, host="127.0.0.1", port=8000, settings=ApiSettings(api_key="..."))   # returns 0

Shutdown (SIGINT or SIGTERM): the listening socket closes, requests in flight run to the end for
up to `drain_timeout` seconds, then the rest are cancelled (their engine sequences are dropped);
the engine stops and serve() returns 0. A second SIGINT cancels at once. Unlike uvicorn.run, the
signal is not raised again after the graceful shutdown, so the process exits 0.

The socket is bound before uvicorn starts, so port 0 picks a free port and the banner shows it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import sys
import threading
from typing import Any, Callable, Iterator, Optional, TextIO

import uvicorn

from ..errors import ConfigError
from .api import ApiSettings, create_app

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Server(uvicorn.Server):
    """uvicorn.Server that prints the banner once listening, says what a signal does, and does
    not re-raise the signal after shutting down gracefully (exit code 0)."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None], on_signal: Callable[[int], None]):
        super().__init__(config)
        self._on_started, self._on_signal = on_started, on_signal

    async def startup(self, sockets: Optional[list[socket.socket]] = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield                        # in a thread (tests): the owner sets should_exit
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        self._on_signal(sig if first else -sig)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (IPv4 or IPv6 by the host's form); OSError if the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def banner(engine: Any, url: str, settings: ApiSettings, drain_timeout: float, host: str) -> str:
    """What the operator needs at startup: where, which base, which adapters, how it is guarded."""
    cache = engine.cache
    names = cache.names()
    shown = ", ".join(names[:30]) + (f" ... (+{len(names) - 30})" if len(names) > 30 else "")
    cfg = getattr(engine, "config", None)
    lines = [
        f"adapterkit serve: {url}/v1 (OpenAI-compatible; /health, /metrics)",
        f"  base      {engine.base_name} " + (f"(context {engine.max_context} tokens)" if engine.max_context else
                                                "(an image model: POST /v1/classify with image parts)"),
        *([f"  device    {engine.runtime.device}, {str(engine.runtime.dtype).removeprefix('torch.')}"]
          if hasattr(engine, "runtime") else []),
        f"  adapters  {len(names)} served" + (f": {shown}" if names else " (load more with POST /v1/load_lora_adapter)"),
    ]
    for name, why in sorted(getattr(cache.roots, "skipped", {}).items()):
        lines.append(f"  skipped   {name}: {why}")
    roots = ", ".join(map(str, cache.roots.allowed)) or "none (load_lora_adapter refuses every path)"
    lines.append(f"  roots     {roots}")
    lines.append("  auth      " + ("Bearer API key required on every route but /health" if settings.api_key else
                                  "none: anyone who can reach the port can use it (--api-key to require a key)"))
    if not settings.api_key and not is_loopback(host):
        lines.append(f"  WARNING   listening on {host} without an API key")
    limits = [f"body {settings.max_body_bytes / 2 ** 20:g} MiB"]
    if cfg is not None:
        limits = [f"batch {cfg.max_batch}", f"queue {cfg.max_queue}"] + limits
    elif getattr(engine, "images", False):             # no queue, no KV cache: --max-queue / --kv-cache-mb unused
        limits = [f"images per forward {engine.max_batch}"] + limits
    limits.append(f"adapter slots {cache.max_loaded}, RAM cache {cache.ram_budget / 2 ** 20:g} MiB")
    lines.append("  limits    " + ", ".join(limits))
    lines.append(f"  stop      Ctrl-C or SIGTERM: requests in flight finish (up to {drain_timeout:g} s), "
                 "a second Ctrl-C cancels them")
    return "\n".join(lines)


def serve(engine: Any, *, host: str = "127.0.0.1", port: int = 8000, settings: Optional[ApiSettings] = None,
          drain_timeout: float = 30.0, log_level: str = "info", out: TextIO | None = None,
          sock: Optional[socket.socket] = None) -> int:
    """Serve until SIGINT/SIGTERM; returns 0. Starts the engine and stops it on the way out.
    `sock`: an already bound listening socket (else one is bound here)."""
    settings = settings or ApiSettings()
    if drain_timeout < 0:
        raise ConfigError(f"drain_timeout must be >= 0, got {drain_timeout}")
    out = out or sys.stdout
    sock = sock or bind(host, port)
    url = url_of(host, sock.getsockname()[1])
    app = create_app(engine, settings)
    config = uvicorn.Config(app, lifespan="off", log_level=log_level, timeout_graceful_shutdown=max(1, round(drain_timeout)),
                            timeout_keep_alive=5, server_header=False)

    def started() -> None:
        print(banner(engine, url, settings, drain_timeout, host), file=out, flush=True)

    def on_signal(sig: int) -> None:
        # os.write: a signal handler must not re-enter a buffered print of the main thread.
        name = signal.Signals(abs(sig)).name
        msg = (f"\n{name}: shutting down; waiting for requests in flight (up to {drain_timeout:g} s)\n" if sig > 0
               else f"\n{name} again: cancelling requests in flight\n")
        with contextlib.suppress(OSError):
            os.write(2, msg.encode())

    server = _Server(config, started, on_signal)
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop(drain=False, timeout=5.0)   # anything left was cancelled with its HTTP request
        sock.close()
    print("adapterkit serve: stopped", file=out, flush=True)
    return 0
