"""The HTTP API under bad input: sampling parameters refused at the edge, a 500 that keeps the
keep-alive connection usable, reserved and router names refused as adapter names, routers listed
once and readable, overlong paths, server paths never shown to clients, adapter names shown only
to authenticated callers, and /openapi.json."""

from __future__ import annotations

import http.client
import json
import threading
import time
from types import SimpleNamespace

import pytest
import uvicorn
from conftest import ATTN, save_tiny, save_tiny_tokenizer
from test_api import call, error_of, post

from adapterkit import LoraConfig, create_adapter, load_base
from adapterkit.serve.api import ApiSettings, create_app
from adapterkit.serve.engine import Engine, EngineConfig
from adapterkit.serve.server import bind
from adapterkit.store import AdapterStore

PROMPT = "hello world the cat"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robust")
    base_dir = save_tiny("llama", tmp / "tiny-llm")
    save_tiny_tokenizer(base_dir)
    base = load_base(str(base_dir))
    root = tmp / "adapters"
    for i, name in enumerate(["alpha", "beta", "auto", "rtr"]):      # "auto" and "rtr" are not adapter names
        create_adapter(name, base.model, LoraConfig(r=4, target_modules=ATTN, init="nonzero"), seed=i,
                       fingerprint=base.fingerprint).save(root / name)
    (root / "extra" / "broken").mkdir(parents=True)
    (root / "extra" / "broken" / "adapter_config.json").write_text("{not json")
    store = AdapterStore(tmp / "store")
    (store.root / "routers" / "rtr").mkdir(parents=True)             # a router's files (never run here)
    (store.root / "routers" / "rtr" / "router.json").write_text(json.dumps({"type": "adapterkit.router.x"}))
    engine = Engine.build(str(base_dir), store=store, adapter_dirs=[root],
                          config=EngineConfig(max_batch=8, max_queue=32), max_loaded_adapters=2)
    engine.start()
    yield SimpleNamespace(engine=engine, app=create_app(engine), root=root, tmp=tmp, store=store,
                          name=engine.base_name)
    engine.stop(drain=False)


def complete(world, app=None, **body):
    return post(world, "/v1/completions", {"model": "alpha", "prompt": PROMPT, "max_tokens": 3, **body}, app=app)


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-5])
def test_tiny_temperatures_are_refused_at_the_edge(world, temperature):
    err = error_of(complete(world, temperature=temperature), 400)
    assert err["param"] == "temperature"
    assert err["message"] == f"temperature must be 0 (greedy) or at least 0.0001, got {temperature!r}"
    assert complete(world, temperature=1e-4, seed=1).status_code == 200


def test_reserved_and_router_names_are_not_adapter_names(world):
    ids = [m["id"] for m in call(world.app, "GET", "/v1/models").json()["data"]]
    assert ids == [world.name, "alpha", "beta", "rtr"]              # each id once; the 'auto' folder is not served
    assert "'auto' is reserved for the default router" in world.engine.cache.roots.skipped["auto"]
    card = call(world.app, "GET", "/v1/models/rtr")
    assert card.status_code == 200 and card.json()["id"] == "rtr" and card.json()["parent"] == world.name
    for name, why in [("auto", "'auto' is reserved for the default router"), ("rtr", "'rtr' is a router's name")]:
        err = error_of(post(world, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": "alpha"}), 400)
        assert err["param"] == "lora_name" and err["code"] == "invalid_adapter_name"
        assert err["message"] == f"{why}; routers and adapters share one model namespace: choose another adapter name"
    assert [m["id"] for m in call(world.app, "GET", "/v1/models").json()["data"]] == ids


def test_an_overlong_path_is_a_400_that_names_no_server_path(world):
    for path in ["x" * 300, "a/" + "y" * 5000, str(world.root / ("z" * 300))]:
        err = error_of(post(world, "/v1/load_lora_adapter", {"lora_name": "long", "lora_path": path}), 400)
        assert err["param"] == "lora_path" and err["code"] == "adapter_path_not_allowed", err
        assert str(world.tmp) not in err["message"]
    err = error_of(post(world, "/v1/load_lora_adapter", {"lora_name": "long", "lora_path": "x" * 300}), 400)
    assert err["message"].startswith("adapter path 'xxxxxxxx") and "File name too long" in err["message"]


def test_error_texts_show_no_server_paths(world):
    err = error_of(post(world, "/v1/load_lora_adapter", {"lora_name": "b2", "lora_path": "extra/broken"}), 400)
    assert err["code"] == "invalid_adapter" and str(world.tmp) not in err["message"]
    assert "<adapters:1>/extra/broken/adapter_config.json is not valid JSON" in err["message"], err
    err = error_of(post(world, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}), 400)
    assert err["message"] == "adapter path '.../etc' is outside the adapter roots (<store>/adapters, <adapters:1>)"


def test_adapter_names_are_shown_only_to_authenticated_callers(world):
    app = create_app(world.engine, ApiSettings(api_key="k3y"))
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for method, url, body in [("POST", "/v1/completions", {"model": "nope", "prompt": PROMPT}),
                                  ("GET", "/v1/models/nope", None), ("GET", "/v1/models", None)]:
            r = call(app, method, url, json=body, headers=headers)
            assert r.status_code == 401 and "alpha" not in r.text, r.text
    err = error_of(post(world, "/v1/completions", {"model": "nope", "prompt": PROMPT}, app=app,
                        headers={"Authorization": "Bearer k3y"}), 404)
    assert "served adapters: alpha, beta" in err["message"]
    assert call(app, "GET", "/openapi.json").status_code == 200       # open, like /health


def test_openapi_schema_declares_every_route_and_body(world):
    schema = call(world.app, "GET", "/openapi.json").json()
    assert set(schema["paths"]) == {"/health", "/metrics", "/v1/models", "/v1/models/{model_id}", "/v1/completions",
                                    "/v1/chat/completions", "/v1/classify", "/classify", "/v1/load_lora_adapter",
                                    "/v1/unload_lora_adapter"}
    comps = schema["components"]["schemas"]
    for path, model in [("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest"),
                        ("/v1/classify", "ClassifyRequest"), ("/v1/load_lora_adapter", "LoadAdapterRequest"),
                        ("/v1/unload_lora_adapter", "UnloadAdapterRequest")]:
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        assert model in comps
    assert comps["ChatCompletionRequest"]["properties"]["messages"]["items"] == {"$ref": "#/components/schemas/ChatMessage"}
    assert "temperature" in comps["CompletionRequest"]["properties"]


def test_a_500_keeps_the_keep_alive_connection_usable(world, monkeypatch):
    app = create_app(world.engine)
    calls = {"n": 0}

    def broken():
        calls["n"] += 1
        raise RuntimeError("/secret/path went wrong")
    monkeypatch.setattr(app.state.service, "list_models", broken)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="critical", timeout_keep_alive=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        conn = http.client.HTTPConnection("127.0.0.1", sock.getsockname()[1], timeout=10)
        for _ in range(3):                                 # one connection: a 500, then more requests on it
            conn.request("GET", "/v1/models")
            r = conn.getresponse()
            body = json.loads(r.read())
            assert r.status == 500 and r.getheader("connection") != "close"
            assert body == {"error": {"message": "internal server error (RuntimeError); the server log has the details",
                                      "type": "server_error", "param": None, "code": None}}
            conn.request("GET", "/health")
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"
        assert calls["n"] == 3
        conn.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
