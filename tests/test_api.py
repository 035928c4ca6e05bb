"""The OpenAI-compatible HTTP API in-process (httpx over ASGI) on the real Engine over a tiny Llama with
small LoRA adapters: every endpoint, every error (exact status, type, param, code), SSE shapes,
cancellation on client disconnect, the body limit, the API key, /metrics text."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from types import SimpleNamespace

import httpx
import pytest
from conftest import ATTN, save_tiny, save_tiny_tokenizer, tiny_llama

from adapterkit import Adapter, AdapterRuntime, LoraConfig, create_adapter, generate, load_base
from adapterkit.core.base import fingerprint
from adapterkit.serve.api import ApiSettings, create_app
from adapterkit.serve.api import metrics as prom
from adapterkit.serve.engine import Engine, EngineConfig

PROMPT = "hello world the cat"


def lora(model, name, seed, fp, base_name="tiny"):
    return create_adapter(name, model, LoraConfig(r=4, target_modules=ATTN, init="nonzero", init_std=0.5),
                          seed=seed, fingerprint=fp, base_name=base_name)


def world_files(tmp):
    """The tiny base (+ tokenizer) and the adapter folders of `world`: (base folder, Base, root)."""
    base_dir = save_tiny("llama", tmp / "tiny-llm")
    save_tiny_tokenizer(base_dir)
    base = load_base(str(base_dir))
    root = tmp / "adapters"
    for i, name in enumerate(["alpha", "beta"]):
        lora(base.model, name, i, base.fingerprint).save(root / name)
    lora(base.model, "gamma", 2, base.fingerprint).save(root / "extra" / "gamma")
    other = tiny_llama(hidden_size=48)
    lora(other, "wrongbase", 3, fingerprint(other)).save(root / "wrongbase")
    lora(other, "foreign", 4, fingerprint(other)).save(root / "extra" / "foreign")
    shutil.copytree(root / "alpha", root / "extra" / "broken")
    (root / "extra" / "broken" / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    (tmp / "outside").mkdir()
    lora(base.model, "outsider", 5, base.fingerprint).save(tmp / "outside" / "outsider")
    return base_dir, base, root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One running engine for the module. Root `adapters/` serves alpha, beta and wrongbase (made for
    another base shape); `adapters/extra/` holds folders only reachable by load-by-path."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("api")
    base_dir, base, root = world_files(tmp)

    engine = Engine.build(str(base_dir), adapter_dirs=[root], config=EngineConfig(max_batch=8, max_queue=32),
                          max_loaded_adapters=3, ram_cache_mb=16)
    engine.start()
    yield SimpleNamespace(engine=engine, app=create_app(engine), base=base, base_dir=base_dir, root=root, tmp=tmp,
                          name=engine.base_name)
    engine.stop(drain=False)
    torch.set_num_threads(threads)


def run(coro):
    return asyncio.run(coro)


async def _request(app, method, url, **kw) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
        return await c.request(method, url, **kw)


def call(app, method, url, **kw) -> httpx.Response:
    return run(_request(app, method, url, **kw))


def post(world, url, body, app=None, **kw) -> httpx.Response:
    return call(app or world.app, "POST", url, json=body, **kw)


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def complete(world, model="alpha", **extra) -> httpx.Response:
    return post(world, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                           **extra})


def sse_events(resp: httpx.Response) -> list:
    """Parse an SSE body strictly: only `data: ...` events separated by blank lines, ending in [DONE]."""
    text = resp.text
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    blocks = text.split("\n\n")
    assert blocks[-1] == ""
    events = []
    for block in blocks[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


def metric_values(text: str) -> dict[str, float]:
    """'name{labels} value' lines -> {'name{labels}': value}; checks every line's syntax."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) adapterkit_[a-z_]+ .+$", line), line
            continue
        m = re.match(r'^(adapterkit_[a-z_]+(?:\{[a-z_]+="(?:[^"\\]|\\.)*"(?:,[a-z_]+="(?:[^"\\]|\\.)*")*\})?) '
                     r'(-?[0-9.e+-]+|\+Inf|NaN)$', line)
        assert m, line
        out[m.group(1)] = float(m.group(2))
    return out


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# ---------------------------------------------------------------------- models, health
def test_models_lists_the_base_and_every_adapter_with_the_base_as_parent(world):
    r = call(world.app, "GET", "/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids == [world.name, "alpha", "beta", "wrongbase"]
    for m in body["data"]:
        assert m["object"] == "model" and m["owned_by"] == "adapterkit" and isinstance(m["created"], int)
        assert m["parent"] == (None if m["id"] == world.name else world.name)
    one = call(world.app, "GET", "/v1/models/beta").json()
    assert one["id"] == "beta" and one["parent"] == world.name
    err = error_of(call(world.app, "GET", "/v1/models/nope"), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"


def test_health(world):
    r = call(world.app, "GET", "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "base": world.name, "adapters": 3}


# ---------------------------------------------------------------------- completions
def test_completion_matches_generate_per_adapter_and_counts_usage(world):
    tok = world.base.tokenizer
    rt = AdapterRuntime.from_base(load_base(str(world.base_dir)))
    rt.add(Adapter.load(world.root / "alpha"))
    want_alpha = generate(rt, tok, [PROMPT], ["alpha"], max_new_tokens=6)[0]
    want_base = generate(rt, tok, [PROMPT], [None], max_new_tokens=6)[0]
    assert want_alpha.token_ids != want_base.token_ids            # the adapter changes the greedy path

    r = complete(world, "alpha")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "alpha"
    (choice,) = body["choices"]
    assert choice["text"] == want_alpha.text and choice["index"] == 0 and choice["logprobs"] is None
    n_prompt = len(tok(PROMPT)["input_ids"])
    n_out = len(want_alpha.token_ids)
    assert choice["finish_reason"] == ("length" if n_out == 6 else "stop")
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    base = complete(world, world.name).json()                       # the base by name
    assert base["choices"][0]["text"] == want_base.text and base["model"] == world.name
    # base:adapter and a prompt given as a list of one string
    both = post(world, "/v1/completions", {"model": f"{world.name}:alpha", "prompt": [PROMPT], "max_tokens": 6,
                                           "temperature": 0}).json()
    assert both["choices"][0]["text"] == want_alpha.text and both["model"] == f"{world.name}:alpha"


def test_stop_strings_seed_and_ignore_eos_reach_the_engine(world):
    full = complete(world, "alpha", max_tokens=8, ignore_eos=True).json()
    text = full["choices"][0]["text"]
    assert full["usage"]["completion_tokens"] == 8 and full["choices"][0]["finish_reason"] == "length"
    word = text.split()[2]
    cut = complete(world, "alpha", max_tokens=8, ignore_eos=True, stop=[word, "zzz"]).json()
    assert cut["choices"][0]["text"] == text[:text.index(word)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    sampled = [complete(world, "beta", max_tokens=8, temperature=1.0, seed=7, ignore_eos=True).json()
               ["choices"][0]["text"] for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_streaming_completion_sse_shape_and_text_equals_non_stream(world):
    want = complete(world, "beta", max_tokens=6, ignore_eos=True).json()
    r = complete(world, "beta", max_tokens=6, ignore_eos=True, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(r)
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] and "usage" not in c for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want["choices"][0]["text"]

    r = complete(world, "beta", max_tokens=6, ignore_eos=True, stream=True, stream_options={"include_usage": True})
    chunks = sse_events(r)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == want["usage"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------------- chat
def test_chat_without_a_template_renders_role_lines_and_streams(world):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    r = post(world, "/v1/chat/completions", {"model": "alpha", "messages": msgs, "max_tokens": 5, "temperature": 0,
                                             "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    rendered = "system: be brief\nuser: hello\nassistant:"
    assert body["usage"]["prompt_tokens"] == len(world.engine.tokenizer(rendered)["input_ids"])
    assert body["usage"]["completion_tokens"] == 5

    r = post(world, "/v1/chat/completions", {"model": "alpha", "messages": msgs, "max_tokens": 5, "temperature": 0,
                                             "ignore_eos": True, "stream": True,
                                             "stream_options": {"include_usage": True}})
    chunks = sse_events(r)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == choice["message"]["content"]


def test_chat_uses_the_tokenizer_template_with_a_generation_prompt(world):
    tok = world.engine.tokenizer
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}cat{% endif %}")
    try:
        body = post(world, "/v1/chat/completions", {"model": "beta", "messages": [{"role": "user", "content": "dog"}],
                                                    "max_completion_tokens": 2, "max_tokens": 50}).json()
        assert body["usage"]["prompt_tokens"] == 3                  # "user dog cat": 3 words, no extra tokens
        assert body["usage"]["completion_tokens"] <= 2              # max_completion_tokens wins
        tok.chat_template = "{{ raise_exception('roles must alternate') }}"
        err = error_of(post(world, "/v1/chat/completions", {"model": "beta", "messages": [{"role": "user",
                                                                                            "content": "x"}]}), 400)
        assert err["param"] == "messages" and "roles must alternate" in err["message"]
    finally:
        tok.chat_template = None


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("body, param, message", [
    ({"model": "alpha", "prompt": "x", "max_tokens": -1}, "max_tokens",
     "max_tokens: Input should be greater than or equal to 1"),
    ({"model": "alpha", "prompt": "x", "max_tokens": 0}, "max_tokens",
     "max_tokens: Input should be greater than or equal to 1"),
    ({"model": "alpha", "prompt": "x", "max_tokens": "5"}, "max_tokens", "max_tokens: Input should be a valid integer"),
    ({"model": "alpha", "prompt": "x", "temperature": "hot"}, "temperature",
     "temperature: Input should be a valid number"),
    ({"model": "alpha", "prompt": "x", "top_p": 0}, "top_p", "top_p: Input should be greater than 0"),
    ({"model": "alpha", "prompt": "x", "stream": "yes"}, "stream", "stream: Input should be a valid boolean"),
    ({"model": "alpha", "prompt": 5}, "prompt", "prompt must be a string or a list of one string"),
    ({"model": "alpha", "prompt": ["a", "b"]}, "prompt",
     "prompt must be a string or a list of ONE string (send one request per prompt)"),
    ({"model": "alpha"}, "prompt", "prompt is required"),
    ({"prompt": "x"}, "model", "model is required"),
    ({"model": "alpha", "prompt": "x", "n": 2}, "n", "n must be 1 or absent (one choice per request), got 2"),
    ({"model": "alpha", "prompt": "x", "stop": [1]}, "stop", "stop must be a string or a list of strings"),
    ({"model": "alpha", "prompt": "x", "stop": ""}, "stop", "stop strings must be non-empty"),
    ({"model": "alpha", "prompt": "x", "echo": True}, "echo", "echo is not supported by this server; omit it"),
    ({"model": "alpha", "prompt": "x", "frobnicate": 1}, "frobnicate", "frobnicate is not a known field"),
    ({"model": "alpha", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options",
     "stream_options is only allowed with stream: true"),
    ({"model": "alpha", "prompt": "x", "seed": -1}, "seed", "seed: Input should be greater than or equal to 0"),
])
def test_bad_completion_fields_are_400_naming_the_field(world, body, param, message):
    err = error_of(post(world, "/v1/completions", body), 400)
    assert err == {"message": message, "type": "invalid_request_error", "param": param,
                   "code": "unsupported_parameter" if param == "echo" else None}


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "http://x"}]}], "messages[0].content[0].image_url"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text"),
])
def test_bad_chat_messages_are_400_naming_the_field(world, messages, param):
    err = error_of(post(world, "/v1/chat/completions", {"model": "alpha", "messages": messages}), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_malformed_json_and_non_objects_are_400(world):
    err = error_of(call(world.app, "POST", "/v1/completions", content=b'{"model": "alpha", "prompt": ',
                        headers={"content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json" and err["message"].startswith("the body is not valid JSON")
    err = error_of(call(world.app, "POST", "/v1/chat/completions", content=b"[1, 2]"), 400)
    assert err["message"] == "the body must be a JSON object" and err["code"] == "invalid_json"


def test_context_length_and_huge_max_tokens_are_400(world):
    ctx = world.engine.max_context
    long_prompt = " ".join(["cat"] * (ctx + 10))
    err = error_of(post(world, "/v1/completions", {"model": "alpha", "prompt": long_prompt}), 400)
    assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
    assert err["message"] == (f"prompt has {ctx + 10} tokens; the model's context is {ctx} tokens (prompt + at "
                              "least one generated token); shorten it")
    n = len(world.engine.tokenizer(PROMPT)["input_ids"])
    for huge in (ctx, 10 ** 20):
        err = error_of(complete(world, "alpha", max_tokens=huge), 400)
        assert err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"
        assert err["message"].startswith(f"max_tokens is {huge} but the {n}-token prompt leaves room for {ctx - n} ")
    err = error_of(post(world, "/v1/chat/completions", {"model": "alpha", "messages": [
        {"role": "user", "content": long_prompt}]}), 400)
    assert err["param"] == "messages" and err["code"] == "context_length_exceeded"
    # chat without max_tokens: up to the context (the whole remaining room is allowed)
    r = post(world, "/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": None, "temperature": 0})
    assert r.status_code == 200, r.text


def test_empty_prompt_is_400(world):
    err = error_of(post(world, "/v1/completions", {"model": "alpha", "prompt": ""}), 400)
    assert err["param"] == "prompt" and err["message"] == "prompt is empty: it encodes to no tokens"


# ---------------------------------------------------------------------- models that are not served
@pytest.mark.parametrize("model", ["nope", "other-base:alpha", "bad name!", "nope:", ""])
def test_unknown_models_are_404_never_the_base(world, model):
    r = post(world, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 2})
    if model == "":
        assert error_of(r, 400)["param"] == "model"
        return
    err = error_of(r, 404)
    assert err["param"] == "model" and err["code"] == "model_not_found" and err["type"] == "not_found_error"
    err = error_of(post(world, "/v1/chat/completions", {"model": model, "messages": [{"role": "user",
                                                                                     "content": "hi"}]}), 404)
    assert err["code"] == "model_not_found"


def test_unknown_adapter_message_names_the_served_ones(world):
    err = error_of(complete(world, "nope"), 404)
    assert err["message"] == "unknown adapter 'nope'; served adapters: alpha, beta, wrongbase"
    err = error_of(complete(world, "other-base:alpha"), 404)
    assert err["message"].startswith(f"model 'other-base:alpha': base 'other-base' is not served here; "
                                     f"this server serves '{world.name}'")


def test_an_adapter_for_another_base_fails_its_request_and_the_server_keeps_serving(world):
    for stream in (False, True):
        err = error_of(complete(world, "wrongbase", stream=stream), 400)
        assert err["code"] == "adapter_base_mismatch" and err["param"] == "model"   # the field at fault
    assert complete(world, "alpha").status_code == 200


# ---------------------------------------------------------------------- load / unload
def test_load_serve_and_unload_an_adapter_by_path(world):
    r = post(world, "/v1/load_lora_adapter", {"lora_name": "g1", "lora_path": str(world.root / "extra" / "gamma")})
    assert r.status_code == 200, r.text
    assert r.json()["message"] == "Success: LoRA adapter 'g1' added successfully."
    assert "g1" in [m["id"] for m in call(world.app, "GET", "/v1/models").json()["data"]]
    got = complete(world, "g1", max_tokens=4, ignore_eos=True)
    assert got.status_code == 200 and got.json()["usage"]["completion_tokens"] == 4
    # the same name and folder again (relative to the root) is a no-op; another folder is refused
    assert post(world, "/v1/load_lora_adapter", {"lora_name": "g1", "lora_path": "extra/gamma"}).status_code == 200
    err = error_of(post(world, "/v1/load_lora_adapter", {"lora_name": "g1", "lora_path": str(world.root / "beta")}),
                   400)
    assert err["param"] == "lora_name" and "already served" in err["message"]

    r = post(world, "/v1/unload_lora_adapter", {"lora_name": "g1"})
    assert r.status_code == 200 and r.json()["message"] == "Success: LoRA adapter 'g1' removed successfully."
    assert "g1" not in [m["id"] for m in call(world.app, "GET", "/v1/models").json()["data"]]
    assert error_of(complete(world, "g1"), 404)["code"] == "model_not_found"
    err = error_of(post(world, "/v1/unload_lora_adapter", {"lora_name": "g1"}), 404)
    assert err["param"] == "lora_name" and err["message"] == "unknown adapter 'g1'; nothing to unload"


@pytest.mark.parametrize("path, message", [
    ("OUTSIDE", "is outside the adapter roots"),
    ("../outside/outsider", "contains '..'"),
    ("/etc", "is outside the adapter roots"),
    ("extra/missing", "does not exist"),
])
def test_load_by_path_is_confined_to_the_roots(world, path, message):
    path = str(world.tmp / "outside" / "outsider") if path == "OUTSIDE" else path
    err = error_of(post(world, "/v1/load_lora_adapter", {"lora_name": "sneaky", "lora_path": path}), 400)
    assert err["param"] == "lora_path" and err["code"] == "adapter_path_not_allowed" and message in err["message"]
    assert "sneaky" not in [m["id"] for m in call(world.app, "GET", "/v1/models").json()["data"]]


def test_corrupt_or_foreign_adapter_load_is_400_and_others_keep_serving(world):
    err = error_of(post(world, "/v1/load_lora_adapter", {"lora_name": "broken", "lora_path": "extra/broken"}), 400)
    assert err["code"] == "invalid_adapter" and err["param"] == "lora_path"
    err = error_of(post(world, "/v1/load_lora_adapter", {"lora_name": "foreign", "lora_path": "extra/foreign"}), 400)
    assert err["code"] == "adapter_base_mismatch" and err["param"] == "lora_path"
    err = error_of(post(world, "/v1/load_lora_adapter", {"lora_name": "bad name", "lora_path": "extra/gamma"}), 400)
    assert err["code"] == "invalid_adapter_name" and err["param"] == "lora_name"
    err = error_of(post(world, "/v1/load_lora_adapter", {"lora_name": world.name, "lora_path": "extra/gamma"}), 400)
    assert err["param"] == "lora_name"
    err = error_of(post(world, "/v1/load_lora_adapter", {"lora_name": "x"}), 400)
    assert err["param"] == "lora_path" and err["message"] == "lora_path is required"
    names = [m["id"] for m in call(world.app, "GET", "/v1/models").json()["data"]]
    assert not {"broken", "foreign", "bad name"} & set(names)
    assert complete(world, "beta").status_code == 200


# ---------------------------------------------------------------------- auth, size, routes
def test_api_key_is_required_everywhere_but_health(world):
    app = create_app(world.engine, ApiSettings(api_key="s3cret"))
    for method, url in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                        ("POST", "/v1/load_lora_adapter")]:
        r = call(app, method, url, json={})
        err = error_of(r, 401)
        assert err["message"] == "missing API key: send the header 'Authorization: Bearer <key>'"
        assert err["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
    for header in ("Bearer wrong", "Bearer s3cret2", "Basic s3cret"):
        r = call(app, "GET", "/v1/models", headers={"Authorization": header})
        assert error_of(r, 401)["code"] == "invalid_api_key"
    assert call(app, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    r = call(app, "POST", "/v1/completions", headers={"Authorization": "Bearer s3cret"},
             json={"model": "alpha", "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200
    assert call(app, "GET", "/health").status_code == 200


def test_request_body_over_the_limit_is_413(world):
    app = create_app(world.engine, ApiSettings(max_body_bytes=2048))
    big = {"model": "alpha", "prompt": "cat " * 600, "max_tokens": 2}
    err = error_of(call(app, "POST", "/v1/completions", json=big), 413)
    assert err["message"] == ("the request body is larger than the server's limit of 2048 bytes (the server's "
                              "--max-body-mb sets it; images as data URLs need more)")
    assert err["code"] == "request_too_large"

    async def chunked():                          # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 300
    err = error_of(call(app, "POST", "/v1/completions", content=chunked()), 413)
    assert err["code"] == "request_too_large"
    assert call(app, "POST", "/v1/completions", json={**big, "prompt": PROMPT}).status_code == 200


def test_unknown_route_and_method_use_the_error_shape(world):
    err = error_of(call(world.app, "GET", "/v1/nothing"), 404)
    assert err["message"] == "no route GET /v1/nothing"
    err = error_of(call(world.app, "GET", "/v1/completions"), 405)
    assert err["message"] == "Method Not Allowed: GET /v1/completions"


# ---------------------------------------------------------------------- queue, shutdown
def test_queue_full_is_429_and_a_stopped_engine_is_503(world):
    engine = Engine(world.engine.runtime, world.engine.tokenizer, world.engine.cache,
                    EngineConfig(max_batch=1, max_queue=1), base_name=world.name)    # never started: nothing runs
    app = create_app(engine)
    body = {"model": world.name, "prompt": PROMPT, "max_tokens": 4}

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
            first = asyncio.ensure_future(c.post("/v1/completions", json=body))
            while engine.metrics()["queue_depth"] < 1:
                await asyncio.sleep(0.005)
            second = await c.post("/v1/completions", json=body)
            first.cancel()
            return second

    r = run(scenario())
    err = error_of(r, 429)
    assert err["code"] == "queue_full" and err["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
    assert err["message"] == "the request queue is full (1 waiting); retry later"
    engine.stop(drain=False, timeout=1)
    r = post(world, "/v1/completions", body, app=app)
    err = error_of(r, 503)
    assert err["message"] == "the server is shutting down; no new requests are taken"
    assert r.headers["retry-after"] == "5"


# ---------------------------------------------------------------------- client disconnect
async def _disconnecting_call(app, path: str, body: dict, after_chunks: int, running=lambda: True) -> list:
    """Drive the ASGI app directly: send the body, then disconnect once `after_chunks` body parts went
    out and `running()` holds (a client gone before its request reached the engine cancels nothing)."""
    raw = json.dumps(body).encode()
    sent: list = []
    state = {"body_sent": False}

    async def receive():
        if not state["body_sent"]:
            state["body_sent"] = True
            return {"type": "http.request", "body": raw, "more_body": False}
        while sum(m["type"] == "http.response.body" for m in sent) < after_chunks or not running():
            await asyncio.sleep(0.001)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 5000), "server": ("test", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]}
    await asyncio.wait_for(app(scope, receive, send), 20)
    return sent


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_cancels_its_request(world, stream):
    engine = world.engine
    before = engine.metrics()["finished_total"].get("cancelled", 0)
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": engine.max_context - 10, "ignore_eos": True,
            "stream": stream}
    sent = run(_disconnecting_call(world.app, "/v1/completions", body, after_chunks=2 if stream else 0,
                                   running=lambda: engine.metrics()["running"] > 0))
    wait_for(lambda: engine.metrics()["finished_total"].get("cancelled", 0) == before + 1)
    wait_for(lambda: engine.metrics()["running"] == 0)
    if stream:
        assert sent[0]["status"] == 200
        parts = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        assert parts.startswith(b"data: ") and b"[DONE]" not in parts


# ---------------------------------------------------------------------- metrics
def test_metrics_is_prometheus_text_with_engine_and_cache_series(world):
    before = metric_values(call(world.app, "GET", "/metrics").text)
    assert complete(world, "beta").status_code == 200
    r = call(world.app, "GET", "/metrics")
    assert r.status_code == 200 and r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = r.text
    values = metric_values(text)
    for family, kind in [("adapterkit_queue_depth", "gauge"), ("adapterkit_running_requests", "gauge"),
                         ("adapterkit_tokens_per_second", "gauge"),
                         ("adapterkit_time_to_first_token_seconds", "histogram"),
                         ("adapterkit_time_per_output_token_seconds", "histogram"),
                         ("adapterkit_adapter_load_seconds", "histogram"),
                         ("adapterkit_adapter_cache_hits_total", "counter"),
                         ("adapterkit_adapter_cache_misses_total", "counter"),
                         ("adapterkit_adapter_loads_total", "counter"), ("adapterkit_requests_total", "counter")]:
        assert f"# TYPE {family} {kind}\n" in text
    key = 'adapterkit_requests_total{model="beta"}'
    assert values[key] == before.get(key, 0) + 1
    assert values["adapterkit_queue_depth"] == 0 and values["adapterkit_running_requests"] == 0
    ttft = world.engine.metrics()["ttft_seconds"]
    assert values['adapterkit_time_to_first_token_seconds_bucket{le="+Inf"}'] == \
        values["adapterkit_time_to_first_token_seconds_count"] == ttft["count"] >= 1
    stats = world.engine.cache.stats()
    assert values['adapterkit_adapter_cache_hits_total{tier="slot"}'] == stats["slot_hits"]
    assert values['adapterkit_adapter_cache_misses_total{tier="slot"}'] == stats["slot_misses"] >= 1
    assert values["adapterkit_adapter_loads_total"] == stats["loads"] >= 1
    assert values["adapterkit_adapter_load_seconds_count"] == stats["loads"]


def test_metrics_text_escapes_labels_and_orders_buckets():
    hist = {"buckets": {"0.1": 1, "0.05": 1, "1.0": 2, "+Inf": 3}, "sum": 2.5, "count": 3}
    text = prom.render({"queue_depth": 2, "running": 1, "requests_total": {'a"b\\c\nd': 4},
                        "finished_total": {"stop": 1}, "tokens_per_second": 1.5, "ttft_seconds": hist}, {})
    assert 'adapterkit_requests_total{model="a\\"b\\\\c\\nd"} 4\n' in text
    lines = [line for line in text.splitlines() if line.startswith("adapterkit_time_to_first_token_seconds")]
    assert lines == ['adapterkit_time_to_first_token_seconds_bucket{le="0.05"} 1',
                     'adapterkit_time_to_first_token_seconds_bucket{le="0.1"} 1',
                     'adapterkit_time_to_first_token_seconds_bucket{le="1.0"} 2',
                     'adapterkit_time_to_first_token_seconds_bucket{le="+Inf"} 3',
                     "adapterkit_time_to_first_token_seconds_sum 2.5",
                     "adapterkit_time_to_first_token_seconds_count 3"]
    assert "adapterkit_queue_depth 2\n" in text and "adapterkit_tokens_per_second 1.5\n" in text
