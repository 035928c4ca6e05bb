"""200 concurrent requests over random adapters through the HTTP API while other clients load and
unload adapters: no 5xx, and every answer is the one its adapter gives alone (greedy tokens equal a
single-adapter reference run), so no request is ever served by the wrong adapter or the base."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from conftest import ATTN, save_tiny, save_tiny_tokenizer

from adapterkit import AdapterRuntime, LoraConfig, create_adapter, load_base
from adapterkit.serve.api import create_app
from adapterkit.serve.engine import Engine, EngineConfig

STABLE = [f"s{i}" for i in range(5)]          # served from the root for the whole test
DYNAMIC = [f"d{i}" for i in range(3)]         # loaded and unloaded by path while requests run
PROMPTS = ["the cat", "a dog is on the mat", "cat and cat and dog", "one"]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api-conc")
    base_dir = save_tiny("llama", tmp / "tiny-llm")
    save_tiny_tokenizer(base_dir)
    base = load_base(str(base_dir))
    root = tmp / "adapters"
    cfg = LoraConfig(r=4, target_modules=ATTN, init="nonzero", init_std=0.5)
    for i, name in enumerate(STABLE + DYNAMIC):
        folder = root / ("extra" if name in DYNAMIC else "") / name
        create_adapter(name, base.model, cfg, seed=i, fingerprint=base.fingerprint, base_name="tiny").save(folder)
    return base, base_dir, root


def references(base, root) -> dict[tuple[str | None, str], list[int]]:
    """Greedy tokens of each (adapter, prompt) with that adapter alone on a plain runtime (HF generate)."""
    from adapterkit import Adapter, generate

    rt = AdapterRuntime.from_base(base, capacity=len(STABLE) + len(DYNAMIC))
    for name in STABLE + DYNAMIC:
        rt.add(Adapter.load(root / ("extra" if name in DYNAMIC else "") / name))
    out = {}
    for name in [None, *STABLE, *DYNAMIC]:
        for p in PROMPTS:
            g = generate(rt, base.tokenizer, [p], [name], max_new_tokens=MAX_TOKENS)[0]
            out[(name, p)] = g.token_ids
    return out


def test_200_requests_with_concurrent_load_and_unload(world):
    base, base_dir, root = world
    want = references(base, root)
    assert len({tuple(want[(n, PROMPTS[1])]) for n in [None, *STABLE, *DYNAMIC]}) > 6   # adapters differ
    engine = Engine.build(str(base_dir), adapter_dirs=[root], config=EngineConfig(max_batch=16, max_queue=256),
                          max_loaded_adapters=4, ram_cache_mb=1)   # fewer slots than adapters: evictions
    engine.start()
    app = create_app(engine)
    rng = random.Random(0)
    results, statuses, loads = [], [], []

    async def one(client, i):
        model = rng.choice([engine.base_name, *STABLE, *DYNAMIC])
        prompt = rng.choice(PROMPTS)
        await asyncio.sleep(rng.random() * 2.0)
        stream = i % 4 == 0
        body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
        r = await client.post("/v1/completions", json=body)
        statuses.append(r.status_code)
        if r.status_code == 200:
            text = r.text if stream else r.json()["choices"][0]["text"]
            results.append((None if model == engine.base_name else model, prompt, text, stream))
        else:
            assert r.status_code == 404 and model in DYNAMIC, (model, r.status_code, r.text)

    async def churn(client):
        for k in range(12):
            name = DYNAMIC[k % len(DYNAMIC)]
            r = await client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": f"extra/{name}"})
            loads.append(r.status_code)
            await asyncio.sleep(0.1)
            r = await client.post("/v1/unload_lora_adapter", json={"lora_name": name})
            loads.append(r.status_code)
            await asyncio.sleep(0.05)
            r = await client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": f"extra/{name}"})
            loads.append(r.status_code)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", timeout=120) as c:
            await asyncio.gather(churn(c), *(one(c, i) for i in range(200)))

    try:
        asyncio.run(main())
    finally:
        engine.stop(drain=False)
    assert len(statuses) == 200 and max(statuses) < 500, sorted(set(statuses))
    assert set(loads) == {200}, loads
    assert len(results) > 150
    tok = base.tokenizer
    for name, prompt, text, stream in results:
        expected = tok.decode(want[(name, prompt)], skip_special_tokens=True)
        if stream:
            import json as _json

            chunks = [_json.loads(b[6:]) for b in text.split("\n\n") if b.startswith("data: {")]
            text = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
        assert text == expected, (name, prompt)
