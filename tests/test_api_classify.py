"""POST /v1/classify (vLLM's /classify): a classifier adapter's head scores each input inside the
engine, batched with generation requests; probabilities equal the training code's forward (HF
model + runtime + head); `auto` routes each input; errors for the base, adapters without a head, a
damaged head (generation still works), and inputs cut to the training max_length."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from test_api_routing import VOCAB, private_world

from adapterkit import AdapterRuntime, create_adapter, LoraConfig
from adapterkit.core.heads import ClassificationHead
from adapterkit.route.api import fit_router
from adapterkit.serve.api import create_app
from adapterkit.serve.engine import Engine, EngineConfig
from adapterkit.serve.requests import GenerationRequest, SamplingParams
from adapterkit.train.classification import encode_texts, logits

TEXTS = ["w1 w2 w3 w4 w5 w6", "w21 w22 w23 w24", "w3 w7 w11 w13 w17 w5 w9", "w30 w31 w35"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classify")
    path, base, store, examples = private_world(tmp)            # store: ad-a, ad-b (plain LoRAs)
    for i, name in enumerate(VOCAB):                             # give both a head (labels of their own)
        a = store.get(name)
        a.head = ClassificationHead.create([f"{name}-x", f"{name}-y", f"{name}-z"], 32, "last", seed=i)
        with torch.no_grad():
            a.head.weight.mul_(30)                               # confident enough that labels differ
        a.meta.lineage = [{"op": "train", "inputs": [], "params": {"max_length": 5}}]
        store.put(a, overwrite=True)
    store.put(create_adapter("plain", base.model, LoraConfig(r=2, init="nonzero"), fingerprint=base.fingerprint,
                             base_name=base.name))
    fit_router(store, list(VOCAB), "r1", examples_file=examples, base=str(path), encoder="base", make_default=True)
    engine = Engine.build(str(path), store=store, config=EngineConfig(max_batch=8)).start()
    yield base, store, engine, create_app(engine)
    engine.stop(drain=False)


def request(app, url, body):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return await c.post(url, json=body)
    return asyncio.run(go())


def reference(base, store, name, texts, max_length=5):
    """The training code's probabilities: HF forward with the adapter active, then the head."""
    rt = AdapterRuntime(base.model, fingerprint=base.fingerprint)
    a = store.get(name)
    rt.add(a)
    batch = encode_texts(base.tokenizer, texts, max_length)
    with torch.no_grad(), rt.batch([name] * len(texts)):
        probs = logits(base.model, a.head, batch).softmax(-1)
    rt.remove(name)
    return a.head.labels, probs


@pytest.mark.parametrize("url", ["/v1/classify", "/classify"])
def test_classify_equals_the_training_forward(world, url):
    base, store, engine, app = world
    r = request(app, url, {"model": "ad-a", "input": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "ad-a" and body["id"].startswith("classify-")
    labels, want = reference(base, store, "ad-a", TEXTS)
    assert [d["index"] for d in body["data"]] == [0, 1, 2, 3]
    for d, p in zip(body["data"], want):
        assert d["num_classes"] == 3 and d["labels"] == labels
        torch.testing.assert_close(torch.tensor(d["probs"]), p, atol=1e-5, rtol=1e-4)
        assert d["label"] == labels[int(p.argmax())]
    tokens = sum(min(5, len(base.tokenizer(t)["input_ids"])) for t in TEXTS)    # cut at the training max_length
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                             "prompt_tokens_details": None}
    assert len({d["label"] for d in body["data"]}) > 1            # the inputs really get different labels


def test_classify_is_batched_with_generation_and_changes_nothing(world, monkeypatch):
    """Classify and generate requests submitted together run in the same forward; each returns what
    it returns alone."""
    base, store, served, app = world
    alone = request(app, "/v1/classify", {"model": "ad-b", "input": TEXTS[1]}).json()["data"][0]["probs"]
    gen = request(app, "/v1/completions", {"model": "ad-a", "prompt": TEXTS[0], "max_tokens": 8,
                                           "temperature": 0, "ignore_eos": True}).json()["choices"][0]["text"]
    engine = Engine.build(served.runtime.model.name_or_path, store=store, config=EngineConfig(max_batch=8))
    mixes = []
    real = Engine._forward

    def spy(self, batch):
        mixes.append(sorted({s.classifier is not None for s in batch}))
        return real(self, batch)
    monkeypatch.setattr(Engine, "_forward", spy)
    cut = base.tokenizer(TEXTS[1], truncation=True, max_length=5)["input_ids"]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    streams = [engine.submit(GenerationRequest(base.tokenizer(TEXTS[0])["input_ids"], "ad-a", params))
               for _ in range(2)]
    streams += [engine.submit(GenerationRequest(cut, "ad-b", params, classify=True)) for _ in range(2)]
    engine.start()
    try:
        for s in streams:
            s.result(timeout=60)
    finally:
        engine.stop(drain=False)
    assert mixes[0] == [False, True]                              # one forward held both kinds
    for s in streams[:2]:
        assert s.text == gen and s.final.finish_reason == "length"
    for s in streams[2:]:
        assert list(s.classification.probs) == pytest.approx(alone, abs=1e-5)
        assert s.token_ids == [] and s.final.usage.completion_tokens == 0


def test_auto_routes_each_input_to_its_classifier(world):
    base, store, engine, app = world
    r = request(app, "/v1/classify", {"model": "auto", "input": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    routed = body["adapterkit"]
    assert len(routed) == 4 and all(x["router"] == "auto" for x in routed)
    for text, d, x in zip(TEXTS, body["data"], routed):
        top = max(x["adapters"], key=x["adapters"].get)
        assert d["labels"][0].startswith(top)                     # the head of the adapter the router chose
        direct = request(app, "/v1/classify", {"model": top, "input": text}).json()["data"][0]
        assert d["probs"] == pytest.approx(direct["probs"], abs=1e-6)
    assert {max(x["adapters"], key=x["adapters"].get) for x in routed} == {"ad-a", "ad-b"}


def test_classify_errors(world, tmp_path):
    base, store, engine, app = world

    def error(body, status):
        r = request(app, "/v1/classify", body)
        assert r.status_code == status, r.text
        return r.json()["error"]
    e = error({"model": engine.base_name, "input": "w1"}, 400)
    assert e["param"] == "model" and "has no classification head" in e["message"]
    e = error({"model": "plain", "input": "w1"}, 400)
    assert e["param"] == "model" and e["message"].startswith("adapter 'plain' has no classification head")
    e = error({"model": "nope", "input": "w1"}, 404)
    assert e["param"] == "model"
    e = error({"model": "ad-a", "input": []}, 400)
    assert e["param"] == "input" and "non-empty list of strings" in e["message"]
    e = error({"model": "ad-a", "input": ["w1"] * 65}, 400)
    assert "at most 64 inputs per request, got 65" in e["message"]
    e = error({"model": "ad-a", "input": "w1", "truncate_prompt_tokens": 0}, 400)
    assert e["param"] == "truncate_prompt_tokens"
    cut = request(app, "/v1/classify", {"model": "ad-a", "input": TEXTS[2], "truncate_prompt_tokens": 2}).json()
    assert cut["usage"]["prompt_tokens"] == 2


def test_a_damaged_head_fails_classification_only(world):
    base, store, engine, app = world
    a = store.get("ad-b")
    a.name = "broken-head"
    store.put(a)
    head_file = store.path("broken-head") / "task_head.safetensors"
    head_file.write_bytes(head_file.read_bytes()[:30])
    r = request(app, "/v1/classify", {"model": "broken-head", "input": "w1 w2"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_adapter"
    assert r.json()["error"]["param"] == "model"
    assert "its classification head cannot be read" in r.json()["error"]["message"]
    g = request(app, "/v1/completions", {"model": "broken-head", "prompt": "w1 w2", "max_tokens": 3, "temperature": 0})
    assert g.status_code == 200, g.text


def test_generation_is_not_routed_to_classifiers_and_naming_one_says_it_is(world):
    """`auto` generation falls back to the base when the router picks a classifier; naming the
    classifier generates with it, and the answer (JSON and the stream's finish chunk) says so."""
    base, store, engine, app = world
    r = request(app, "/v1/completions", {"model": "auto", "prompt": TEXTS[0], "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    routed = r.json()["adapterkit"]
    assert routed["adapters"] == {} and routed["fallback"] is True
    assert routed["reason"].endswith("'ad-a' is a classifier: text generation goes to the base "
                                     "(POST /v1/classify for a label)")
    assert r.headers["x-adapterkit-adapters"] == "base"
    direct = request(app, "/v1/completions", {"model": "ad-a", "prompt": TEXTS[0], "max_tokens": 4,
                                              "temperature": 0})
    note = direct.json()["adapterkit"]["classifier"]
    assert note["adapter"] == "ad-a" and note["labels"] == ["ad-a-x", "ad-a-y", "ad-a-z"]
    assert "x-adapterkit-adapters" not in direct.headers
    stream = request(app, "/v1/chat/completions", {"model": "ad-a", "stream": True, "max_tokens": 3,
                                                   "messages": [{"role": "user", "content": TEXTS[0]}]})
    chunks = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
    finish = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert finish["adapterkit"]["classifier"]["adapter"] == "ad-a"
    plain = request(app, "/v1/completions", {"model": "plain", "prompt": TEXTS[0], "max_tokens": 2})
    assert "adapterkit" not in plain.json()


def test_an_image_sent_to_a_text_base_is_a_400(world):
    _, _, _, app = world
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}
    r = request(app, "/v1/classify", {"model": "ad-a", "input": ["w1 w2", part]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "input[1]" and err["message"].startswith("input[1] is an image but the base")
    assert "reads text; classify images on a server of an image base" in err["message"]
