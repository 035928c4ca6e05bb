"""Routers over adapters of mixed families (issue 13 §5): the learned per-token gate mixes a LoRA, an
IA3, a bottleneck and a sparse adapter, and a ScaLearn composition of two of them (issue 15), exactly as
the runtime's weighted batches do, and the server's retrieval router serves whatever family it picks,
equal to asking for that adapter by name."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
import torch
from conftest import input_ids, save_tiny, save_tiny_tokenizer

from adapterkit import AdapterRuntime, BottleneckConfig, Ia3Config, LoraConfig, SparseConfig, create_adapter, load_base
from adapterkit.route import Encoder, GateRouter, load_router
from adapterkit.route.api import fit_router
from adapterkit.serve.api import create_app
from adapterkit.serve.engine import Engine, EngineConfig
from adapterkit.store import AdapterStore

CONFIGS = {"lora": LoraConfig(r=2, init="nonzero", init_std=0.5),
           "ia3": Ia3Config.for_model("llama", init="nonzero", init_std=0.5),
           "bottleneck": BottleneckConfig.for_model("llama", "pfeiffer", init="nonzero", init_std=0.5),
           "sparse": SparseConfig(init="random", init_density=0.2, init_std=0.3)}


@pytest.fixture
def lm(tmp_path):
    path = save_tiny("llama", tmp_path / "lm")
    save_tiny_tokenizer(path)
    return path, load_base(str(path))


def adapters(base):
    """One adapter per family, then a ScaLearn composition of the LoRA and IA3 ones (at the sites they share)."""
    from adapterkit.train.compose import compose

    ads = [create_adapter(name, base.model, cfg, seed=i + 1, fingerprint=base.fingerprint, base_name=base.name)
           for i, (name, cfg) in enumerate(CONFIGS.items())]
    comp = compose("scalearn", base, ads[:2], seed=9, init_std=0.5)
    return ads + [comp]


def test_the_gate_over_mixed_families_equals_the_weighted_batch(lm):
    _, base = lm
    rt = AdapterRuntime.from_base(base)
    ads = adapters(base)
    for a in ads:
        rt.add(a)
    ids = input_ids(3, 7)
    names = [a.name for a in ads]
    with torch.no_grad():
        bare = rt.model(ids).logits
        for j, name in enumerate(names):                   # forced one-hot at every layer: that adapter alone
            gate = GateRouter.create("gate", rt, ads, top_k=1)
            gate.weight.zero_()
            gate.bias.fill_(-5.0)
            gate.bias[:, j] = 10.0
            with gate.routing(rt):
                got = rt.model(ids).logits
            with rt.batch([name] * 3):
                want = rt.model(ids).logits
            assert (want - bare).abs().max() > 1e-3, name            # each family moves the output
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for pair in [(0, 1), (2, 3), (1, 2), (4, 2)]:        # top-2 of the same bias at every layer
            gate = GateRouter.create("gate", rt, ads, top_k=2)
            gate.weight.zero_()
            gate.bias.fill_(-5.0)
            gate.bias[:, pair[0]], gate.bias[:, pair[1]] = 2.0, 1.0
            w = torch.softmax(torch.tensor([2.0, 1.0]), 0)
            with gate.routing(rt):
                got = rt.model(ids).logits
            with rt.batch([{names[pair[0]]: float(w[0]), names[pair[1]]: float(w[1])}] * 3):
                want = rt.model(ids).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


VOCAB = {"lora": [f"w{i}" for i in range(0, 10)], "ia3": [f"w{i}" for i in range(10, 20)],
         "bottleneck": [f"w{i}" for i in range(20, 30)], "sparse": [f"w{i}" for i in range(30, 40)],
         "scalearn": [f"w{i}" for i in range(40, 50)]}


def post(app, body):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return await c.post("/v1/completions", json=body)
    return asyncio.run(go())


def test_the_server_routes_to_adapters_of_every_family(lm, tmp_path):
    path, base = lm
    store = AdapterStore(tmp_path / "store")
    for a in adapters(base):
        store.put(a)
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(words) for _ in range(6)), "adapter": name}
            for name, words in VOCAB.items() for _ in range(20)]
    (tmp_path / "ex.jsonl").write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    fit_router(store, list(VOCAB), "r1", examples_file=tmp_path / "ex.jsonl", base=str(path), encoder="base",
               make_default=True)
    router = load_router(store, "r1", encoder=Encoder.from_base(base))
    engine = Engine.build(str(path), store=store, config=EngineConfig(max_batch=8)).start()
    app = create_app(engine)
    try:
        served = set()
        for name, words in VOCAB.items():
            prompt = " ".join(words[:6])
            want = router.route([prompt])[0]
            if want.top is None:
                continue
            r = post(app, {"model": "auto", "prompt": prompt, "max_tokens": 5, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["adapterkit"]["adapters"] == pytest.approx(want.adapters)
            direct = post(app, {"model": want.top, "prompt": prompt, "max_tokens": 5, "temperature": 0})
            assert r.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"]
            served.add(want.top)
        assert len(served) >= 3 and "scalearn" in served, served     # several families, the composition too
    finally:
        engine.stop(drain=False)
