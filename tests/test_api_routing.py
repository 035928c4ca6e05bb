"""`model="auto"` / `model="<router>"` through the HTTP API: the server asks the store's retrieval
router, serves the request with the chosen adapter(s), says which in the JSON and a header, and
counts the decisions in /metrics."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
from conftest import save_tiny, save_tiny_tokenizer

from adapterkit import LoraConfig, create_adapter, load_base
from adapterkit.route import Encoder, load_router
from adapterkit.route.api import fit_router
from adapterkit.serve.api import create_app
from adapterkit.serve.engine import Engine, EngineConfig
from adapterkit.store import AdapterStore

VOCAB = {"ad-a": [f"w{i}" for i in range(0, 20)], "ad-b": [f"w{i}" for i in range(20, 40)]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api-route")
    path, base, store, _ = private_world(tmp)
    r = random.Random(1)
    rows = [{"text": " ".join(r.choice(VOCAB[a]) for _ in range(r.randint(5, 10))), "adapter": a}
            for a in VOCAB for _ in range(30)]
    examples = tmp / "train.jsonl"
    examples.write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    fit_router(store, list(VOCAB), "r1", examples_file=examples, base=str(path), encoder="base",
               make_default=True)
    engine = Engine.build(str(path), store=store, config=EngineConfig(max_batch=8)).start()
    yield base, store, engine, create_app(engine)
    engine.stop(drain=False)


def post(app, body):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return await c.post("/v1/completions", json=body)
    return asyncio.run(go())


def get(app, url):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return await c.get(url)
    return asyncio.run(go())


def sse_chunks(text):
    """The JSON objects of an SSE body (without the [DONE] marker)."""
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


PROMPTS = ["w1 w2 w3 w4 w5 w6", "w21 w22 w23 w24 w25", "w3 w7 w11 w13 w17", "w30 w31 w35 w38 w39"]


@pytest.mark.parametrize("model", ["auto", "r1"])
def test_auto_serves_what_the_router_decides_and_says_so(world, model):
    base, store, engine, app = world
    router = load_router(store, "r1", encoder=Encoder.from_base(base))
    for prompt in PROMPTS:
        want = router.route([prompt])[0]
        r = post(app, {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        got = r.json()["adapterkit"]
        assert got["router"] == model and got["adapters"] == pytest.approx(want.adapters)
        assert got["fallback"] == want.fallback and got["reason"] == want.reason
        served = want.top or engine.base_name
        assert r.headers["x-adapterkit-adapters"] == (f"{served}=1" if want.top else "base")
        direct = post(app, {"model": served, "prompt": prompt, "max_tokens": 6, "temperature": 0})
        assert r.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"]
        assert "adapterkit" not in direct.json() and "x-adapterkit-adapters" not in direct.headers
    tops = {router.route([p])[0].top for p in PROMPTS}
    assert tops == {"ad-a", "ad-b"}                # the prompts really go to different adapters


def test_streaming_auto_has_the_header_and_metrics_count_decisions(world):
    base, store, engine, app = world
    r = post(app, {"model": "auto", "prompt": PROMPTS[1], "max_tokens": 4, "temperature": 0, "stream": True})
    assert r.status_code == 200 and r.headers["x-adapterkit-adapters"] == "ad-b=1"
    assert r.text.endswith("data: [DONE]\n\n")
    chunks = sse_chunks(r.text)
    [finish] = [c for c in chunks if c["choices"][0]["finish_reason"]]
    assert finish["adapterkit"]["adapters"] == {"ad-b": 1.0} and finish["adapterkit"]["router"] == "auto"
    assert all("adapterkit" not in c for c in chunks if c is not finish)
    text = get(app, "/metrics").text
    line = [x for x in text.splitlines() if x.startswith('adapterkit_routing_decisions_total{router="auto",'
                                                       'adapter="ad-b",fallback="false"}')]
    assert line and float(line[0].split()[-1]) >= 1


def test_models_list_the_routers(world):
    *_, app = world
    ids = [m["id"] for m in get(app, "/v1/models").json()["data"]]
    assert ids[-2:] == ["auto", "r1"] and {"ad-a", "ad-b"} <= set(ids)


def test_empty_prompt_for_auto_is_400(world):
    *_, app = world
    r = post(app, {"model": "auto", "prompt": "   ", "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "empty" in r.json()["error"]["message"]


def private_world(tmp_path):
    """A tiny base, a store of the two adapters and a JSONL of examples, for tests that change them."""
    path = save_tiny("llama", tmp_path / "base")
    save_tiny_tokenizer(path)
    base = load_base(str(path))
    store = AdapterStore(tmp_path / "store")
    for i, name in enumerate(VOCAB):
        store.put(create_adapter(name, base.model, LoraConfig(r=2, init="nonzero", init_std=0.5), seed=i,
                                 fingerprint=base.fingerprint, base_name=base.name))
    rows = [{"text": " ".join(VOCAB[a][j % 20] for j in range(k, k + 6)), "adapter": a} for a in VOCAB for k in range(20)]
    (tmp_path / "ex.jsonl").write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    return path, base, store, tmp_path / "ex.jsonl"


def test_an_adapter_replaced_while_serving_is_never_routed_to(tmp_path):
    path, base, store, examples = private_world(tmp_path)
    fit_router(store, list(VOCAB), "r1", examples_file=examples, base=str(path), encoder="base", make_default=True)
    engine = Engine.build(str(path), store=store, config=EngineConfig(max_batch=4)).start()
    app = create_app(engine)
    try:
        prompt = next(p for p in PROMPTS if load_router(store, "r1", encoder=Encoder.from_base(base))
                      .route([p])[0].top == "ad-b")
        first = post(app, {"model": "auto", "prompt": prompt, "max_tokens": 3, "temperature": 0}).json()
        assert first["adapterkit"]["adapters"] == {"ad-b": 1.0}
        store.put(create_adapter("ad-b", base.model, LoraConfig(r=2, init="nonzero", init_std=0.5), seed=9,
                                 fingerprint=base.fingerprint, base_name=base.name), overwrite=True)
        again = post(app, {"model": "auto", "prompt": prompt, "max_tokens": 3, "temperature": 0})
    finally:
        engine.stop(drain=False)
    got = again.json()["adapterkit"]
    assert again.status_code == 200 and got["fallback"] is True and got["adapters"] == {}
    assert "adapter 'ad-b' was replaced in the store" in got["reason"]
    assert again.headers["x-adapterkit-adapters"] == "base"


def test_a_linear_router_is_served_like_a_retrieval_router(tmp_path):
    """model="<linear router>" and model="auto" with it as default: the server's decision is the
    router's own, the answer is the chosen adapter's, and /v1/models/<router> describes it."""
    path, base, store, examples = private_world(tmp_path)
    fit_router(store, list(VOCAB), "lin", kind="linear", examples_file=examples, base=str(path), encoder="base",
               make_default=True)
    router = load_router(store, "lin", encoder=Encoder.from_base(base))
    engine = Engine.build(str(path), store=store, config=EngineConfig(max_batch=4)).start()
    app = create_app(engine)
    try:
        for model in ("lin", "auto"):
            for prompt in PROMPTS:
                want = router.route([prompt])[0]
                r = post(app, {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0})
                assert r.status_code == 200, r.text
                got = r.json()["adapterkit"]
                assert got["adapters"] == pytest.approx(want.adapters) and got["reason"] == want.reason
                served = want.top or engine.base_name
                direct = post(app, {"model": served, "prompt": prompt, "max_tokens": 4, "temperature": 0})
                assert r.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"]
        card = get(app, "/v1/models/lin").json()
    finally:
        engine.stop(drain=False)
    assert {router.route([p])[0].top for p in PROMPTS} == {"ad-a", "ad-b"}
    assert card["id"] == "lin" and "linear" in json.dumps(card)


def test_auto_without_a_default_router_is_404(tmp_path):
    path = save_tiny("llama", tmp_path / "base")
    save_tiny_tokenizer(path)
    engine = Engine.build(str(path), store=AdapterStore(tmp_path / "store"))
    r = post(create_app(engine), {"model": "auto", "prompt": "w1 w2", "max_tokens": 4})
    err = r.json()["error"]
    assert r.status_code == 404 and err["param"] == "model"
    assert err["message"].startswith("no default router in the store at ")


def test_a_gate_router_is_served_per_token_and_reports_what_it_did(tmp_path):
    """model="<gate>": the engine runs the gate per token; the JSON and the header give each adapter's
    share of gate weight (equal to the engine's own gated request); a stream's header names the gate."""
    from adapterkit.route import GateRouter
    from adapterkit.serve.api.routing import header_value
    from adapterkit.serve.requests import GenerationRequest, SamplingParams

    path, base, store, examples = private_world(tmp_path)
    gate = fit_router(store, list(VOCAB), "g1", kind="gate", examples_file=examples, base=str(path), steps=5)
    assert isinstance(gate, GateRouter)
    engine = Engine.build(str(path), store=store, config=EngineConfig(max_batch=4)).start()
    app = create_app(engine)
    try:
        r = post(app, {"model": "g1", "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0})
        ids = list(base.tokenizer(PROMPTS[0])["input_ids"])
        direct = engine.submit(GenerationRequest(ids, gate=load_router(store, "g1"),
                                                 params=SamplingParams(max_tokens=5, temperature=0.0)))
        direct.result(timeout=30)
        s = post(app, {"model": "g1", "prompt": PROMPTS[1], "max_tokens": 3, "temperature": 0, "stream": True})
        empty = post(app, {"model": "g1", "prompt": "  ", "max_tokens": 3})
        metrics = get(app, "/metrics").text
        models = [m["id"] for m in get(app, "/v1/models").json()["data"]]
    finally:
        engine.stop(drain=False)
    assert r.status_code == 200, r.text
    body = r.json()
    got = body["adapterkit"]
    assert got["gate"] is True and got["router"] == "g1" and got["fallback"] is False
    assert got["adapters"] == direct.adapter_usage and sum(got["adapters"].values()) == pytest.approx(1.0, abs=1e-5)
    assert body["choices"][0]["text"] == direct.text
    assert r.headers["x-adapterkit-adapters"] == header_value(got["adapters"])
    assert got["reason"].startswith("per-token gate 'g1' (top-1 of 2 adapters at each of 2 layers)")
    assert s.status_code == 200 and s.headers["x-adapterkit-adapters"] == "gate:g1(ad-a,ad-b)"
    assert s.text.endswith("data: [DONE]\n\n")
    [finish] = [c for c in sse_chunks(s.text) if c["choices"] and c["choices"][0]["finish_reason"]]
    shares = finish["adapterkit"]["adapters"]
    assert finish["adapterkit"]["gate"] is True and set(shares) <= {"ad-a", "ad-b"}
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-5)
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "prompt"
    top = max(got["adapters"], key=got["adapters"].get)
    assert f'adapterkit_routing_decisions_total{{router="g1",adapter="{top}",fallback="false"}} 1' in metrics
    assert 'adapterkit_routing_decisions_total{router="g1",adapter="(per-token)",fallback="false"} 1' in metrics
    assert "g1" in models
