"""The continuous-batching engine: flat forward == HF, greedy == PEFT per adapter with requests for
8 adapters batched together (joining and leaving mid-flight), sampling, stop strings, cancellation,
admission control and shutdown."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import ATTN, save_tiny, save_tiny_tokenizer, tiny_llama

from adapterkit import AdapterNotFoundError, ConfigError
from adapterkit.serve.engine import Engine, EngineConfig, EngineStoppedError
from adapterkit.serve.forward import FlatDecoder, Segment
from adapterkit.serve.requests import (ContextLengthError, GenerationRequest, QueueFullError, SamplingParams)
from adapterkit.serve.sampling import filter_logits

peft = pytest.importorskip("peft")
NAMES = [f"t{i}" for i in range(8)]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


def prompt(i: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(100 + i)
    return [1] + torch.randint(4, 97, (n - 1,), generator=g).tolist()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny Llama folder (+ tokenizer) and 8 PEFT LoRAs of different ranks/alphas/targets."""
    tmp = tmp_path_factory.mktemp("engine")
    base = save_tiny("llama", tmp / "base")
    save_tiny_tokenizer(base)
    for i, name in enumerate(NAMES):
        torch.manual_seed(i)
        cfg = peft.LoraConfig(r=2 + i % 3, lora_alpha=4 + i, init_lora_weights=False,
                              target_modules=ATTN if i % 2 == 0 else ["q_proj", "v_proj"])
        pm = peft.get_peft_model(tiny_llama(), cfg)
        with torch.no_grad():                      # larger B so every adapter changes the greedy tokens
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(20)
        pm.save_pretrained(str(tmp / "adapters" / name))
    return SimpleNamespace(base=base, adapters=tmp / "adapters", tmp=tmp)


def engine(env, **cfg) -> Engine:
    loaded = cfg.pop("max_loaded", 8)
    return Engine.build(str(env.base), adapter_dirs=[env.adapters], config=EngineConfig(**cfg),
                        max_loaded_adapters=loaded).start()


def peft_greedy(env, name: str | None, ids: list[int], n: int) -> list[int]:
    """PEFT's own single-adapter greedy generation (HF generate), up to EOS."""
    model = tiny_llama()
    if name is not None:
        model = peft.PeftModel.from_pretrained(model, str(env.adapters / name)).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=2,
                             pad_token_id=0)[0, len(ids):].tolist()
    return out[: out.index(2)] if 2 in out else out


def test_flat_decoder_equals_hf_forward_for_ragged_prefill_chunks_and_decode():
    model = tiny_llama()
    fd = FlatDecoder(model)
    a, b = torch.tensor(prompt(0, 9)), torch.tensor(prompt(1, 4))
    with torch.no_grad():
        ref_a, ref_b = model(a[None]).logits[0], model(b[None]).logits[0]
    ca, cb = fd.new_cache(12), fd.new_cache(12)
    h = fd.hidden(torch.cat([a[:6], b]), torch.cat([torch.arange(6), torch.arange(4)]),
                  [Segment(ca, 0, 6), Segment(cb, 6, 4)])
    torch.testing.assert_close(fd.logits(h), torch.cat([ref_a[:6], ref_b]), rtol=1e-5, atol=1e-5)
    h = fd.hidden(a[6:8], torch.arange(6, 8), [Segment(ca, 0, 2)])          # a chunk after cached tokens
    torch.testing.assert_close(fd.logits(h), ref_a[6:8], rtol=1e-5, atol=1e-5)
    h = fd.hidden(a[8:9], torch.tensor([8]), [Segment(ca, 0, 1)])           # one decode token
    torch.testing.assert_close(fd.logits(h), ref_a[8:9], rtol=1e-5, atol=1e-5)
    assert (ca.length, cb.length) == (9, 4)


def test_other_architectures_are_refused_with_the_reason():
    from conftest import tiny_gpt2
    from transformers import GPT2LMHeadModel

    with pytest.raises(Exception, match="the serving engine runs Llama-architecture decoders"):
        FlatDecoder(GPT2LMHeadModel(tiny_gpt2().config))


@pytest.mark.parametrize("max_batch, max_loaded", [(8, 8), (3, 2)], ids=["all-together", "join-and-leave"])
def test_concurrent_requests_on_8_adapters_equal_peft_greedy(env, max_batch, max_loaded):
    """8 requests (different adapters, prompt lengths) + 2 base rows submitted at once. With
    max_batch=3 and 2 adapter slots, requests join as others leave and wait for slots."""
    eng = engine(env, max_batch=max_batch, max_loaded=max_loaded)
    try:
        jobs = [(name, prompt(i, 3 + i)) for i, name in enumerate(NAMES)] + [(None, prompt(20, 5)), (None, prompt(21, 2))]
        streams = [eng.submit(GenerationRequest(ids, adapter=name, params=GREEDY)) for name, ids in jobs]
        got = [s.result(timeout=60) and s.token_ids for s in streams]
    finally:
        eng.stop()
    want = [peft_greedy(env, name, ids, GREEDY.max_tokens) for name, ids in jobs]
    assert got == want
    assert len({tuple(w) for w in want[:8]}) == 8          # the adapters really differ
    stats = eng.cache.stats()
    assert stats["loads"] == 8 and all(e["refs"] == 0 for e in stats["active"].values())


def test_seeded_sampling_does_not_depend_on_batch_companions(env):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=20, seed=7)
    eng = engine(env)
    try:
        alone = eng.submit(GenerationRequest(prompt(3, 6), adapter="t1", params=params))
        alone.result(timeout=30)
        crowd = [eng.submit(GenerationRequest(prompt(i, 4 + i), adapter=NAMES[i], params=SamplingParams(
            max_tokens=12, temperature=1.0, seed=i))) for i in range(5)]
        again = eng.submit(GenerationRequest(prompt(3, 6), adapter="t1", params=params))
        other = eng.submit(GenerationRequest(prompt(3, 6), adapter="t1", params=SamplingParams(
            max_tokens=12, temperature=0.9, top_p=0.9, top_k=20, seed=8)))
        for s in crowd + [again, other]:
            s.result(timeout=30)
    finally:
        eng.stop()
    assert again.token_ids == alone.token_ids
    assert other.token_ids != alone.token_ids


def test_filter_logits_top_k_top_p_temperature():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    x = filter_logits(logits, SamplingParams(temperature=0.5, top_k=3))
    assert torch.isinf(x[3:]).all() and torch.equal(x[:3], logits[:3] / 0.5)
    # probabilities 0.563, 0.207, 0.126, 0.076, 0.028: the first two reach 0.770 < 0.8, three reach 0.896
    x = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert torch.isfinite(x[:3]).all() and torch.isinf(x[3:]).all()
    x = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert torch.isfinite(x[:1]).all() and torch.isinf(x[1:]).all()        # the top token always stays
    assert SamplingParams(temperature=0.7, top_k=1).greedy


@pytest.mark.parametrize("bad, message", [
    (dict(max_tokens=0), "max_tokens must be an integer >= 1, got 0"),
    (dict(temperature=-1.0), "temperature must be 0 (greedy) or in [0.0001, 100], got -1.0"),
    (dict(temperature=1e-40), "temperature must be 0 (greedy) or in [0.0001, 100], got 1e-40"),
    (dict(temperature=float("nan")), "temperature must be 0 (greedy) or in [0.0001, 100], got nan"),
    (dict(seed=-1), "seed must be an integer in [0, 2**63), got -1"),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    (dict(top_k=-2), "top_k must be an integer >= 0 (0 = off), got -2"),
    (dict(stop=[""]), "stop strings must be non-empty"),
])
def test_bad_sampling_params_are_refused(bad, message):
    with pytest.raises(ConfigError) as e:
        SamplingParams(**bad)
    assert str(e.value) == message


def test_stop_strings_cut_the_text_and_the_stream_never_shows_the_cut(env):
    eng = engine(env)
    try:
        ids = prompt(2, 5)
        full = eng.submit(GenerationRequest(ids, adapter="t2", params=SamplingParams(max_tokens=10, temperature=0)))
        full.result(timeout=30)
        words = full.text.split(" ")
        assert len(words) >= 4, full.text
        stop = " ".join(words[2:4])                       # spans two tokens
        s = eng.submit(GenerationRequest(ids, adapter="t2", params=SamplingParams(
            max_tokens=10, temperature=0, stop=["never-there", stop])))
        events = list(s)
    finally:
        eng.stop()
    assert s.final.finish_reason == "stop"
    assert s.text == full.text[: full.text.index(stop)]
    assert "".join(e.text for e in events) == s.text
    assert s.final.usage.completion_tokens == len(s.token_ids) < 10


def test_eos_ends_with_stop_unless_ignore_eos(env):
    eng = engine(env)
    try:
        # find a prompt whose greedy continuation hits EOS (token 2) by asking the reference
        for i in range(40):
            ids = prompt(i, 3)
            if len(peft_greedy(env, None, ids, 30)) < 30:
                break
        else:
            pytest.skip("no prompt reaches EOS on this tiny model")
        a = eng.submit(GenerationRequest(ids, params=SamplingParams(max_tokens=30, temperature=0)))
        b = eng.submit(GenerationRequest(ids, params=SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)))
        a.result(timeout=30), b.result(timeout=30)
    finally:
        eng.stop()
    assert a.final.finish_reason == "stop" and 2 not in a.token_ids
    assert b.final.finish_reason == "length" and len(b.token_ids) == 30 and 2 in b.token_ids
    assert b.token_ids[: len(a.token_ids)] == a.token_ids


def test_cancel_frees_the_sequence_its_kv_and_its_adapter(env):
    eng = engine(env)
    try:
        long = eng.submit(GenerationRequest(prompt(1, 4), adapter="t3", params=SamplingParams(
            max_tokens=100, temperature=0, ignore_eos=True)))
        it = iter(long)
        next(it)                                    # it is running
        long.cancel()
        rest = list(it)
        assert rest[-1].finish_reason == "cancelled" and len(long.token_ids) < 100
        deadline = time.monotonic() + 5
        while eng.metrics()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        m = eng.metrics()
        assert (m["running"], m["kv_reserved"]) == (0, 0)
        assert eng.cache.stats()["active"]["t3"]["refs"] == 0
    finally:
        eng.stop()


def test_submit_refuses_unknown_adapter_long_prompt_and_full_queue(env):
    eng = Engine.build(str(env.base), adapter_dirs=[env.adapters], config=EngineConfig(max_queue=2))   # not started
    with pytest.raises(AdapterNotFoundError) as e:
        eng.submit(GenerationRequest([1, 2], adapter="nope"))
    assert str(e.value) == f"unknown adapter 'nope'; served adapters: {', '.join(NAMES)}"
    with pytest.raises(ContextLengthError) as e:
        eng.submit(GenerationRequest([1] * 120, params=SamplingParams(max_tokens=10)))
    assert str(e.value) == ("the prompt has 120 tokens and max_tokens is 10: 130 > the model's context of 128 "
                            "tokens; shorten the prompt or lower max_tokens")
    eng.submit(GenerationRequest([1, 2]))
    eng.submit(GenerationRequest([1, 2]))
    with pytest.raises(QueueFullError) as e:
        eng.submit(GenerationRequest([1, 2]))
    assert str(e.value) == "the request queue is full (2 waiting); retry later"
    with pytest.raises(ConfigError, match="the prompt is empty"):
        GenerationRequest([])


def test_kv_budget_limits_how_many_sequences_run_together(env):
    # each request reserves 4 + 8 = 12 tokens; a 30-token budget runs two at a time
    eng = engine(env, kv_budget_tokens=30)
    peak = []
    orig = eng.step

    def spy(*a, **k):
        orig(*a, **k)
        peak.append(eng.metrics()["kv_reserved"])
    eng.step = spy
    try:
        streams = [eng.submit(GenerationRequest(prompt(i, 4), adapter=NAMES[i], params=SamplingParams(
            max_tokens=8, temperature=0, ignore_eos=True))) for i in range(5)]
        for s in streams:
            s.result(timeout=30)
        with pytest.raises(ContextLengthError, match="exceed the engine's KV budget of 30 tokens"):
            eng.submit(GenerationRequest([1] * 25, params=SamplingParams(max_tokens=8)))
    finally:
        eng.stop()
    assert max(peak) == 24 and all(len(s.token_ids) == 8 for s in streams)


def test_a_corrupt_adapter_fails_only_its_request(env, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(env.adapters / "t0", bad / "broken")
    (bad / "broken" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    eng = Engine.build(str(env.base), adapter_dirs=[env.adapters, bad]).start()
    try:
        broken = eng.submit(GenerationRequest([1, 5, 6], adapter="broken", params=GREEDY))
        fine = eng.submit(GenerationRequest([1, 5, 6], adapter="t0", params=GREEDY))
        assert broken.result(timeout=30).finish_reason == "error"
        assert "broken" in str(broken.final.error)
        assert fine.result(timeout=30).finish_reason in ("length", "stop") and fine.token_ids
    finally:
        eng.stop()


def test_stop_drains_or_cancels_and_then_refuses(env):
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    eng = engine(env)
    s = eng.submit(GenerationRequest([1, 5, 6], adapter="t0", params=params))
    eng.stop(drain=True)
    assert s.final.finish_reason == "length" and len(s.token_ids) == 20
    with pytest.raises(EngineStoppedError, match="shutting down"):
        eng.submit(GenerationRequest([1, 5, 6]))
    eng = engine(env)
    s = eng.submit(GenerationRequest([1, 5, 6], params=SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)))
    next(iter(s))
    eng.stop(drain=False)
    assert s.final.finish_reason == "cancelled"


def test_streams_read_from_an_event_loop(env):
    import asyncio

    eng = engine(env)

    async def main():
        s = eng.submit(GenerationRequest([1, 5, 6], adapter="t1", params=GREEDY))
        return [ev async for ev in s], s

    try:
        events, s = asyncio.run(main())
    finally:
        eng.stop()
    assert events[-1].finished and "".join(e.text for e in events) == s.text
    assert [t for e in events for t in e.token_ids] == s.token_ids


def test_an_adapter_folder_added_after_start_is_found_on_first_request(env, tmp_path):
    import shutil

    root = tmp_path / "root"
    root.mkdir()
    eng = Engine.build(str(env.base), adapter_dirs=[root]).start()
    try:
        with pytest.raises(AdapterNotFoundError, match="unknown adapter 'late'; served adapters: none"):
            eng.submit(GenerationRequest([1, 5, 6], adapter="late", params=GREEDY))
        shutil.copytree(env.adapters / "t5", root / "late")
        s = eng.submit(GenerationRequest(prompt(5, 7), adapter="late", params=GREEDY))
        s.result(timeout=30)
    finally:
        eng.stop()
    assert s.token_ids == peft_greedy(env, "t5", prompt(5, 7), GREEDY.max_tokens)


def test_submit_never_waits_for_a_running_step(env):
    """The API thread submits while the engine thread is inside a (slowed) forward: submit (adapter
    lookup, prefetch) takes the cache's bookkeeping lock, the forward holds only the runtime lock."""
    eng = engine(env)
    inside, release = threading.Event(), threading.Event()
    orig = eng.decoder.hidden

    def slow(*a, **k):
        inside.set()
        release.wait(10)
        return orig(*a, **k)

    eng.decoder.hidden = slow
    try:
        first = eng.submit(GenerationRequest([1, 5, 6], adapter="t0", params=GREEDY))
        assert inside.wait(10)
        t0 = time.monotonic()
        second = eng.submit(GenerationRequest([1, 5, 7], adapter="t6", params=GREEDY))
        waited = time.monotonic() - t0
        release.set()
        first.result(timeout=30), second.result(timeout=30)
    finally:
        release.set()
        eng.stop()
    assert waited < 0.5, waited
    assert second.token_ids == peft_greedy(env, "t6", [1, 5, 7], GREEDY.max_tokens)


def test_a_row_with_several_weighted_adapters_equals_the_runtime_reference(env):
    """{name: weight} on one request (stacking / a router's top-k) next to single-adapter rows."""
    from adapterkit import Adapter, AdapterRuntime

    mix = {"t0": 0.7, "t3": 0.3}
    rt = AdapterRuntime(tiny_llama(), capacity=4)
    for name in mix:
        rt.add(Adapter.load(env.adapters / name))
    ids = prompt(9, 6)
    with torch.no_grad(), rt.batch([mix]):
        out = rt.model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=2,
                                pad_token_id=0)[0, len(ids):].tolist()
    want = out[: out.index(2)] if 2 in out else out
    eng = engine(env)
    try:
        mixed = eng.submit(GenerationRequest(ids, adapter=mix, params=GREEDY))
        single = eng.submit(GenerationRequest(ids, adapter="t0", params=GREEDY))
        mixed.result(timeout=30), single.result(timeout=30)
        counts = eng.metrics()["requests_total"]
    finally:
        eng.stop()
    assert mixed.token_ids == want != single.token_ids
    assert counts["t0+t3"] == 1
    with pytest.raises(ConfigError, match="adapter weights must be finite numbers; t1 is not"):
        GenerationRequest([1, 2], adapter={"t1": float("nan")})
