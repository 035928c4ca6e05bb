"""End to end: `python -m adapterkit.cli.main serve` on a free loopback port, driven by the official `openai`
client: models, completions, chat, streaming, errors, vLLM load/unload; then SIGINT drains the
request in flight and exits 0, and SIGTERM past --shutdown-timeout cancels it and exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import ATTN, save_tiny_tokenizer, tiny_llama

from adapterkit import LoraConfig, create_adapter, load_base

KEY = "e2e-key"
PROMPT = "hello world the cat"


def make_base_and_adapters(tmp: Path, context: int) -> tuple[Path, Path]:
    base_dir = tmp / "tiny-llm"
    tiny_llama(max_position_embeddings=context).save_pretrained(str(base_dir))
    save_tiny_tokenizer(base_dir)
    base = load_base(str(base_dir))
    root = tmp / "adapters"
    for i, name in enumerate(["alpha", "beta", "extra/gamma"]):
        create_adapter(name.split("/")[-1], base.model, LoraConfig(r=4, target_modules=ATTN, init="nonzero",
                                                                   init_std=0.5),
                       seed=i, fingerprint=base.fingerprint, base_name=base.name).save(root / name)
    return base_dir, root


class Server:
    """The CLI in a subprocess; its output is collected by a thread (the banner gives the URL)."""

    def __init__(self, tmp: Path, base_dir: Path, root: Path, *extra: str) -> None:
        env = {**os.environ, "ADAPTERKIT_HOME": str(tmp / "home"), "OMP_NUM_THREADS": "1",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adapterkit.cli.main", "serve", "--base", str(base_dir), "--adapters", str(root),
             "--host", "127.0.0.1", "--port", "0", "--api-key", KEY, "--log-level", "warning", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 60
        while not any(line.startswith("adapterkit serve: http://") for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("the server did not start:\n" + self.output)
            time.sleep(0.05)
        self.url = re.search(r"(http://127\.0\.0\.1:\d+)/v1", self.output).group(1)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=30)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    base_dir, root = make_base_and_adapters(tmp, context=1024)
    srv = Server(tmp, base_dir, root)
    srv.base = str(base_dir)
    yield srv
    srv.stop()


def test_banner_names_the_url_base_and_adapters(server):
    out = server.output
    assert f"  base      {server.base} (context 1024 tokens)" in out
    assert "  device    cpu, float32" in out                # conftest pins ADAPTERKIT_DEVICE=cpu
    assert "  adapters  2 served: alpha, beta" in out
    assert "  auth      Bearer API key required on every route but /health" in out


def test_models_list_through_the_openai_client(server):
    models = server.client.models.list().data
    assert [m.id for m in models] == [server.base, "alpha", "beta"]
    assert [m.to_dict()["parent"] for m in models] == [None, server.base, server.base]


def test_completion_chat_and_streaming(server):
    c = server.client
    r = c.completions.create(model="alpha", prompt=PROMPT, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens == 4 and r.usage.total_tokens == 9
    parts = list(c.completions.create(model="alpha", prompt=PROMPT, max_tokens=5, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True}))
    assert "".join(p.choices[0].text for p in parts) == r.choices[0].text
    assert parts[-1].choices[0].finish_reason == "length"

    msgs = [{"role": "user", "content": "hello"}]
    chat = c.chat.completions.create(model=f"{server.base}:beta", messages=msgs, max_tokens=4, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 4
    chunks = list(c.chat.completions.create(model=f"{server.base}:beta", messages=msgs, max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-2].choices[0].finish_reason == "length"


def test_errors_reach_the_client_as_openai_exceptions(server):
    c = server.client
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="alpha", prompt=PROMPT, max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(server.url + "/health").json()["status"] == "ok"          # open without a key
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'adapterkit_requests_total{model="alpha"}' in metrics


def test_load_and_unload_with_the_vllm_endpoints(server):
    c = server.client
    got = c.post("/load_lora_adapter", body={"lora_name": "late", "lora_path": "extra/gamma"}, cast_to=object)
    assert got["message"] == "Success: LoRA adapter 'late' added successfully."
    assert "late" in [m.id for m in c.models.list().data]
    r = c.completions.create(model="late", prompt=PROMPT, max_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError) as e:
        c.post("/load_lora_adapter", body={"lora_name": "etc", "lora_path": "/etc"}, cast_to=object)
    assert e.value.body["code"] == "adapter_path_not_allowed"
    got = c.post("/unload_lora_adapter", body={"lora_name": "late"}, cast_to=object)
    assert got["message"] == "Success: LoRA adapter 'late' removed successfully."
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="late", prompt=PROMPT, max_tokens=2)


def cancelled_count(server) -> float:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    m = re.search(r'^adapterkit_requests_finished_total\{finish_reason="cancelled"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_cancelled(server, n: float) -> None:
    deadline = time.monotonic() + 10
    while cancelled_count(server) != n:
        assert time.monotonic() < deadline, f"cancelled count stayed {cancelled_count(server)}, wanted {n}"
        time.sleep(0.05)


def test_a_client_that_goes_away_cancels_its_request(server):
    before = cancelled_count(server)
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=headers) as r:
        assert r.status_code == 200
        next(r.iter_lines())                                    # one event, then hang up
    wait_cancelled(server, before + 1)
    with pytest.raises(httpx.ReadTimeout):                      # not streaming: the client times out
        httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=0.3)
    wait_cancelled(server, before + 2)


def test_sigint_finishes_the_request_in_flight_and_exits_0(server):
    stream = server.client.completions.create(model="beta", prompt=PROMPT, max_tokens=600, stream=True,
                                              stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True})
    it = iter(stream)
    first = next(it)
    assert first.choices[0].finish_reason is None
    server.proc.send_signal(signal.SIGINT)
    rest = list(it)
    assert rest[-1].usage.completion_tokens == 600                      # drained to the end, not cut
    assert rest[-2].choices[0].finish_reason == "length"
    assert server.proc.wait(30) == 0
    server._reader.join(5)
    assert "SIGINT: shutting down; waiting for requests in flight" in server.output
    assert server.lines[-1] == "adapterkit serve: stopped"
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")


def test_sigterm_past_the_shutdown_timeout_cancels_and_exits_0(tmp_path):
    base_dir, root = make_base_and_adapters(tmp_path, context=4096)
    srv = Server(tmp_path, base_dir, root, "--shutdown-timeout", "1")
    try:
        stream = srv.client.completions.create(model="alpha", prompt=PROMPT, max_tokens=4000, stream=True,
                                               extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        received = 1
        with pytest.raises((httpx.HTTPError, openai.APIError)):    # the stream is cut, never [DONE]
            for _ in it:
                received += 1
        assert srv.proc.wait(30) == 0
        assert time.monotonic() - t0 < 15
        assert received < 4000
        srv._reader.join(5)
        assert "SIGTERM: shutting down" in srv.output and srv.lines[-1] == "adapterkit serve: stopped"
    finally:
        srv.stop()
