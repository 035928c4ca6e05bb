"""`adapterkit serve`: the OpenAI-compatible server; registered in cli.py with app.command("serve")(serve_cmd)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import DEVICE_OPT, DTYPE_OPT, device_dtype, fail
from ..errors import AdapterkitError


def serve_cmd(
    base: str = typer.Option("smollm2-135m", "--base", help="Built-in base name or local transformers folder."),
    adapters: Optional[List[Path]] = typer.Option(None, "--adapters", help="Folder whose subfolders are adapters "
                                                  "(ours or PEFT's), served by folder name; repeatable."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port; 0 picks a free one."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="ADAPTERKIT_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on every route but /health "
                                          "(or set ADAPTERKIT_API_KEY, which keeps it out of the process list)."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Sequences decoding together."),
    max_queue: int = typer.Option(256, "--max-queue", min=1, help="Waiting requests before answering 429."),
    kv_cache_mb: float = typer.Option(2048.0, "--kv-cache-mb", min=1.0, help="KV cache memory for all sequences."),
    attention: str = typer.Option("batched", "--attention", help="batched: K/V in an arena, one decode attention "
                                  "call per chunk of up to 16 sequences; per-sequence: one exact cache and call per "
                                  "sequence (the reference)."),
    max_loaded_adapters: int = typer.Option(8, "--max-loaded-adapters", min=1, help="Adapters attached at once."),
    ram_cache_mb: float = typer.Option(1024.0, "--ram-cache-mb", min=0.0, help="RAM tier for adapters not attached."),
    store: Optional[Path] = typer.Option(None, "--store", help="Adapter store to serve (default: "
                                         "$ADAPTERKIT_HOME/store when it exists)."),
    max_body_mb: float = typer.Option(1.0, "--max-body-mb", min=0.001, help="Largest request body (413 above)."),
    shutdown_timeout: float = typer.Option(30.0, "--shutdown-timeout", min=0.0,
                                           help="Seconds requests in flight get to finish on SIGINT/SIGTERM."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level (warning: no access log)."),
    device: Optional[str] = DEVICE_OPT,
    dtype: Optional[str] = DTYPE_OPT,
    replicas: int = typer.Option(0, "--replicas", min=0, help="Run N engine replicas on Ray Serve behind one "
                                 "endpoint (each adapter's requests sent to the replica that holds it); 0: one process. "
                                 "Needs the extra adapterkit[ray]."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to join (ray start --head "
                                              "prints it; default: start a local one)."),
    replica_cpus: float = typer.Option(1.0, "--replica-cpus", min=0.0, help="CPUs Ray reserves per replica (its "
                                       "torch threads too)."),
    replica_gpus: Optional[float] = typer.Option(None, "--replica-gpus", min=0.0, help="GPUs per replica "
                                                 "(default: 1 with a CUDA --device, else 0)."),
    ray_routing: str = typer.Option("hash", "--ray-routing", help="How --replicas pick a replica for an adapter: "
                                    "hash (consistent hashing: one replica per adapter from the first request), "
                                    "multiplex (Ray's model multiplexing), any (no affinity)."),
) -> None:
    """Serve the base and its adapters over an OpenAI-compatible HTTP API.

    \b
    Each adapter is an OpenAI "model" (parent: the base); "model" may be an
    adapter, the base, or BASE:ADAPTER. Also vLLM's /v1/load_lora_adapter and
    /v1/unload_lora_adapter (paths confined to the store and --adapters
    folders), /health and /metrics (Prometheus).

    \b
      adapterkit serve --adapters ./adapters --port 8000
      curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "math", "prompt": "2+2=", "max_tokens": 8}'
    """
    from ..core.base import adapterkit_home
    from ..serve.api import ApiSettings
    from ..serve.engine import Engine, EngineConfig
    from ..serve.server import bind, serve
    from ..store import AdapterStore

    try:
        settings = ApiSettings(api_key=api_key, max_body_bytes=int(max_body_mb * 2 ** 20))
        dev, dt = device_dtype(device, dtype)        # an absent GPU fails before the port is taken
        EngineConfig(attention=attention)            # a bad --attention fails before the base loads
        if store is None and (adapterkit_home() / "store").is_dir():
            store = adapterkit_home() / "store"
        if replicas:
            from ..core.base import is_image_base
            from .serve_ray import ROUTINGS, serve_replicas

            if is_image_base(base):
                raise AdapterkitError(f"--replicas runs the text engine on Ray; {base} is an image base: serve it in "
                                      "one process (leave --replicas out)")

            if ray_routing not in ROUTINGS:
                raise AdapterkitError(f"--ray-routing must be one of {', '.join(ROUTINGS)}, got {ray_routing!r}")

            raise typer.Exit(serve_replicas(
                base=base, replicas=replicas, address=ray_address, host=host, port=port, store=store,
                adapter_dirs=adapters or [], engine=dict(max_batch=max_batch, max_queue=max_queue,
                                                         kv_cache_mb=kv_cache_mb, attention=attention),
                max_loaded_adapters=max_loaded_adapters, ram_cache_mb=ram_cache_mb, device=str(dev), dtype=dtype,
                settings=settings, replica_cpus=replica_cpus, routing=ray_routing,
                replica_gpus=replica_gpus if replica_gpus is not None else float(str(dev).startswith("cuda"))))
        if ray_address is not None:
            raise AdapterkitError("--ray-address joins a Ray cluster for --replicas N; give --replicas too")
        if ray_routing != "hash":
            raise AdapterkitError("--ray-routing chooses among the replicas of --replicas N; give --replicas too")
        try:
            sock = bind(host, port)           # before the (slow) base load: a taken port fails at once
        except OSError as exc:
            raise AdapterkitError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                                  "choose another --port (0 picks a free one)") from None
        try:
            from ..core.base import load_base
            from ..serve.image_engine import ImageEngine

            loaded = load_base(base, dtype=dt, device=dev)
            common = dict(store=AdapterStore(store) if store is not None else None, adapter_dirs=adapters or [],
                          max_loaded_adapters=max_loaded_adapters, ram_cache_mb=ram_cache_mb)
            if loaded.kind == "image":               # classifies images (POST /v1/classify); no generation
                engine = ImageEngine.build(loaded, max_batch=max_batch, **common)
            else:
                engine = Engine.build(loaded, config=EngineConfig(max_batch=max_batch, max_queue=max_queue,
                                                                  kv_cache_mb=kv_cache_mb, attention=attention),
                                      **common)
        except BaseException:
            sock.close()
            raise
        code = serve(engine, host=host, settings=settings, drain_timeout=shutdown_timeout, log_level=log_level,
                     sock=sock)
    except AdapterkitError as exc:
        fail(exc)
    raise typer.Exit(code)
