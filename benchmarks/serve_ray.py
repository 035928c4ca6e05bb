#!/usr/bin/env python
"""Scale-out on Ray Serve (issue 14's benchmark): the same HTTP workload against

  single       adapterkit serve (one process, 2 torch threads)
  ray1         adapterkit serve --replicas 1 --replica-cpus 2   (the cost of the Ray hop)
  ray2         adapterkit serve --replicas 2 --replica-cpus 1   (two engines on the same 2 cores; adapters
               placed by consistent hashing, the default --ray-routing)
  ray2-multiplex  ray2 with --ray-routing multiplex (Ray's model multiplexing)
  ray2-random  ray2 with --ray-routing any (no affinity), to see what adapter affinity gives

SmolLM2-135M, 64 rank-16 LoRA adapters (benchmarks/serve_systems.make_adapters), every replica with
64 slots. Parts, per system, each from a freshly started server:
  saturation  --requests requests at t=0 over the adapters (seeded uniform), a ~128-token prompt, 64
              output tokens forced (ignore_eos), greedy: output tokens/s, e2e p50 / p99. The servers
              start cold, so the same pass measures affinity: of the requests after each adapter's
              first, the share answered by a replica that had answered that adapter before (the
              x-adapterkit-replica header).
  latency     --latency-requests requests one at a time (16 output tokens): e2e p50; then the engine's
              mean step time from /metrics (the replicas' reports) over the whole run, and the round trip
              of GET /v1/models (no engine work: the cost of the hops alone), p50 of 30; then the
              cores the server's processes (Ray's included) keep busy over 20 s with no request.
Targets: ray1 >= 0.85 of single's saturation throughput and <= +20 ms p50 latency; ray2 affinity >= 0.9
(and ray2-multiplex's, Ray's own mechanism, for comparison).
The HTTP client runs in this process on the same cores as the servers (for every system alike).

    .venv/bin/python benchmarks/serve_ray.py [--systems single,ray1,ray2,ray2-random] [--requests 192]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from cli_runs import log  # noqa: E402

SYSTEMS = {"single": [], "ray1": ["--replicas", "1", "--replica-cpus", "2"],
           "ray2": ["--replicas", "2", "--replica-cpus", "1"],
           "ray2-multiplex": ["--replicas", "2", "--replica-cpus", "1", "--ray-routing", "multiplex"],
           "ray2-random": ["--replicas", "2", "--replica-cpus", "1", "--ray-routing", "any"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def start(system: str, root: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "adapterkit", "serve", "--base", "smollm2-135m", "--adapters", str(root), "--port",
           str(port), "--max-batch", "64", "--max-loaded-adapters", "64", "--log-level", "warning", *SYSTEMS[system]]
    env = {**os.environ, "ADAPTERKIT_DEVICE": "cpu", "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    want = int(SYSTEMS[system][1]) if SYSTEMS[system] else None
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{system} exited: {proc.stdout.read()}")
        try:
            h = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
            if want is None or h.get("replicas_live") == want:
                return proc
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    raise SystemExit(f"{system} did not come up in 600 s")


def session_cpu_s(sid: int) -> float:
    """CPU seconds used so far by every process of session `sid` (the server and all it started: Ray's
    GCS, raylet, proxy, controller, workers), from /proc."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue                                   # a process that ended meanwhile
        if int(fields[3]) == sid:                      # field 6 of stat: the session id
            total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def idle_cpu_share(proc: subprocess.Popen, seconds: float = 20.0) -> float:
    """Cores the server's processes keep busy while no request is in flight (background work)."""
    time.sleep(3)
    before = session_cpu_s(proc.pid)
    time.sleep(seconds)
    return (session_cpu_s(proc.pid) - before) / seconds


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def step_ms(url: str) -> float:
    """Mean engine step (ms) over the server's life, from /metrics (summed over replicas)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text

    def total(suffix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(f"adapterkit_engine_step_seconds_{suffix}"))
    return 1000 * total("sum") / max(1.0, total("count"))


def hop_ms(url: str, n: int = 30) -> float:
    """p50 round trip of GET /v1/models: no engine work, only the HTTP server and (on Ray) the hops."""
    secs = []
    with httpx.Client(timeout=30) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            c.get(f"{url}/v1/models").raise_for_status()
            secs.append(time.perf_counter() - t0)
    return 1000 * statistics.median(secs)


async def run_requests(url: str, bodies: list[dict], concurrent: bool) -> list[tuple[float, dict, str]]:
    """(seconds, response JSON, replica) per body; all at once, or one at a time."""
    async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=256)) as c:
        async def one(body: dict) -> tuple[float, dict, str]:
            t0 = time.perf_counter()
            r = await c.post(f"{url}/v1/completions", json=body)
            if r.status_code != 200:
                raise SystemExit(f"{r.status_code}: {r.text}")
            return time.perf_counter() - t0, r.json(), r.headers.get("x-adapterkit-replica", "single")
        if concurrent:
            return list(await asyncio.gather(*[one(b) for b in bodies]))
        return [await one(b) for b in bodies]


def affinity(models: list[str], replicas: list[str]) -> float | None:
    """Of the requests after each adapter's first, the share answered by a replica that had answered it."""
    held: dict[str, set[str]] = {}
    hits = total = 0
    for m, r in zip(models, replicas):
        if m in held:
            total += 1
            hits += r in held[m]
        held.setdefault(m, set()).add(r)
    return hits / total if total else None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--latency-requests", type=int, default=20)
    p.add_argument("--out", type=Path, default=RESULTS / "serve_ray.json")
    a = p.parse_args()
    import adapterkit
    from serve_systems import make_adapters

    base = adapterkit.load_base("smollm2-135m", device="cpu")
    root = Path(os.environ.get("ADAPTERKIT_HOME", Path.home() / ".adapterkit")) / "bench" / "serve-adapters"
    names = make_adapters(base, root, a.adapters)
    rng = random.Random(0)
    vocab = base.tokenizer.vocab_size

    def prompt() -> str:
        return base.tokenizer.decode([rng.randrange(100, vocab) for _ in range(128)])
    sat = [{"model": rng.choice(names), "prompt": prompt(), "max_tokens": 64, "ignore_eos": True, "temperature": 0}
           for _ in range(a.requests)]
    lat = [{"model": rng.choice(names), "prompt": prompt(), "max_tokens": 16, "ignore_eos": True, "temperature": 0}
           for _ in range(a.latency_requests)]
    out = {"benchmark": "serve_ray", "adapters": a.adapters, "requests": a.requests, "systems": {}}
    for system in a.systems.split(","):
        port = free_port()
        log(f"{system}: starting")
        proc = start(system, root, port)
        try:
            url = f"http://127.0.0.1:{port}"
            t0 = time.perf_counter()
            got = asyncio.run(run_requests(url, sat, True))
            wall = time.perf_counter() - t0
            tokens = sum(g[1]["usage"]["completion_tokens"] for g in got)
            secs = [g[0] for g in got]
            latency = [g[0] for g in asyncio.run(run_requests(url, lat, False))]
            hop = hop_ms(url)
            if SYSTEMS[system]:
                time.sleep(5)                 # replicas report their metrics every REPORT_S (2 s)
            step = step_ms(url)
            idle = idle_cpu_share(proc)
            res = {"saturation_tok_s": tokens / wall, "wall_s": wall, "e2e_p50_s": pct(secs, 0.5),
                   "e2e_p99_s": pct(secs, 0.99), "latency_p50_s": statistics.median(latency),
                   "hop_p50_ms": hop, "engine_step_mean_ms": step,
                   "idle_cores_busy": idle,
                   "affinity": affinity([b["model"] for b in sat], [g[2] for g in got]),
                   "replicas_used": sorted({g[2] for g in got})}
            out["systems"][system] = res
            log(f"{system}: {res['saturation_tok_s']:.1f} tok/s, latency p50 {1000 * res['latency_p50_s']:.0f} ms, "
                f"hop {hop:.1f} ms, step {step:.1f} ms, idle cores busy {idle:.3f}, affinity {res['affinity']}")
        finally:
            stop(proc)
    s = out["systems"]
    if "single" in s and "ray1" in s:
        out["ray1_over_single_throughput"] = s["ray1"]["saturation_tok_s"] / s["single"]["saturation_tok_s"]
        out["ray1_latency_added_ms"] = 1000 * (s["ray1"]["latency_p50_s"] - s["single"]["latency_p50_s"])
        out["ray1_hop_added_ms"] = s["ray1"]["hop_p50_ms"] - s["single"]["hop_p50_ms"]
        out["ray1_step_over_single"] = s["ray1"]["engine_step_mean_ms"] / s["single"]["engine_step_mean_ms"]
    if "ray2" in s:
        out["ray2_over_single_throughput"] = (s["ray2"]["saturation_tok_s"] / s["single"]["saturation_tok_s"]
                                              if "single" in s else None)
    out["targets"] = {"ray1_throughput_at_least": 0.85, "ray1_latency_added_ms_at_most": 20,
                      "ray2_affinity_at_least": 0.9}
    out["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
