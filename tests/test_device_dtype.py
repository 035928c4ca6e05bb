"""--device / --dtype: one resolver with clear refusals, a fingerprint that ignores dtype and device,
bf16 / fp16 bases that load, generate, train and export on CPU, a bf16 export half the size that
transformers loads, the engine in bf16, an audit that the engine's hot path makes no tensor without
naming its device, and (with a GPU) the same runs on CUDA compared with the host's fp32 results."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import ATTN, save_tiny, save_tiny_tokenizer, tiny_llama
from safetensors import safe_open
from typer.testing import CliRunner

import adapterkit.core.base as base_mod
from adapterkit import Adapter, AdapterRuntime, ConfigError, LoraConfig, create_adapter, generate, load_base
from adapterkit.core.base import available_devices, default_dtype, fingerprint, resolve_device, resolve_dtype
from adapterkit.cli.main import app
from adapterkit.data import Example
from adapterkit.serve.engine import Engine, EngineConfig
from adapterkit.serve.requests import GenerationRequest, SamplingParams
from adapterkit.store import AdapterStore
from adapterkit.train.causal_lm import collate, encode
from adapterkit.train.instruct import evaluate_instructions, lm_loss
from adapterkit.train.run import train_classifier
from adapterkit.train.trainer import TrainConfig, train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]   # cpu runs the same code paths here
runner = CliRunner()
RECORDS = [{"prompt": "hello world", "completion": "the cat"}, {"prompt": "the dog", "completion": "runs fast"},
           {"prompt": "give me", "completion": "one tip"}, {"prompt": "write code", "completion": "clear code"}]


def no_gpu(monkeypatch) -> None:
    """This process sees neither CUDA nor MPS (whatever the machine has)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def nonzero(name: str, base, seed: int = 0, std: float = 0.5) -> Adapter:
    cfg = LoraConfig(r=4, target_modules=ATTN, init="nonzero", init_std=std)
    return create_adapter(name, base.model, cfg, seed=seed, fingerprint=base.fingerprint, base_name=base.name)


def file_dtypes(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


# ------------------------------------------------------------------ the resolver

def test_default_device_is_the_best_available_and_cpu_here(monkeypatch):
    assert resolve_device(None) == resolve_device("auto") == torch.device(available_devices()[0])
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device(None) == torch.device("cpu")
    no_gpu(monkeypatch)
    assert available_devices() == ["cpu"] and resolve_device(None) == torch.device("cpu")
    assert resolve_dtype(None, "cpu") == default_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("mps") and resolve_dtype(None, "mps") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert available_devices() == ["cuda", "mps", "cpu"] and resolve_device(None) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_dtype(None, "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert resolve_dtype(None, "cuda") == torch.float32          # no bf16 units: fp32, never fp16 by default


def test_absent_devices_and_unknown_names_are_refused_with_the_choices(monkeypatch, tiny_llm_dir):
    no_gpu(monkeypatch)
    with pytest.raises(ConfigError, match=r"device 'cuda' is not available: .*; available here: cpu$"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"device 'mps' is not available: Apple's Metal \(MPS\) backend is not "
                                          r"available; available here: cpu"):
        resolve_device("mps")
    with pytest.raises(ConfigError, match=r"device 'cuda' is not available"):
        load_base(str(tiny_llm_dir), device="cuda")               # before any weight is read
    for bad in ("tpu", "gpu", "cuda:x"):
        with pytest.raises(ConfigError, match=rf"unknown device '{bad}'; use one of cpu, cuda, mps"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"device 'cuda:3' does not exist: this machine has 1 CUDA GPU\(s\), cuda:0"):
        resolve_device("cuda:3")
    for bad in ("int8", "float64", torch.float64):
        with pytest.raises(ConfigError, match=r"unknown dtype .*; use one of float32, bfloat16, float16$"):
            resolve_dtype(bad)
    assert [resolve_dtype(n) for n in ("bf16", "fp16", "fp32", "torch.bfloat16", torch.float16)] == \
        [torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float16]


def test_cli_refuses_an_absent_device_and_documents_the_defaults(monkeypatch, tiny_llm_dir, tmp_path):
    no_gpu(monkeypatch)
    monkeypatch.delenv("ADAPTERKIT_DEVICE")
    for args in (["generate", "hi", "--base", str(tiny_llm_dir)], ["serve", "--base", str(tiny_llm_dir), "--port", "0"],
                 ["adapter", "export-merged", "x", "--base", str(tiny_llm_dir), "--out", str(tmp_path / "m")],
                 ["train", "--name", "t", "--base", str(tiny_llm_dir), "--store", str(tmp_path / "s")],
                 ["demo", "--base", str(tiny_llm_dir), "--store", str(tmp_path / "s")]):
        if args[0] == "adapter":
            nonzero("x", load_base(str(tiny_llm_dir))).save(tmp_path / "x")
            args[2] = str(tmp_path / "x")
        res = runner.invoke(app, [*args, "--device", "cuda"])
        assert res.exit_code == 2 and "device 'cuda' is not available" in res.output, (args, res.output)
        assert "available here: cpu" in res.output
        res = runner.invoke(app, [*args, "--dtype", "int8"])
        assert res.exit_code == 2 and "unknown dtype 'int8'; use one of float32, bfloat16, float16" in res.output
    assert not (tmp_path / "m").exists()
    for command in (["generate"], ["train"], ["eval"], ["serve"], ["adapter", "export-merged"], ["demo"]):
        text = " ".join(runner.invoke(app, [*command, "--help"]).output.replace("│", " ").split())
        assert "--device" in text and "the best available (cuda, then mps, then cpu)" in text, command
        assert "--dtype" in text
        assert ("float32 (the default, whatever the machine)" in text if command[0] == "adapter" else
                "bfloat16 on a CUDA GPU that supports it, else float32" in text), command


# ------------------------------------------------------------------ fingerprint

def test_fingerprint_ignores_dtype_and_adapters_cross_dtypes(tiny_llm_dir):
    fp32 = load_base(str(tiny_llm_dir))
    loads = {dt: load_base(str(tiny_llm_dir), dtype=dt) for dt in ("bfloat16", "float16")}
    assert fp32.dtype == torch.float32 and fp32.device == torch.device("cpu")
    for name, b in loads.items():
        assert b.dtype == getattr(torch, name) and b.fingerprint == fp32.fingerprint, name
    # why fp16 is fingerprinted on its fp32 load: fp32 -> fp16 -> bf16 rounds small weights otherwise
    assert fingerprint(tiny_llama().half()) != fingerprint(tiny_llama())
    adapter = nonzero("a", fp32)                                   # made (and kept) in fp32
    for b in loads.values():
        rt = AdapterRuntime.from_base(b)
        rt.add(adapter)
        pool = rt._sites["model.layers.0.self_attn.q_proj"].pools["lora"]
        assert pool.a_stack.dtype == b.dtype and pool.sources[1][0].dtype == b.dtype
        assert adapter.tensors["model.layers.0.self_attn.q_proj"]["lora_A"].dtype == torch.float32


# ------------------------------------------------------------------ bf16 / fp16 on CPU

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_loads_generates_trains_and_exports(tiny_llm_dir, tmp_path, dtype):
    b = load_base(str(tiny_llm_dir), dtype=dtype)
    assert b.dtype == dtype and b.device.type == "cpu"
    rt = AdapterRuntime.from_base(b)
    rt.add(nonzero("a", b))
    prompt = ["hello world the cat"]
    with_a, without = (generate(rt, b.tokenizer, prompt, [row], max_new_tokens=6, min_new_tokens=6)[0]
                       for row in ("a", None))
    assert len(with_a.token_ids) == 6 and with_a.error is None and with_a.token_ids != without.token_ids
    # train: fp32 master weights on the low-precision base; they change and stay fp32
    adapter = rt.adapters["a"]
    before = {k: t.clone() for k, t in adapter.tensors["model.layers.0.self_attn.v_proj"].items()}
    examples = [encode(b.tokenizer, r, 16) for r in RECORDS]
    result = train(rt, "a", examples, lambda xs: collate(xs, 0), lm_loss, TrainConfig(steps=4, batch_size=2, lr=1e-2))
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    after = adapter.tensors["model.layers.0.self_attn.v_proj"]
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in after.values())
    assert not torch.equal(after["lora_B"], before["lora_B"])
    assert rt._sites["model.layers.0.self_attn.v_proj"].pools["lora"].b_stack.dtype == dtype
    assert evaluate_instructions(rt, "a", RECORDS[:2], 16)["loss"] > 0
    # export in the base's dtype (the default) and transformers' reading of it
    out = rt.export_merged(tmp_path / "merged", ["a"], tokenizer=b.tokenizer)
    name = str(dtype).removeprefix("torch.")
    assert file_dtypes(out / "model.safetensors") == {"BF16" if dtype == torch.bfloat16 else "F16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == name
    assert load_base(str(out), dtype=dtype).fingerprint != b.fingerprint


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_bf16_autocast_keeps_fp32_master_weights_on_either_base(tiny_llm_dir, base_dtype):
    """--bf16 (autocast: bf16 matmuls) and --dtype (the stored base) are independent and combine."""
    b = load_base(str(tiny_llm_dir), dtype=base_dtype)
    rt = AdapterRuntime.from_base(b)
    rt.add(nonzero("a", b, std=0.1))
    examples = [encode(b.tokenizer, r, 16) for r in RECORDS]
    plain = train(rt, "a", examples, lambda xs: collate(xs, 0), lm_loss, TrainConfig(steps=2, batch_size=2))
    rt.remove("a")
    rt.add(nonzero("a", b, std=0.1))
    auto = train(rt, "a", examples, lambda xs: collate(xs, 0), lm_loss, TrainConfig(steps=2, batch_size=2, bf16=True))
    assert auto.losses == pytest.approx(plain.losses, rel=0.05) and auto.losses != plain.losses
    assert {t.dtype for parts in rt.adapters["a"].tensors.values() for t in parts.values()} == {torch.float32}


def test_bf16_export_is_half_the_size_rounds_once_and_matches_the_merged_forward(tiny_llm_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    b = load_base(str(tiny_llm_dir))
    rt = AdapterRuntime.from_base(b)
    rt.add(nonzero("a", b, std=0.1))     # std 0.5 makes the tiny model itself ill-conditioned: fp32 vs bf16 18%
    full = rt.export_merged(tmp_path / "fp32", ["a"], tokenizer=b.tokenizer)
    half = rt.export_merged(tmp_path / "bf16", ["a"], tokenizer=b.tokenizer, dtype=torch.bfloat16)
    assert rt.merged == [] and b.dtype == torch.float32                 # the runtime is left as it was
    ratio = (half / "model.safetensors").stat().st_size / (full / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55, ratio
    assert file_dtypes(full / "model.safetensors") == {"F32"} and file_dtypes(half / "model.safetensors") == {"BF16"}
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    rt.merge("a")
    try:
        state = rt.model.state_dict()
        with safe_open(str(half / "model.safetensors"), "pt") as f:      # each weight rounded once from fp32
            for key in f.keys():
                assert torch.equal(f.get_tensor(key), state[key].to(torch.bfloat16)), key
        with torch.no_grad():
            want = rt.model(ids).logits                                  # the runtime's merged fp32 forward
    finally:
        rt.unmerge()
    with torch.no_grad():
        plain = rt.model(ids).logits
    tol = 4 * 2 ** -8 * float(want.abs().max())
    assert float((want - plain).abs().max()) > 5 * tol                     # the adapter changes the logits
    model = AutoModelForCausalLM.from_pretrained(str(half))              # reads config.json's dtype
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        got = model(ids).logits.float()
    # bf16 keeps 8 significant bits (relative step 2^-8); through 2 layers the logits stay within a few steps
    torch.testing.assert_close(got, want, rtol=0, atol=tol)


def test_bf16_export_keeps_tied_weights_one_tensor(tmp_path):
    path = tmp_path / "tied"
    tiny_llama(tie_word_embeddings=True).save_pretrained(str(path))
    b = load_base(str(path))
    rt = AdapterRuntime.from_base(b)
    rt.add(nonzero("a", b))
    out = rt.export_merged(tmp_path / "out", ["a"], dtype=torch.bfloat16)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    again = load_base(str(out), dtype=torch.bfloat16).model
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()


def test_merging_into_a_bf16_base_rounds_once_and_unmerges_exactly(tiny_llm_dir):
    b = load_base(str(tiny_llm_dir), dtype=torch.bfloat16)
    rt = AdapterRuntime.from_base(b)
    a = nonzero("a", b)
    rt.add(a)
    module = rt.model.model.layers[0].self_attn.q_proj
    w = module.weight.detach().clone()
    rt.merge("a")
    site = "model.layers.0.self_attn.q_proj"
    delta = a.method.delta_weight(a.config, rt._sites[site].info, a.tensors[site])
    assert torch.equal(module.weight, (w.float() + delta).to(torch.bfloat16))
    rt.unmerge()
    assert torch.equal(module.weight, w)


# ------------------------------------------------------------------ the engine

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("device")
    base = save_tiny("llama", tmp / "base")
    save_tiny_tokenizer(base)
    b = load_base(str(base))
    for i, name in enumerate(["a", "b", "c"]):
        nonzero(name, b, seed=i).save(tmp / "adapters" / name)
    prompts = {name: [1] + torch.randint(4, 97, (4 + 3 * i,), generator=torch.Generator().manual_seed(i)).tolist()
               for i, name in enumerate(["a", "b", "c", None])}
    return SimpleNamespace(base=base, adapters=tmp / "adapters", prompts=prompts)


GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def engine_tokens(env, device="cpu", dtype=None, start=True, prompts=None) -> dict:
    eng = Engine.build(str(env.base), adapter_dirs=[env.adapters], config=EngineConfig(), device=device, dtype=dtype)
    streams = {n: eng.submit(GenerationRequest(ids, adapter=n, params=GREEDY))
               for n, ids in (prompts or env.prompts).items()}
    if not start:
        return eng, streams
    eng.start()
    try:
        return {n: s.result(timeout=60) and s.token_ids for n, s in streams.items()}
    finally:
        eng.stop()


def assert_near_greedy(env, got: dict, device, dtype) -> None:
    """Each engine token is, on the engine's own path, the HF forward's argmax or within rounding of it
    (the tiny random model's logits are ~0.4 with top-2 gaps down to 1e-4: bf16 ties decide some steps)."""
    b = load_base(str(env.base), dtype=dtype, device=device)
    rt = AdapterRuntime.from_base(b)
    for n in "abc":
        rt.add(Adapter.load(env.adapters / n))
    exact = total = 0
    for n, ids in env.prompts.items():
        with torch.no_grad(), rt.batch([n]):
            logits = rt.model(torch.tensor([ids + got[n]], device=device)).logits[0, len(ids) - 1:-1].float().cpu()
        tol = 8 * 2 ** -8 * float(logits.abs().max())        # 8 bf16 steps at the logits' scale
        picked = logits[torch.arange(len(got[n])), torch.tensor(got[n])]
        assert bool((picked >= logits.max(-1).values - tol).all()), (n, got[n])
        exact += int((logits.argmax(-1) == torch.tensor(got[n])).sum())
        total += len(got[n])
    assert exact >= 0.8 * total, (exact, total)


def test_engine_in_bf16_on_cpu_follows_hf_within_rounding(env):
    fp32 = engine_tokens(env)
    got = engine_tokens(env, dtype="bfloat16")
    assert all(len(t) == GREEDY.max_tokens for t in got.values())
    assert_near_greedy(env, got, "cpu", torch.bfloat16)
    assert sum(got[n] == fp32[n] for n in got) >= 2          # most rows agree with fp32 outright
    eng = Engine.build(str(env.base), adapter_dirs=[env.adapters], dtype="bfloat16")
    cache = eng.decoder.new_cache(4)
    assert cache.k.dtype == torch.bfloat16 and eng.decoder.bytes_per_token() == 2 * 2 * 2 * 8 * 2


def test_engine_hot_path_makes_no_tensor_without_naming_its_device(env, monkeypatch):
    """Factory calls without a device follow torch's default device: set it to "meta" (no data) and
    any tensor the engine made implicitly would fail the step. Host metadata (ids, plans, sampling)
    says device="cpu"; everything else follows the model. Prefill runs the segment kernel, decode the
    span kernel (the gather kernel with it turned off), a one-adapter engine the dense kernel: all four are
    covered."""
    import adapterkit.methods.kernels as kernels
    import adapterkit.methods.lora_pool as lora

    failed, forward = [], Engine._forward

    def batch_forward(self, batch):              # a failed batch forward would be retried row by row, unseen
        try:
            return forward(self, batch)
        except Exception as exc:
            failed.append(exc)
            raise
    monkeypatch.setattr(Engine, "_forward", batch_forward)
    used = []
    for kernel in ("dense_kernel", "gather_kernel", "segment_kernel", "span_kernel"):
        real = getattr(lora, kernel)
        monkeypatch.setattr(lora, kernel, lambda *a, _real=real, _k=kernel: used.append(_k) or _real(*a))
    long = {n: ids * 3 for n, ids in env.prompts.items()}                # >= 8 tokens per adapter: segments
    sampled = GenerationRequest(env.prompts["a"], adapter="a", params=SamplingParams(max_tokens=5, temperature=0.9,
                                                                                     seed=1, ignore_eos=True))
    want = engine_tokens(env, prompts=long)
    for prompts, span in ((long, True), ({"a": long["a"], None: long[None]}, True), (long, False)):
        monkeypatch.setattr(kernels, "SPAN_MAX_PADDING", 1.0 if span else -1.0)
        eng, streams = engine_tokens(env, start=False, prompts=prompts)
        extra = eng.submit(sampled)
        with torch.device("meta"):
            for _ in range(GREEDY.max_tokens + 2):
                eng.step()
        assert {n: s.token_ids for n, s in streams.items()} == {n: want[n] for n in prompts}
        assert len(extra.token_ids) == 5 and extra.final.error is None
        assert not failed, failed[0]
    assert {"dense_kernel", "gather_kernel", "segment_kernel", "span_kernel"} <= set(used)


@pytest.mark.parametrize("device", DEVICES)
def test_engine_greedy_on_a_device_equals_the_host_fp32_tokens(env, device):
    want = engine_tokens(env)
    assert engine_tokens(env, device=device, dtype="float32") == want     # fp32 (no TF32): the same tokens
    assert_near_greedy(env, engine_tokens(env, device=device, dtype="bfloat16"), device, torch.bfloat16)
    eng = Engine.build(str(env.base), adapter_dirs=[env.adapters], device=device)
    assert eng.decoder.new_cache(4).k.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_on_a_device_equal_the_host(env, device):
    host, dev = load_base(str(env.base)), load_base(str(env.base), dtype="float32", device=device)
    runtimes = [AdapterRuntime.from_base(host), AdapterRuntime.from_base(dev)]
    for rt in runtimes:
        for n in "abc":
            rt.add(Adapter.load(env.adapters / n))
    ids = torch.randint(3, 97, (6, 9), generator=torch.Generator().manual_seed(1))
    rows = ["a", "b", "c", None, {"a": 0.5, "c": 0.5}, "b"]
    for kernel in ("dense", "gather"):
        outs = []
        for rt in runtimes:
            with torch.no_grad(), rt.batch(rows, kernel=kernel):
                outs.append(rt.model(ids.to(rt.device)).logits.cpu())
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    flat = torch.tensor([1, 2, 3] * 6)                          # per-token ids: the segment kernel
    outs = []
    for rt in runtimes:
        with torch.no_grad(), rt.use(rt.batch_from_ids(flat, mode="token", kernel="segment")):
            outs.append(rt.model(ids.flatten()[None, :18].to(rt.device)).logits.cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_training_on_a_device_equals_the_host_and_returns_the_adapter_home(env, device, tmp_path):
    """A classifier (LoRA + head) trained on the device: same losses and scores as on the host; the
    adapter comes back to the host in fp32; the stored adapter evaluates the same on either."""
    rows = [("the cat runs fast", "feline"), ("a cat is on the mat", "feline"), ("the dog runs slow", "canine"),
            ("a dog is on the mat", "canine")]
    examples = [Example(t, y) for t, y in rows]
    results = []
    for i, where in enumerate(("cpu", device)):
        b = load_base(str(env.base), dtype="float32", device=where)
        store = AdapterStore(tmp_path / f"store-{i}")
        adapter, metrics = train_classifier(b, "cls", examples, examples, task=None, store=store, progress=False,
                                            config=TrainConfig(steps=3, batch_size=2, lr=1e-2, eval_every=3),
                                            targets=["q_proj", "v_proj"])
        assert all(t.device.type == "cpu" and t.dtype == torch.float32
                   for parts in adapter.tensors.values() for t in parts.values())
        assert adapter.head.weight.device.type == where
        results.append((metrics, json.loads((store.root / "runs" / "cls" / "train_log.jsonl").read_text()
                                            .splitlines()[-1])["loss"], store.get("cls")))
    (m_host, loss_host, a_host), (m_dev, loss_dev, a_dev) = results
    assert m_dev == m_host and loss_dev == pytest.approx(loss_host, rel=1e-4)
    for site, parts in a_host.tensors.items():      # AdamW steps are ~lr = 1e-2: float noise stays far below
        for k, t in parts.items():
            torch.testing.assert_close(a_dev.tensors[site][k], t, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_a_retrieval_encoder_over_a_base_on_any_device_returns_host_rows(env, device):
    """route/encoder.py moves its batches to the model's device and returns pooled rows on the host,
    so the server's `auto` can encode with the served base wherever it runs."""
    from adapterkit.route import Encoder

    texts = ["hello world the cat", "a dog", "code and code and tip"]
    host, dev = load_base(str(env.base)), load_base(str(env.base), dtype="float32", device=device)
    want = Encoder.from_base(host).embed(texts)
    got = Encoder.from_base(dev).embed(texts)
    assert got.device.type == "cpu" and got.shape == (3, 32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_trainable_tensors_away_from_the_base_are_refused(tiny_llm_dir):
    b = load_base(str(tiny_llm_dir))
    rt = AdapterRuntime.from_base(b)
    a = nonzero("a", b)
    site = "model.layers.0.self_attn.q_proj"
    a.tensors[site]["lora_A"] = a.tensors[site]["lora_A"].to("meta").requires_grad_(True)
    with pytest.raises(ConfigError, match=r"trainable tensors at model.layers.0.self_attn.q_proj are on "
                                          r"\{'lora_A': 'meta'\}, the base on cpu; move them"):
        rt.add(a)
    assert rt.names == []
    rt.add(nonzero("b", b))
    with pytest.raises(ConfigError, match=r"extra_params of shapes \[\(2,\)\] are not on the base's device cpu"):
        train(rt, "b", [1], lambda xs: {}, lm_loss, TrainConfig(steps=1), extra_params=[torch.zeros(2, device="meta")])


# ------------------------------------------------------------------ CLI

def test_cli_generate_train_eval_and_export_take_dtype_and_device(tiny_llm_dir, tmp_path):
    b = load_base(str(tiny_llm_dir))
    nonzero("x", b).save(tmp_path / "x")
    base = ["--base", str(tiny_llm_dir)]
    res = runner.invoke(app, ["generate", "hello world", *base, "--adapter", str(tmp_path / "x"), "--max-tokens", "4",
                              "--dtype", "bfloat16", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output.splitlines()[-1])["token_ids"]) <= 4
    res = runner.invoke(app, ["adapter", "export-merged", str(tmp_path / "x"), *base, "--out", str(tmp_path / "m"),
                              "--dtype", "bfloat16"])
    assert res.exit_code == 0 and "(bfloat16)" in res.output, res.output
    assert file_dtypes(tmp_path / "m" / "model.safetensors") == {"BF16"}
    res = runner.invoke(app, ["adapter", "export-merged", str(tmp_path / "x"), *base, "--out", str(tmp_path / "m32")])
    assert res.exit_code == 0 and file_dtypes(tmp_path / "m32" / "model.safetensors") == {"F32"}
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in
                            [("the cat", "feline"), ("a cat", "feline"), ("the dog", "canine"), ("a dog", "canine")]))
    store = ["--store", str(tmp_path / "store")]
    res = runner.invoke(app, ["train", "--name", "toy", *base, "--train-file", str(data), "--steps", "2",
                              "--batch-size", "2", "--dtype", "bfloat16", "--no-progress", *store])
    assert res.exit_code == 0, res.output
    trained = AdapterStore(tmp_path / "store").get("toy")
    assert {t.dtype for parts in trained.tensors.values() for t in parts.values()} == {torch.float32}
    assert trained.meta.base_fingerprint == b.fingerprint                 # a bf16 run records the same base
    res = runner.invoke(app, ["eval", "toy", "--file", str(data), *base, "--dtype", "float16", "--json",
                              "--no-progress", *store])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n"] == 4


def test_cli_defaults_come_from_the_machine_or_the_environment(monkeypatch, tiny_llm_dir):
    """No flag: the best available device (cpu here) in its default dtype. ADAPTERKIT_DEVICE /
    ADAPTERKIT_DTYPE set the defaults (the suite pins the host with the first)."""
    no_gpu(monkeypatch)
    seen, real = [], base_mod.load_base
    monkeypatch.setattr(base_mod, "load_base", lambda *a, **k: seen.append(k) or real(*a, **k))
    gen = ["generate", "hello", "--base", str(tiny_llm_dir), "--max-tokens", "2", "--json"]
    monkeypatch.delenv("ADAPTERKIT_DEVICE")
    assert runner.invoke(app, gen).exit_code == 0
    assert seen[-1] == {"dtype": torch.float32, "device": torch.device("cpu")}
    monkeypatch.setenv("ADAPTERKIT_DTYPE", "bfloat16")
    assert runner.invoke(app, gen).exit_code == 0
    assert seen[-1] == {"dtype": torch.bfloat16, "device": torch.device("cpu")}
    assert runner.invoke(app, [*gen, "--dtype", "float16"]).exit_code == 0
    assert seen[-1]["dtype"] == torch.float16                           # the flag wins over the environment
    monkeypatch.setenv("ADAPTERKIT_DEVICE", "cuda")
    res = runner.invoke(app, gen)
    assert res.exit_code == 2 and "device 'cuda' is not available" in res.output
