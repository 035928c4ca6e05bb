"""`adapterkit serve --replicas N` on Ray Serve (issue 14): a local Ray with 2 replicas over a tiny model,
driven by the official `openai` client. Every greedy answer equals the single-process engine's for
that adapter; errors keep their single-process shape; load/unload reach every replica; a killed
replica never yields a wrong answer. Ray and Serve start once for the module (ray.init takes seconds)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import socket
import time

import httpx
import pytest
from conftest import save_tiny, save_tiny_tokenizer

ray = pytest.importorskip("ray", reason="Ray Serve is the optional extra adapterkit[ray]")

from adapterkit import LoraConfig, create_adapter, load_base  # noqa: E402
from adapterkit.serve.api import ApiSettings, create_app  # noqa: E402
from adapterkit.serve.engine import Engine, EngineConfig  # noqa: E402
from adapterkit.store import AdapterStore  # noqa: E402

KEY = "sk-test"
N_ADAPTERS = 16
PROMPTS = ["w1 w2 w3", "w5 w6 w7 w8", "w9 w3", "w11 w12 w13 w2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from adapterkit.serve import ray_app

    tmp = tmp_path_factory.mktemp("ray")
    path = save_tiny("llama", tmp / "base")
    save_tiny_tokenizer(path)
    base = load_base(str(path))
    store = AdapterStore(tmp / "store")
    for i in range(N_ADAPTERS):
        store.put(create_adapter(f"a{i}", base.model, LoraConfig(r=2, init="nonzero", init_std=0.5), seed=i,
                                 fingerprint=base.fingerprint, base_name=base.name))
    extra = tmp / "dirs"
    create_adapter("late", base.model, LoraConfig(r=2, init="nonzero", init_std=0.5), seed=99,
                   fingerprint=base.fingerprint, base_name=base.name).save(extra / "late")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    settings = ray_app.RaySettings(base=str(path), replicas=2, store=str(store.root), adapter_dirs=(str(extra),),
                                   engine={"max_batch": 8}, max_loaded_adapters=8, api_key=KEY, replica_cpus=0.5,
                                   threads=1)
    port = free_port()
    try:
        url = ray_app.start(settings, port=port, num_cpus=2, timeout_s=240)
        # the single-process reference: the same base, store and folders in this process
        engine = Engine.build(str(path), store=store, adapter_dirs=[str(extra)],
                              config=EngineConfig(max_batch=8)).start()
        yield url, engine, store, extra
        engine.stop(drain=False)
    finally:
        ray_app.stop()
        ray.shutdown()


def client(url, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key or "none", max_retries=0, timeout=60)


def single(engine, body, path="/v1/completions"):
    """The single-process server's answer to the same body."""
    async def go():
        app = create_app(engine, ApiSettings(api_key=KEY))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return await c.post(path, json=body, headers={"Authorization": f"Bearer {KEY}"})
    return asyncio.run(go())


def test_completions_chat_and_streams_equal_the_single_process_engine(world):
    """Over all 16 adapters, so that both replicas answer each kind (x-adapterkit-replica)."""
    url, engine, *_ = world
    c = client(url)
    replicas = {"completion": set(), "chat": set(), "stream": set()}
    for i in range(N_ADAPTERS):
        model, prompt = f"a{i}", PROMPTS[i % len(PROMPTS)]
        raw = c.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
        got = raw.parse()
        replicas["completion"].add(raw.headers["x-adapterkit-replica"])
        want = single(engine, {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0}).json()
        assert got.choices[0].text == want["choices"][0]["text"]
        messages = [{"role": "user", "content": prompt}]
        raw = c.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=5, temperature=0)
        replicas["chat"].add(raw.headers["x-adapterkit-replica"])
        want = single(engine, {"model": model, "messages": messages, "max_tokens": 5, "temperature": 0},
                      "/v1/chat/completions").json()
        assert raw.parse().choices[0].message.content == want["choices"][0]["message"]["content"]
        raw = c.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                                     stream=True)
        replicas["stream"].add(raw.headers["x-adapterkit-replica"])
        streamed = "".join(ch.choices[0].text for ch in raw.parse() if ch.choices)
        assert streamed == got.choices[0].text
    assert all(len(r) == 2 for r in replicas.values()), replicas
    reports = httpx.get(f"{url}/health", timeout=30).json()
    assert reports["status"] == "ok" and reports["replicas_live"] == 2, reports


def test_errors_keep_their_single_process_shape(world):
    url, engine, *_ = world
    body = {"model": "nope", "prompt": "w1", "max_tokens": 2}
    r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    want = single(engine, body)
    assert r.status_code == want.status_code == 404 and r.json() == want.json()
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)                  # no key
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/metrics", timeout=30)
    assert r.status_code == 401
    r = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200 and 'replica="' in r.text


def models_on_each_replica(url, h):
    """{replica: the model ids it lists}: /v1/models names no adapter, so any replica answers it; ask
    until both have (replica ids from the x-adapterkit-replica header)."""
    seen = {}
    for _ in range(60):
        r = httpx.get(f"{url}/v1/models", headers=h, timeout=60)
        assert r.status_code == 200, r.text
        seen[r.headers["x-adapterkit-replica"]] = {m["id"] for m in r.json()["data"]}
        if len(seen) == 2:
            return seen
    pytest.fail(f"only replicas {sorted(seen)} answered /v1/models")


def test_load_and_unload_reach_every_replica(world):
    url, engine, store, extra = world
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "late2", "lora_path": str(extra / "late")},
                   headers=h, timeout=60)
    assert r.status_code == 200, r.text
    assert all("late2" in ids for ids in models_on_each_replica(url, h).values())
    engine.cache.load("late2", str(extra / "late"))
    body = {"model": "late2", "prompt": "w1 w2", "max_tokens": 4, "temperature": 0}
    want = single(engine, body).json()["choices"][0]["text"]
    r = httpx.post(f"{url}/v1/completions", json=body, headers=h, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "late2"}, headers=h, timeout=60)
    assert r.status_code == 200, r.text
    assert all("late2" not in ids for ids in models_on_each_replica(url, h).values())
    with cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=body, headers=h, timeout=60), range(8)))
    assert all(g.status_code == 404 for g in got), [g.text for g in got]


def test_concurrent_requests_over_many_adapters_are_all_right(world):
    """...and each adapter's burst of requests is answered by one replica (consistent hashing, the default
    routing, places an adapter before any replica has served it), the 16 adapters spread over both."""
    url, engine, *_ = world
    h = {"Authorization": f"Bearer {KEY}"}
    bodies = [{"model": f"a{i % N_ADAPTERS}", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 4, "temperature": 0}
              for i in range(200)]
    want = {(b["model"], b["prompt"]): single(engine, b).json()["choices"][0]["text"]
            for b in bodies[:N_ADAPTERS * len(PROMPTS)]}

    async def go():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*[c.post(f"{url}/v1/completions", json=b, headers=h) for b in bodies])
    got = asyncio.run(go())
    wrong = [(b, g.text) for b, g in zip(bodies, got)
             if g.status_code != 200 or g.json()["choices"][0]["text"] != want[b["model"], b["prompt"]]]
    assert not wrong, wrong[:3]
    served: dict[str, set[str]] = {}
    for b, g in zip(bodies, got):
        served.setdefault(b["model"], set()).add(g.headers["x-adapterkit-replica"])
    assert all(len(r) == 1 for r in served.values()), served
    assert len(set().union(*served.values())) == 2, served


def test_load_unload_churn_during_concurrent_requests_breaks_nothing(world):
    """While 120 requests run over the stored adapters, four extra names are loaded and unloaded
    again and again; requests naming them get the right answer or a 404, never another adapter's."""
    url, engine, store, extra = world
    h = {"Authorization": f"Bearer {KEY}"}
    engine.cache.load("churn-ref", str(extra / "late"))
    late = single(engine, {"model": "churn-ref", "prompt": "w1 w2", "max_tokens": 4, "temperature": 0}).json()
    late_text = late["choices"][0]["text"]
    bodies = [{"model": f"a{i % N_ADAPTERS}", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 4, "temperature": 0}
              for i in range(120)]
    want = {(b["model"], b["prompt"]): single(engine, b).json()["choices"][0]["text"] for b in bodies[:64]}

    async def go():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as c:
            async def churn():
                results = []
                for k in range(12):
                    name = f"c{k % 4}"
                    results.append(await c.post(f"{url}/v1/load_lora_adapter", headers=h,
                                                json={"lora_name": name, "lora_path": str(extra / "late")}))
                    results.append(await c.post(f"{url}/v1/completions", headers=h,
                                                json={"model": name, "prompt": "w1 w2", "max_tokens": 4,
                                                      "temperature": 0}))
                    results.append(await c.post(f"{url}/v1/unload_lora_adapter", headers=h, json={"lora_name": name}))
                return results
            work = asyncio.gather(*[c.post(f"{url}/v1/completions", json=b, headers=h) for b in bodies])
            return await asyncio.gather(work, churn())
    got, churned = asyncio.run(go())
    wrong = [(b, g.text) for b, g in zip(bodies, got)
             if g.status_code != 200 or g.json()["choices"][0]["text"] != want[b["model"], b["prompt"]]]
    assert not wrong, wrong[:3]
    for r in churned:
        assert r.status_code in (200, 404), r.text
        if r.status_code == 200 and "choices" in r.json():
            assert r.json()["choices"][0]["text"] == late_text
    assert all(r.status_code == 200 for r in churned[::3])                 # every load succeeded


def test_an_adapter_replaced_in_the_store_is_never_served_stale(world):
    url, engine, store, extra = world
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "a5", "prompt": "w1 w2 w3", "max_tokens": 6, "temperature": 0}
    before = httpx.post(f"{url}/v1/completions", json=body, headers=h, timeout=60).json()["choices"][0]["text"]
    base = engine.runtime
    store.put(create_adapter("a5", base.model, LoraConfig(r=2, init="nonzero", init_std=0.5), seed=1234,
                             fingerprint=base.fingerprint, base_name=base.base_name), overwrite=True)
    want = single(engine, body).json()["choices"][0]["text"]
    assert want != before                                                   # the replacement answers otherwise
    with cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=body, headers=h, timeout=60), range(12)))
    assert all(g.status_code == 200 and g.json()["choices"][0]["text"] == want for g in got), [g.text for g in got]


def test_a_killed_replica_gives_no_wrong_answer_and_the_app_recovers(world):
    from ray import serve

    url, engine, *_ = world
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "a3", "prompt": "w1 w2 w3", "max_tokens": 4, "temperature": 0}
    want = single(engine, body).json()["choices"][0]["text"]
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "replica" in a["name"]
                and "ingress" not in a["name"]]
    assert replicas, ray.util.list_named_actors(all_namespaces=True)
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])

    async def go():
        async with httpx.AsyncClient(timeout=120) as c:
            tasks = [asyncio.create_task(c.post(f"{url}/v1/completions", json=body, headers=h)) for _ in range(20)]
            await asyncio.sleep(0.05)
            ray.kill(victim)
            return await asyncio.gather(*tasks)
    for g in asyncio.run(go()):
        assert g.status_code in (200, 503), g.text
        if g.status_code == 200:
            assert g.json()["choices"][0]["text"] == want
        else:
            assert g.json()["error"]["type"]
    deadline = time.time() + 180
    while time.time() < deadline:                 # Serve starts a new replica; /health sees two live again
        health = httpx.get(f"{url}/health", timeout=30).json()
        if health["replicas_live"] == 2 and str(serve.status().applications["adapterkit"].deployments["replica"]
                                                .status).endswith("HEALTHY"):
            break
        time.sleep(1)
    else:
        pytest.fail(f"the application did not recover within 180 s: {health}")
    unreachable = [r for r in health["replicas"] if r["status"] == "unreachable"]
    assert len(unreachable) <= 1                                         # the killed one, until forgotten
    for _ in range(4):
        r = httpx.post(f"{url}/v1/completions", json=body, headers=h, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want


def test_the_single_process_server_imports_nothing_of_ray():
    import subprocess
    import sys

    code = ("import sys, adapterkit.cli.main, adapterkit.serve.server, adapterkit.serve.api; "
            "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')); print(bad); "
            "sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_cli_knows_every_routing_of_the_app():
    from adapterkit.cli.serve_ray import ROUTINGS
    from adapterkit.serve import ray_app

    assert ROUTINGS == ray_app.ROUTINGS
    assert ray_app._route_options("hash", "a1") == {"session_id": "a1"}
    assert ray_app._route_options("multiplex", "a1") == {"multiplexed_model_id": "a1"}
    assert ray_app._route_options("any", "a1") == ray_app._route_options("hash", "auto") == {}


def test_ray_routing_is_checked(tmp_path):
    from typer.testing import CliRunner

    from adapterkit.cli.main import app

    res = CliRunner().invoke(app, ["serve", "--ray-routing", "multiplex", "--store", str(tmp_path)])
    assert res.exit_code == 2 and "--ray-routing chooses among the replicas of --replicas N; give --replicas too" \
        in res.output
    res = CliRunner().invoke(app, ["serve", "--replicas", "2", "--ray-routing", "sticky", "--store", str(tmp_path)])
    assert res.exit_code == 2 and "--ray-routing must be one of hash, multiplex, any, got 'sticky'" in res.output


def test_ray_address_without_replicas_is_refused(tmp_path):
    from typer.testing import CliRunner

    from adapterkit.cli.main import app

    res = CliRunner().invoke(app, ["serve", "--ray-address", "auto", "--store", str(tmp_path)])
    assert res.exit_code == 2 and "--ray-address joins a Ray cluster for --replicas N; give --replicas too" in res.output
