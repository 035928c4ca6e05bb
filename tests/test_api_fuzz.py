"""Property-based fuzz of the HTTP API, in-process (ASGI) on the real Engine over a tiny Llama with
LoRA adapters (built like tests/test_api.py's `world`).

  - schemathesis generates requests for every operation of the app's own /openapi.json, in positive
    (schema-valid) and negative (schema-violating) mode;
  - hypothesis alone generates raw requests: any method on known and unknown paths, raw and chunked
    bodies, content types, auth headers, on the plain app, an app with an API key, one with a tiny
    body limit and one over a stopped engine; and query strings and headers for the GET routes
    without input (/openapi.json, which the schema does not list, among them);
  - bursts of concurrent requests (more than max_batch + max_queue) with loads and unloads among them.

Strategies steer generated bodies towards the served model names and max_tokens 1..4, so generation
really runs (and stays fast) instead of every case being a cheap 404/400; the load route's paths
draw from good, damaged and escaping adapter folders of a temporary root.

Invariants, for every case: no status >= 500 (but the stopped engine's 503) and no exception out of
the app; every status >= 400
(413, 429, 503 included) has exactly OpenAI's error body {"error": {"message": str, "type": str,
"param": str|null, "code": str|null}}, and so has an error event inside a 200 stream; a negative
(schema-violating) case is refused; a 200 of load_lora_adapter serves a folder inside the adapter root.

Deterministic: derandomize=True and database=None; no shrinking: a bad case is recorded (the
shortest body per kind of failure) and each test fails at its end listing minimal reproductions.
The last test checks the case counts (>= MIN_CASES in all, and every route's share); it needs the
module's other tests to have run before it (file order).

Unload vs the shared engine: one engine serves the whole module, so unload_lora_adapter must never
take away what the other cases use. Its lora_name strategy draws from DISPOSABLE (names only the
load cases create) and generated text in which the PROTECTED names (alpha, beta, wrongbase) are
mapped to a disposable one; every test checks at its end that they are still served. (Rebuilding
the app or the engine per case instead would cost ~1 s a case.) Cases that name a disposable name
often unload/load it first (counted, and checked, as set-up requests), so unload, load and
generation on loaded (odd or damaged) adapters really happen.

Deeper local runs: ADAPTERKIT_FUZZ_SCALE=5 ADAPTERKIT_FUZZ_SEED=7 pytest tests/test_api_fuzz.py
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections import Counter
from types import SimpleNamespace
from typing import Any, Callable
from urllib.parse import urlencode

import httpx
import pytest
from test_api import world_files

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from adapterkit.serve.api import ApiSettings, create_app  # noqa: E402
from adapterkit.serve.engine import Engine, EngineConfig  # noqa: E402
from adapterkit import Adapter  # noqa: E402
from adapterkit.core.heads import ClassificationHead  # noqa: E402

MIN_CASES = 2000
KEY = "fuzz-key"
SMALL_LIMIT = 96                      # bytes: the small app answers 413 to most bodies
PROTECTED = ("alpha", "beta", "wrongbase")
DISPOSABLE = ("gamma", "fz_a", "fz-b", "delta")
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
GENERATION = ("/v1/completions", "/v1/chat/completions")
CLASSIFY = ("/v1/classify", "/classify")

# (method, path) of every operation in /openapi.json -> (positive cases, negative cases). Operations
# without any input have one distinct positive case (hypothesis stops early) and nothing to violate;
# /v1/models/{model_id} has nothing to violate either (any string is a valid path parameter).
BUDGET: dict[tuple[str, str], tuple[int, int]] = {
    ("GET", "/health"): (10, 0),
    ("GET", "/metrics"): (10, 0),
    ("GET", "/v1/models"): (10, 0),
    ("GET", "/v1/models/{model_id}"): (200, 0),
    ("POST", "/v1/completions"): (600, 300),
    ("POST", "/v1/chat/completions"): (600, 300),
    ("POST", "/v1/classify"): (150, 60),
    ("POST", "/classify"): (40, 20),
    ("POST", "/v1/load_lora_adapter"): (250, 100),
    ("POST", "/v1/unload_lora_adapter"): (150, 100),
}
RAW_CASES = 400
GET_CASES = 40                         # per route without input, generated queries and headers
BURSTS, BURST_SIZE = 5, (60, 72)      # ~85% generations: over max_batch 8 + max_queue 32, so some 429s
ALL_ROUTES = [f"{m} {p}" for m, p in BUDGET] + ["GET /openapi.json"]

CASES: Counter = Counter()            # "METHOD /path" -> cases executed (all tests of the module)
STATUS: dict[str, Counter] = {}       # test label -> status -> count (printed by the last test)

# Deeper local runs (not CI): ADAPTERKIT_FUZZ_SCALE=10 multiplies every budget; ADAPTERKIT_FUZZ_SEED=N
# draws other cases (with it unset, hypothesis derandomizes: the same cases on every run).
SCALE = float(os.environ.get("ADAPTERKIT_FUZZ_SCALE", "1"))
SEED = os.environ.get("ADAPTERKIT_FUZZ_SEED")


def fuzz(n: int) -> Callable[[Callable], Callable]:
    """settings for `n` cases (times SCALE): reproducible, no example database, no shrinking (bad
    cases are recorded, not raised)."""
    conf = settings(max_examples=max(1, round(n * SCALE)), derandomize=SEED is None, database=None,
                    deadline=None, print_blob=False, phases=(Phase.explicit, Phase.generate),
                    suppress_health_check=list(HealthCheck))

    def wrap(fn: Callable) -> Callable:
        fn = conf(fn)
        return seed(int(SEED))(fn) if SEED is not None else fn
    return wrap


# ---------------------------------------------------------------------- the world
def damaged(good, extra) -> list[str]:
    """Copies of the adapter folder `good` in `extra`, each damaged one way; their names."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(good / "adapter_model.safetensors")
    cfg = json.loads((good / "adapter_config.json").read_text())
    side = json.loads((good / "adapterkit.json").read_text())
    dump = json.dumps
    weights = {"w_renamed": {"foo": torch.zeros(4, 4)},
               "w_transposed": {k: v.t().contiguous() for k, v in tensors.items()},
               "w_half": dict(list(tensors.items())[: len(tensors) // 2]),
               "w_nan": {k: torch.full_like(v, float("nan")) for k, v in tensors.items()},
               "w_huge": {k: torch.full_like(v, 3e38) for k, v in tensors.items()},
               "w_big": {k: torch.full_like(v, 1e15) for k, v in tensors.items()},    # loads; logits overflow
               "w_int": {k: (v * 100).to(torch.int32) for k, v in tensors.items()},
               "w_bf16": {k: v.bfloat16() for k, v in tensors.items()},
               "w_3d": {k: v.unsqueeze(0).contiguous() for k, v in tensors.items()}}
    configs = {"cfg_not_json": "{", "cfg_list": "[]", "cfg_empty": "{}",
               "cfg_types": dump({**cfg, "r": "four", "lora_alpha": None, "target_modules": 5}),
               "cfg_r_big": dump({**cfg, "r": 64}), "cfg_targets": dump({**cfg, "target_modules": ["nope_proj"]}),
               "cfg_ia3": dump({**cfg, "peft_type": "IA3"})}
    sides = {"side_not_json": "{", "side_future": dump({**side, "format_version": 99}),
             "side_config_str": dump({**side, "config": "lora"}),
             "side_method": dump({**side, "config": {**side["config"], "type": "nomethod"}}),
             "side_meta": dump({**side, "meta": []}),
             "side_disagree": dump({**side, "config": {**side["config"], "r": 8}})}
    made = []
    for name in [*weights, *configs, *sides, "w_empty", "w_dir", "no_weights", "no_config"]:
        d = extra / name
        shutil.copytree(good, d)
        made.append(name)
        if name in weights:
            save_file(weights[name], str(d / "adapter_model.safetensors"))
        elif name in configs:
            (d / "adapter_config.json").write_text(configs[name])
            (d / "adapterkit.json").unlink()
        elif name in sides:
            (d / "adapterkit.json").write_text(sides[name])
        elif name == "w_empty":
            (d / "adapter_model.safetensors").write_bytes(b"")
        elif name == "w_dir":
            (d / "adapter_model.safetensors").unlink()
            (d / "adapter_model.safetensors").mkdir()
        else:
            (d / ("adapter_model.safetensors" if name == "no_weights" else "adapter_config.json")).unlink()
    return made


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One running engine and its apps. Root `adapters/` serves alpha, beta and wrongbase (another
    base's shape); `adapters/extra/` holds folders only reachable by load-by-path (gamma, broken,
    foreign, escape: a symlink out of the root, and damaged copies of alpha); `outside/outsider` is a
    valid adapter outside the root. A second engine, stopped, is behind the `stopped` app (503)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("fuzz")
    base_dir, base, root = world_files(tmp)                # test_api.py's world: the same folders
    alpha = Adapter.load(root / "alpha")                   # + a classification head, for /v1/classify
    alpha.head = ClassificationHead.create(["yes", "no"], base.model.config.hidden_size, "last")
    alpha.save(root / "alpha")
    os.symlink(tmp / "outside" / "outsider", root / "extra" / "escape")
    bad = damaged(root / "alpha", root / "extra")

    engine = Engine.build(str(base_dir), adapter_dirs=[root], config=EngineConfig(max_batch=8, max_queue=32),
                          max_loaded_adapters=3, ram_cache_mb=16)
    engine.start()
    stopped = Engine.build(str(base_dir), adapter_dirs=[root], config=EngineConfig(max_batch=8, max_queue=32),
                           max_loaded_adapters=3, ram_cache_mb=16)
    stopped.start()
    stopped.stop(drain=False)
    app = create_app(engine)
    apps = {"app": app, "keyed": create_app(engine, ApiSettings(api_key=KEY)),
            "small": create_app(engine, ApiSettings(max_body_bytes=SMALL_LIMIT)), "stopped": create_app(stopped)}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    name = engine.base_name
    models = (name, "alpha", "beta", f"{name}:alpha", f"{name}:beta", "auto", "alpha", "beta", name,
              "wrongbase", *DISPOSABLE, "nope", "other:alpha", f"{name}:", ":alpha", "bad name", "a" * 300)
    loadable = ("extra/gamma", "alpha", "beta", "extra/w_big", "extra/w_int", "extra/w_bf16", "extra/w_half",
                "extra/cfg_targets")
    paths = (*loadable, str(root / "extra" / "gamma"), str(root / "beta"), "extra/broken", "extra/foreign",
             "extra/escape", str(root / "extra" / "escape"), "extra/missing", "extra", str(root),
             "alpha/adapter_config.json", "../outside/outsider", str(tmp / "outside" / "outsider"),
             "/etc", "/etc/passwd", "/", "", ".", "extra/./gamma", "extra//gamma", "~/x", "a\x00b",
             "x" * 5000, "/" + "y" * 300, *(f"extra/{d}" for d in bad))
    clients = {label: TestClient(a) for label, a in apps.items()}
    for c in clients.values():
        c.__enter__()
    yield SimpleNamespace(engine=engine, app=app, schema=schema, root=root, tmp=tmp, name=name,
                          models=models, paths=paths, loadable=loadable, clients=clients)
    for c in clients.values():
        c.__exit__(None, None, None)
    engine.stop(drain=False)
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------- checks
def error_shape_problem(content: bytes, content_type: str) -> str | None:
    """None if `content` is exactly OpenAI's error body, else what is wrong with it."""
    if "application/json" not in content_type:
        return f"error with content-type {content_type!r}, not JSON"
    try:
        body = json.loads(content)
    except ValueError:
        return "error body is not JSON"
    return error_obj_problem(body)


def error_obj_problem(body: Any) -> str | None:
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return "error body is not {'error': {...}}"
    err = body["error"]
    if set(err) != {"message", "type", "param", "code"}:
        return f"error keys {sorted(err)}"
    if not isinstance(err["message"], str) or not err["message"]:
        return "error.message is not a non-empty string"
    if not isinstance(err["type"], str) or not err["type"]:
        return "error.type is not a non-empty string"
    for key in ("param", "code"):
        if err[key] is not None and not isinstance(err[key], str):
            return f"error.{key} is {type(err[key]).__name__}, not str or null"
    return None


def sse_problems(text: str) -> list[str]:
    """A 200 stream: `data: ...` events, the last [DONE]; an error event has OpenAI's error shape."""
    blocks = text.split("\n\n")
    if blocks[-1] != "" or not text.endswith("data: [DONE]\n\n"):
        return ["stream does not end with data: [DONE]"]
    out = []
    for block in blocks[:-2]:
        if not block.startswith("data: "):
            return [f"stream event {block[:40]!r} is not a data: line"]
        try:
            event = json.loads(block[len("data: "):])
        except ValueError:
            return ["stream event is not JSON"]
        if isinstance(event, dict) and "error" in event:
            why = error_obj_problem(event)
            out += [f"stream error event: {why}"] if why else []
    return out


def problems(method: str, status: int, headers: dict[str, str], content: bytes, allow: tuple[int, ...] = ()
             ) -> list[str]:
    """What is wrong with one response; `allow`: statuses >= 500 this case expects (503 when stopped)."""
    ctype = headers.get("content-type", "")
    out = []
    if status >= 500 and status not in allow:
        out.append(f"status {status}")
    if status >= 400 and method != "HEAD":
        why = error_shape_problem(content, ctype)
        if why:
            out.append(why)
    elif 200 <= status < 300 and "text/event-stream" in ctype:
        out += sse_problems(content.decode("utf-8", "replace"))
    return out


class Recorder:
    """Bad cases of one test, the shortest reproduction per (route, status, problem)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bad: dict[str, tuple[int, str]] = {}
        self.statuses = STATUS.setdefault(label, Counter())

    def seen(self, route: str, method: str, url: str, headers: dict[str, Any], body: Any, status: int,
             resp_headers: dict[str, str], content: bytes, allow: tuple[int, ...] = (), setup: bool = False) -> None:
        CASES[route] += 1
        self.statuses[f"set-up {status}" if setup else status] += 1
        found = problems(method, status, resp_headers, content, allow)
        if found:
            detail = content[:300].decode("utf-8", "replace")
            if status >= 500:        # the message names the exception type: one entry per type
                found = [f"{found[0]}: {detail[:120]}"] + found[1:]
            self.add(route, status, "; ".join(found), method, url, headers, body, detail)

    def crashed(self, route: str, method: str, url: str, headers: dict[str, Any], body: Any,
                exc: BaseException) -> None:
        CASES[route] += 1
        self.statuses["exception"] += 1
        self.add(route, -1, f"exception out of the app: {type(exc).__name__}: {str(exc)[:160]}", method, url,
                 headers, body, "")

    def add(self, route: str, status: int, problem: str, method: str, url: str, headers: dict[str, Any],
            body: Any, response: str) -> None:
        shown = show_body(body)
        key = f"{route} -> {status}: {problem}"
        repro = f"{method} {url} headers={headers or {}} body={shown}\n      -> {status} {response}"
        if key not in self.bad or len(shown) < self.bad[key][0]:
            self.bad[key] = (len(shown), repro)

    def check(self, world) -> None:
        assert not self.bad, f"{len(self.bad)} kind(s) of bad response in {self.label}:\n" + "\n".join(
            f"  {key}\n      {repro}" for key, (_, repro) in sorted(self.bad.items()))
        assert set(PROTECTED) <= set(world.engine.cache.names()), "a protected adapter was unloaded"


def show_body(body: Any) -> str:
    if body is None:
        return "(none)"
    if isinstance(body, (bytes, bytearray)):
        return repr(bytes(body)[:400])
    try:
        text = json.dumps(body, ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(body)
    return text if len(text) <= 600 else text[:600] + "...(truncated)"


def plain_headers(headers: Any) -> dict[str, str]:
    """Lower-case name -> value, from schemathesis's {name: [values]} or httpx's Headers."""
    return {k.lower(): v[0] if isinstance(v, list) else v for k, v in headers.items()}


def route_of(method: str, path: str) -> str:
    if path.startswith("/v1/models/"):
        return f"{method} /v1/models/{{model_id}}"
    return f"{method} {path}" if path in KNOWN else f"{method} (another path)"


def send(world, rec: Recorder, method: str, path: str, body: Any) -> None:
    """One request of a case's set-up through the plain app, checked and counted like the others."""
    route = route_of(method, path)
    try:
        resp = world.clients["app"].request(method, path, json=body)
    except Exception as exc:
        rec.crashed(route, method, path, {}, body, exc)
        return
    rec.seen(route, method, path, {}, body, resp.status_code, plain_headers(resp.headers), resp.content, setup=True)
    if path == "/v1/load_lora_adapter" and resp.status_code == 200:
        check_confined(world, rec, route, body, resp.content)


def check_confined(world, rec: Recorder, route: str, body: Any, content: bytes) -> None:
    """A loaded adapter's folder lies inside the temporary adapter root (never `outside/`)."""
    name = json.loads(content)["lora_name"]
    try:
        where = world.engine.cache.find(name).path
    except Exception as exc:   # noqa: BLE001
        rec.add(route, 200, f"loaded {name!r} is not served: {exc}", "POST", "/v1/load_lora_adapter", {}, body, "")
        return
    if not where.is_relative_to(os.path.realpath(world.root)):
        rec.add(route, 200, f"loaded {name!r} from {where}, outside the adapter root", "POST",
                "/v1/load_lora_adapter", {}, body, "")


# ---------------------------------------------------------------------- steering strategies
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "presence_penalty", "frequency_penalty",
               "logit_bias", "tools", "tool_choice", "parallel_tool_calls", "response_format", "n")
# max_tokens: mostly 1..4 (generation runs, fast); sometimes over the 128-token context (400).
SMALL_TOKENS = st.one_of(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(129, 10 ** 9))


def steer_generation(body: Any, draw: Callable[[Any], Any], models: tuple[str, ...], chat: bool) -> None:
    """Point a generated body (in place) at served models with small max_tokens. Only schema-valid
    values are replaced, by schema-valid ones, and only fields at schema-valid values are dropped,
    so a positive case stays positive and a negative case stays negative."""
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str) and body["model"] and draw(st.integers(0, 9)) < 8:
        body["model"] = draw(st.sampled_from(models))
    if draw(st.integers(0, 9)) < 6:                   # most cases: no unsupported option in the way
        for key in UNSUPPORTED:                       # (`n` is typed: only at a valid value)
            if key != "n" or body.get(key) is None or type(body[key]) is int:
                body.pop(key, None)
    for key in ("max_tokens", "max_completion_tokens") if chat else ("max_tokens",):
        value = body.get(key)
        if type(value) is int and value >= 1:
            body[key] = draw(SMALL_TOKENS)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = draw(st.integers(1, 4))  # absent/null: 16 or the whole context otherwise
    prompt = body.get("prompt")
    if isinstance(prompt, str) and draw(st.integers(0, 9)) < 3:
        body["prompt"] = draw(st.sampled_from(["hello world the cat", "the", " ", "</s>", "w5 w6 w7 " * 20]))


def steer_load(body: Any, draw: Callable[[Any], Any], world) -> None:
    if not isinstance(body, dict):
        return
    if isinstance(body.get("lora_name"), str) and draw(st.integers(0, 9)) < 7:
        body["lora_name"] = draw(st.sampled_from(DISPOSABLE + PROTECTED + (world.name, "auto", "bad name", "x" * 200)))
    if isinstance(body.get("lora_path"), str) and draw(st.integers(0, 9)) < 7:
        body["lora_path"] = draw(st.sampled_from(world.loadable if draw(st.booleans()) else world.paths))


def steer_classify(body: Any, draw: Callable[[Any], Any], models: tuple[str, ...]) -> None:
    """Valid fields swapped for served names and short texts, so the head really runs (alpha has one)."""
    if not isinstance(body, dict):       # only values of the valid type are swapped: a negative case stays invalid
        return
    if isinstance(body.get("model"), str) and body["model"] and draw(st.integers(0, 9)) < 7:
        body["model"] = draw(st.sampled_from(("alpha", "alpha", *models)))
    valid_input = isinstance(body.get("input"), str) or (
        isinstance(body.get("input"), list) and 0 < len(body["input"]) <= 64
        and all(isinstance(t, str) for t in body["input"]))
    if valid_input and draw(st.integers(0, 9)) < 6:
        texts = st.sampled_from(["hello world", "the cat runs fast", "a dog on the mat", "w3 w4 w5", " ", ""])
        body["input"] = draw(st.one_of(texts, st.lists(texts, min_size=1, max_size=4)))


def steer_unload(body: Any, draw: Callable[[Any], Any]) -> None:
    if not isinstance(body, dict) or not isinstance(body.get("lora_name"), str):
        return
    if body["lora_name"] in PROTECTED or draw(st.integers(0, 9)) < 7:
        body["lora_name"] = draw(st.sampled_from(DISPOSABLE))


def preload(world, rec: Recorder, draw: Callable[[Any], Any], name: str) -> None:
    """Serve the disposable `name` from some folder of the root first (a good, odd or damaged one)."""
    send(world, rec, "POST", "/v1/unload_lora_adapter", {"lora_name": name})
    send(world, rec, "POST", "/v1/load_lora_adapter",
         {"lora_name": name, "lora_path": draw(st.sampled_from(world.loadable))})


def test_the_checks_catch_what_they_look_for(world):
    """The checker is not vacuous: a 500 out of a route, a 4xx in another shape, a stream cut short
    or with a malformed error event are all flagged; good answers are not."""
    broken = create_app(world.engine)
    broken.state.service.health = lambda: 1 / 0
    with TestClient(broken) as client:
        resp = client.get("/health")
    assert problems("GET", resp.status_code, plain_headers(resp.headers), resp.content) == ["status 500"]
    ok = json.dumps({"error": {"message": "m", "type": "t", "param": None, "code": None}}).encode()
    js = {"content-type": "application/json"}
    assert problems("POST", 400, js, ok) == [] and problems("POST", 429, js, ok) == []
    assert problems("POST", 503, js, ok, allow=(503,)) == [] and problems("POST", 503, js, ok) == ["status 503"]
    for bad in (b'{"detail": "x"}', b'{"error": {"message": "m", "type": "t", "param": null}}', b"oops",
                b'{"error": {"message": "m", "type": "t", "param": 3, "code": null}}', b'{"error": "m"}'):
        assert problems("POST", 400, js, bad), bad
    assert problems("POST", 413, {"content-type": "text/plain"}, ok)
    sse = {"content-type": "text/event-stream"}
    assert problems("POST", 200, sse, b'data: {"a": 1}\n\ndata: [DONE]\n\n') == []
    assert problems("POST", 200, sse, b'data: {"a": 1}\n\n')                              # no [DONE]
    assert problems("POST", 200, sse, b'data: {"error": {"message": "m"}}\n\ndata: [DONE]\n\n')


# ---------------------------------------------------------------------- the schema's operations
def test_the_schema_lists_every_route(world):
    ops = {(op.ok().method.upper(), op.ok().path) for op in world.schema.get_all_operations()}
    assert ops == set(BUDGET)


def run_operation(world, method: str, path: str, mode: GenerationMode, n: int) -> Recorder:
    route = f"{method} {path}"
    rec = Recorder(f"{route} [{mode.value}]")

    @fuzz(n)
    @given(case=world.schema[path][method].as_strategy(generation_mode=mode), data=st.data())
    def one(case, data):
        draw = data.draw
        body = case.body if isinstance(case.body, dict) else None
        if path in GENERATION:
            steer_generation(case.body, draw, world.models, chat="chat" in path)
            if body and body.get("model") in DISPOSABLE and draw(st.integers(0, 3)) == 0:
                preload(world, rec, draw, body["model"])
        elif path in CLASSIFY:
            steer_classify(case.body, draw, world.models)
        elif path == "/v1/load_lora_adapter":
            steer_load(case.body, draw, world)
            if body and body.get("lora_name") in DISPOSABLE and draw(st.booleans()):   # free: load really loads
                send(world, rec, "POST", "/v1/unload_lora_adapter", {"lora_name": body["lora_name"]})
        elif path == "/v1/unload_lora_adapter":
            steer_unload(case.body, draw)
            if body and body.get("lora_name") in DISPOSABLE and draw(st.booleans()):   # unload really unloads
                preload(world, rec, draw, body["lora_name"])
        elif path == "/v1/models/{model_id}" and isinstance(case.path_parameters, dict) \
                and draw(st.integers(0, 9)) < 6:
            case.path_parameters["model_id"] = draw(st.sampled_from(world.models))
        shown = None if case.body is None or type(case.body).__name__ == "NotSet" else case.body
        url = case.formatted_path + (f"?{urlencode(case.query, doseq=True)}" if case.query else "")
        try:
            resp = case.call()
        except Exception as exc:
            rec.crashed(route, method, url, case.headers, shown, exc)
            return
        rec.seen(route, method, url, case.headers, shown, resp.status_code, plain_headers(resp.headers),
                 resp.content)
        if mode == NEGATIVE and resp.status_code < 400:    # the schema is the pydantic models': both refuse
            rec.add(route, resp.status_code, "a schema-violating body was accepted", method, url, case.headers,
                    shown, resp.content[:300].decode("utf-8", "replace"))
        if path == "/v1/load_lora_adapter" and resp.status_code == 200:
            check_confined(world, rec, route, shown, resp.content)

    one()
    return rec


@pytest.mark.parametrize("method,path", list(BUDGET), ids=[f"{m} {p}" for m, p in BUDGET])
def test_positive_cases(world, method, path):
    rec = run_operation(world, method, path, POSITIVE, BUDGET[(method, path)][0])
    rec.check(world)
    if path in GENERATION + CLASSIFY:   # the steering works: the model really ran for a good share of the cases
        assert rec.statuses[200] >= BUDGET[(method, path)][0] // 10, dict(rec.statuses)
    if path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        assert rec.statuses[200] >= 5, dict(rec.statuses)


NEGATIVE_OPS = [op for op, (_, neg) in BUDGET.items() if neg]


@pytest.mark.parametrize("method,path", NEGATIVE_OPS, ids=[f"{m} {p}" for m, p in NEGATIVE_OPS])
def test_negative_cases(world, method, path):
    rec = run_operation(world, method, path, NEGATIVE, BUDGET[(method, path)][1])
    rec.check(world)
    assert rec.statuses[400] >= BUDGET[(method, path)][1] // 2, dict(rec.statuses)


# ---------------------------------------------------------------------- raw requests
KNOWN = ["/health", "/metrics", "/v1/models", "/v1/models/alpha", "/v1/completions", "/v1/chat/completions",
         "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/openapi.json"]
URL_CHARS = "abcdefghijklmnopqrstuvwxyzABCZ0123456789-._~/%:@!$&'()*+,;="
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                 max_size=4),
                    max_leaves=12)
VALID = {"model": "alpha", "prompt": "hello world", "max_tokens": 2}
CHAT = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_raw_requests(world):
    """Any method on known and unknown paths, with raw or chunked bodies, content types and auth
    headers, on the plain app, an app with an API key, one with a tiny body limit, one stopped."""
    rec = Recorder("raw requests")

    @fuzz(RAW_CASES)
    @given(data=st.data())
    def one(data):
        draw = data.draw
        which = draw(st.sampled_from(["app", "app", "keyed", "small", "stopped"]))
        method = draw(st.sampled_from(["GET", "GET", "POST", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
        path = draw(st.one_of(st.sampled_from(KNOWN), st.sampled_from(KNOWN),
                              st.text(URL_CHARS, max_size=30).map(lambda s: "/" + s.lstrip("/"))))
        if draw(st.integers(0, 3)) == 0:          # a request each app serves (or refuses as it should)
            method, path = "POST", draw(st.sampled_from(GENERATION))
        query = draw(st.one_of(st.just(""), st.text(URL_CHARS + "?", max_size=20)))
        headers = {}
        auth = draw(st.sampled_from([None, f"Bearer {KEY}", f"Bearer {KEY}", "Bearer wrong", "Bearer", "Basic x",
                                     f"bearer  {KEY} ", "Bearer "]))
        if auth is not None:
            headers["authorization"] = auth
        ctype = draw(st.sampled_from([None, "application/json", "text/plain", "application/x-www-form-urlencoded",
                                      "multipart/form-data; boundary=x"]))
        if ctype is not None:
            headers["content-type"] = ctype
        kind = draw(st.sampled_from(["none", "bytes", "json", "valid", "valid"]))
        body = {"none": lambda: None, "bytes": lambda: draw(st.binary(max_size=300)),
                "json": lambda: json.dumps(draw(JSON)).encode(),
                "valid": lambda: json.dumps({**(CHAT if "chat" in path else VALID), **draw(st.dictionaries(
                    st.sampled_from(["stream", "max_tokens", "model", "pad"]),
                    st.sampled_from([True, 1, 3, "beta", "x" * 200]), max_size=2))}).encode()}[kind]()
        content: Any = body
        if body and draw(st.booleans()):          # chunked: no Content-Length, the limit counts as it streams
            size = draw(st.integers(1, 64))
            content = iter([body[i:i + size] for i in range(0, len(body), size)])
        url = path + (f"?{query}" if query else "")
        route = route_of(method, path)
        shown = {**headers, "app": which, **({"transfer-encoding": "chunked"} if content is not body else {})}
        try:
            resp = world.clients[which].request(method, url, content=content, headers=headers)
        except Exception as exc:
            rec.crashed(route, method, url, shown, body, exc)
            return
        rec.seen(route, method, url, shown, body, resp.status_code, plain_headers(resp.headers), resp.content,
                 allow=(503,) if which == "stopped" else ())

    one()
    rec.check(world)
    assert {200, 400, 401, 404, 405, 413, 503} <= set(rec.statuses), dict(rec.statuses)


# ---------------------------------------------------------------------- GET routes without input
OPEN = ("/health", "/openapi.json")            # no key needed


@pytest.mark.parametrize("path", ["/health", "/metrics", "/v1/models", "/openapi.json"])
def test_get_routes_with_generated_queries_and_headers(world, path):
    """The routes without input (one case each from the schema) under generated query strings,
    Accept headers and auth headers, on the plain app and the one with a key."""
    rec = Recorder(f"GET {path} [queries]")
    schema = world.clients["app"].get("/openapi.json").json()

    @fuzz(GET_CASES)
    @given(which=st.sampled_from(["app", "keyed"]), query=st.dictionaries(st.text(URL_CHARS, min_size=1, max_size=8),
                                                                          st.text(max_size=12), max_size=3),
           auth=st.sampled_from([None, f"Bearer {KEY}", "Bearer nope", "Token x"]),
           accept=st.sampled_from([None, "*/*", "application/json", "text/html", "image/png;q=0.5"]))
    def one(which, query, auth, accept):
        headers = {k: v for k, v in (("authorization", auth), ("accept", accept)) if v is not None}
        url = path + (f"?{urlencode(query)}" if query else "")
        resp = world.clients[which].get(url, headers=headers)
        rec.seen(f"GET {path}", "GET", url, {**headers, "app": which}, None, resp.status_code,
                 plain_headers(resp.headers), resp.content)
        keyed_out = which == "keyed" and path not in OPEN and auth != f"Bearer {KEY}"
        want = 401 if keyed_out else 200
        if resp.status_code != want or (path == "/openapi.json" and resp.json() != schema):
            what = f"expected {want}" + (" and the same schema" if want == 200 else "")
            rec.add(f"GET {path}", resp.status_code, what, "GET", url, {**headers, "app": which}, None, resp.text[:200])

    one()
    rec.check(world)


# ---------------------------------------------------------------------- concurrent bursts
def burst_request(world) -> st.SearchStrategy:
    """(path, body): mostly small generations over more adapters than slots, some loads/unloads."""
    gen = st.fixed_dictionaries({"model": st.sampled_from(world.models[:13]), "max_tokens": st.integers(3, 4),
                                 "stream": st.booleans(), "temperature": st.sampled_from([0, 0.8])})
    completion = st.tuples(st.just("/v1/completions"), gen.map(lambda b: {**b, "prompt": "hello world the cat"}))
    chat = st.tuples(st.just("/v1/chat/completions"),
                     gen.map(lambda b: {**b, "messages": [{"role": "user", "content": "hello world"}]}))
    return st.one_of(
        completion, chat, completion, chat, completion, chat,
        st.tuples(st.just("/v1/load_lora_adapter"),
                  st.fixed_dictionaries({"lora_name": st.sampled_from(DISPOSABLE),
                                         "lora_path": st.sampled_from(world.loadable)})),
        st.tuples(st.just("/v1/unload_lora_adapter"),
                  st.fixed_dictionaries({"lora_name": st.sampled_from(DISPOSABLE)})))


async def fire(app, requests: list[tuple[str, dict]]) -> list[Any]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test", timeout=120) as c:
        return await asyncio.gather(*(c.post(path, json=body) for path, body in requests), return_exceptions=True)


def test_concurrent_bursts(world):
    """More requests at once than the batch and the queue hold, over more adapters than slots, with
    loads and unloads of the disposable names among them: 429s in shape, nothing else fails."""
    rec = Recorder("bursts")

    @fuzz(BURSTS)
    @given(requests=st.lists(burst_request(world), min_size=BURST_SIZE[0], max_size=BURST_SIZE[1]))
    def one(requests):
        for (path, body), resp in zip(requests, asyncio.run(fire(world.app, requests))):
            route = f"POST {path}"
            if isinstance(resp, BaseException):
                rec.crashed(route, "POST", path, {}, body, resp)
            else:
                rec.seen(route, "POST", path, {}, body, resp.status_code, plain_headers(resp.headers), resp.content)

    one()
    rec.check(world)
    assert rec.statuses[429] >= 1 and rec.statuses[200] >= 100, dict(rec.statuses)


# ---------------------------------------------------------------------- the count (runs last)
def test_zz_enough_cases_over_every_route():
    for label, statuses in STATUS.items():          # shown with -s / on failure
        print(f"{label}: {dict(sorted(statuses.items(), key=str))}")
    total = sum(CASES.values())
    print(f"{total} cases: {dict(sorted(CASES.items()))}")
    assert total >= MIN_CASES, f"only {total} cases ran: {dict(CASES)}"
    for route in ALL_ROUTES:
        assert CASES[route] >= GET_CASES // 2, f"too few cases for {route}: {dict(CASES)}"
    for (method, path), (pos, neg) in BUDGET.items():
        if pos + neg >= 100:
            assert CASES[f"{method} {path}"] >= (pos + neg) // 2, f"{method} {path}: {dict(CASES)}"
