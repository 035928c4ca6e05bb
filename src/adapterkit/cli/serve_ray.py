"""`adapterkit serve --replicas N`: the Ray Serve application of serve/ray_app.py, run until Ctrl-C."""

from __future__ import annotations

import signal
import socket
import threading
from pathlib import Path
from typing import Any, Optional

from ..errors import AdapterkitError

ROUTINGS = ("hash", "multiplex", "any")       # ray_app.ROUTINGS (this module must import without Ray)


def serve_replicas(*, base: str, replicas: int, address: Optional[str], host: str, port: int, store: Optional[Path],
                   adapter_dirs: list[Path], engine: dict[str, Any], max_loaded_adapters: int, ram_cache_mb: float,
                   device: str, dtype: Optional[str], settings: Any, replica_cpus: float, replica_gpus: float,
                   routing: str = "hash") -> int:
    """Start the app, print where it is, wait for SIGINT/SIGTERM, shut Serve down; returns 0."""
    try:
        from ..serve import ray_app
    except ImportError:
        raise AdapterkitError("--replicas runs on Ray Serve, which is not installed: pip install 'adapterkit[ray]' "
                              "torch==2.13.0 (pin torch in the same command)") from None
    if port == 0:                                    # Serve needs the number: pick a free one
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    config = ray_app.RaySettings(
        base=base, replicas=replicas, store=str(store) if store is not None else None,
        adapter_dirs=tuple(str(d) for d in adapter_dirs), engine=engine, max_loaded_adapters=max_loaded_adapters,
        ram_cache_mb=ram_cache_mb, device=device, dtype=dtype, api_key=settings.api_key,
        max_body_bytes=settings.max_body_bytes, replica_cpus=replica_cpus, replica_gpus=replica_gpus,
        routing=routing)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            url = ray_app.start(config, host=host, port=port, address=address)
        except (TimeoutError, RuntimeError, ConnectionError) as exc:
            raise AdapterkitError(f"the Ray Serve application did not start: {exc}") from None
        print(f"adapterkit serve: {url}/v1 (OpenAI-compatible; /health, /metrics) on Ray Serve\n"
              f"  base      {base}, {replicas} replica(s) of {replica_cpus:g} CPU, {replica_gpus:g} GPU each\n"
              f"  ray       {address or 'a local Ray started here'}; adapters routed by {routing}\n"
              "  auth      " + ("Bearer API key required on every route but /health" if settings.api_key else
                                "none (--api-key to require a key)") +
              "\n  stop      Ctrl-C or SIGTERM", flush=True)
        stop.wait()
    finally:
        ray_app.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("adapterkit serve: stopped", flush=True)
    return 0
