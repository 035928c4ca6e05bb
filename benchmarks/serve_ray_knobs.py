#!/usr/bin/env python
"""Which of Ray's background intervals slow a replica's engine on 2 cores (issue 14's latency target):
one process vs `serve --replicas 1` under environment settings, each freshly started. Per system:
warm-up, N requests of 16 then of 1 output token one at a time (e2e p50), GET /v1/models p50 (the
hops alone), and the engine's mean step time from /metrics. One JSON line per system on stdout
(raw results: results/serve_ray_knobs.jsonl). ray_app.QUIET_RAY holds the settings chosen.

    .venv/bin/python benchmarks/serve_ray_knobs.py single,ray1,ray1-raylet 15
"""
import asyncio, os, sys, time, statistics, json, random
from pathlib import Path
import httpx
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_ray as sr
import adapterkit
from serve_systems import make_adapters

# Ray's own defaults for the knobs tried (ray_app.start would otherwise apply QUIET_RAY to every ray1*)
RAY_DEFAULTS = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "100",
                "RAY_SERVE_EVENT_LOOP_MONITORING_INTERVAL_S": "5", "RAY_raylet_report_resources_period_milliseconds": "100"}
CONFIGS = {     # name: (serve flags, environment over RAY_DEFAULTS); ray_app.QUIET_RAY is ray1-raylet
# without its 1 s controller loop (which cost multiplex affinity: see serve_ray.py)
 "single": ([], {}),
 "ray1": (["--replicas", "1", "--replica-cpus", "2"], {}),
 "ray1-quiet": (["--replicas", "1", "--replica-cpus", "2"], {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "2000", "RAY_SERVE_EVENT_LOOP_MONITORING_INTERVAL_S": "60"}),
 "ray1-q05": (["--replicas", "1", "--replica-cpus", "2"], {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "2000", "RAY_SERVE_EVENT_LOOP_MONITORING_INTERVAL_S": "60"}),
 "ray1-quieter": (["--replicas", "1", "--replica-cpus", "2"], {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "2000", "RAY_SERVE_EVENT_LOOP_MONITORING_INTERVAL_S": "60", "RAY_raylet_report_resources_period_milliseconds": "1000", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}),
 "ray1-samethread": (["--replicas", "1", "--replica-cpus", "2"], {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "2000", "RAY_SERVE_EVENT_LOOP_MONITORING_INTERVAL_S": "60", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}),
 "ray1-raylet": (["--replicas", "1", "--replica-cpus", "2"], {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "2000", "RAY_SERVE_EVENT_LOOP_MONITORING_INTERVAL_S": "60", "RAY_raylet_report_resources_period_milliseconds": "1000"}),
 "ray1-tput": (["--replicas", "1", "--replica-cpus", "2"], {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0", "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}),
}
which = sys.argv[1].split(",")
n = int(sys.argv[2]) if len(sys.argv) > 2 else 15
base = adapterkit.load_base("smollm2-135m", device="cpu")
root = Path(os.environ.get("ADAPTERKIT_HOME", Path.home() / ".adapterkit")) / "bench" / "serve-adapters"
names = make_adapters(base, root, 64)
rng = random.Random(0)
vocab = base.tokenizer.vocab_size
def prompt(): return base.tokenizer.decode([rng.randrange(100, vocab) for _ in range(128)])
lat16 = [{"model": rng.choice(names), "prompt": prompt(), "max_tokens": 16, "ignore_eos": True, "temperature": 0} for _ in range(n)]
lat1 = [{"model": b["model"], "prompt": b["prompt"], "max_tokens": 1, "ignore_eos": True, "temperature": 0} for b in lat16]
for name in which:
    flags, env = CONFIGS[name]
    sr.SYSTEMS[name] = flags
    old = dict(os.environ); os.environ.update({**(RAY_DEFAULTS if flags else {}), **env})
    port = sr.free_port(); proc = sr.start(name, root, port); os.environ.clear(); os.environ.update(old)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(sr.run_requests(url, lat16[:3], False))
        t16 = [g[0] for g in asyncio.run(sr.run_requests(url, lat16, False))]
        t1 = [g[0] for g in asyncio.run(sr.run_requests(url, lat1, False))]
        async def models():
            async with httpx.AsyncClient() as c:
                out = []
                for _ in range(30):
                    t0 = time.perf_counter(); await c.get(f"{url}/v1/models"); out.append(time.perf_counter() - t0)
                return out
        tm = asyncio.run(models())
        time.sleep(4.5)
        mt = httpx.get(f"{url}/metrics").text
        def val(suffix):
            return sum(float(l.rsplit(" ", 1)[1]) for l in mt.splitlines() if l.startswith("adapterkit_engine_step_seconds_" + suffix))
        step_ms = 1000 * val("sum") / max(1, val("count"))
        print(json.dumps({"system": name, "p50_16_ms": 1000*statistics.median(t16), "p50_1_ms": 1000*statistics.median(t1), "models_ms": 1000*statistics.median(tm), "min16": 1000*min(t16), "step_ms": step_ms, "steps": val("count")}), flush=True)
    finally:
        sr.stop(proc)
