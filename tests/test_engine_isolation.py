"""One request never fails another (DESIGN.md convention 13): bad requests and bad adapters batched
with good requests fail alone, and every good request returns exactly the tokens it returns alone.

Bad ones, all admitted in the SAME first step as the good ones: an adapter whose weights are finite
but overflow the forward ("boom": NaN logits on its rows), an adapter with a NaN tensor (refused at
read), a request whose forward raises (the batch is re-run per sequence), one whose sampling raises,
one whose detokenizing raises. Mixes with 2 distinct adapters use the masked dense kernel; larger
mixes the gathered / segment kernels."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import ATTN, save_tiny, save_tiny_tokenizer

from adapterkit import LoraConfig, create_adapter, load_base
from adapterkit.errors import NonFiniteError
from adapterkit.formats.peft import write_peft
from adapterkit.serve.detok import Detokenizer
from adapterkit.serve.engine import Engine, EngineConfig
from adapterkit.serve.requests import GenerationRequest, SamplingParams

POISON = 50                       # a prompt holding this token gets a forward that raises
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)


def prompt(i: int, n: int = 6) -> list[int]:
    g = torch.Generator().manual_seed(10 + i)
    return [1] + torch.randint(4, 49, (n - 1,), generator=g).tolist()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("isolation")
    base_dir = save_tiny("llama", tmp / "base")
    save_tiny_tokenizer(base_dir)
    base = load_base(str(base_dir))
    root = tmp / "adapters"

    def lora(name, seed):
        return create_adapter(name, base.model, LoraConfig(r=4, alpha=8, target_modules=ATTN, init="nonzero",
                                                           init_std=0.3), seed=seed, fingerprint=base.fingerprint)
    for i, name in enumerate(["g1", "g2", "g3"]):
        lora(name, i).save(root / name)
    boom = lora("boom", 9)                        # |ΔW| = 2·4·1e34: finite in float32, overflows the forward
    for parts in boom.tensors.values():
        parts["lora_A"].fill_(1e17)
        parts["lora_B"].fill_(1e17)
    boom.save(root / "boom")
    wide = lora("wide", 11)                       # x @ A^T overflows (A = 3e38) though ΔW = A·B is small:
    for parts in wide.tensors.values():           # the masked dense kernel once leaked its inf·0 = NaN
        parts["lora_A"].fill_(3e38)               # into every row of the batch
        parts["lora_B"].fill_(1e-37)
    wide.save(root / "wide")
    nan = lora("nan", 10)
    next(iter(nan.tensors.values()))["lora_B"][0, 0] = float("nan")
    (root / "nan").mkdir()                        # a PEFT folder as another tool might write it
    write_peft(root / "nan", nan.config, nan.tensors, None)
    return SimpleNamespace(base_dir=base_dir, root=root)


def build(env) -> Engine:
    return Engine.build(str(env.base_dir), adapter_dirs=[env.root], config=EngineConfig(max_batch=16),
                        max_loaded_adapters=8)


def results(env, requests, engine: Engine | None = None) -> list[tuple[object, tuple[int, ...]]]:
    """(final event, generated tokens) per request, all submitted before the engine (default: a
    fresh one) starts, so the first step admits all of them together."""
    engine = engine or build(env)
    try:
        streams = [engine.submit(r) for r in requests]
        engine.start()
        for s in streams:
            s.result(timeout=60)
        return [(s.final, tuple(s.token_ids)) for s in streams]
    finally:
        engine.stop(drain=False)


def good_requests(adapters):
    out = []
    for i, a in enumerate(adapters):
        out.append(GenerationRequest(prompt_ids=prompt(i), adapter=a, params=GREEDY))
        out.append(GenerationRequest(prompt_ids=prompt(i, 9), adapter=a, params=SAMPLED))
    return out


@pytest.mark.parametrize("good, overflow, poison", [
    (["g1"], ["wide"], False), (["g1", "g2", "g3", None], ["boom", "wide"], False),
    (["g1", "g2", "g3", None], ["boom", "wide"], True)], ids=["dense-kernel", "gather-segment", "forward-raises"])
def test_bad_adapters_and_requests_fail_alone_and_good_ones_are_unchanged(env, good, overflow, poison, monkeypatch):
    """poison: one more request whose forward raises, so every step re-runs its sequences one by one
    (without it the first step runs all of them in ONE forward: the kernels must keep rows apart)."""
    goods = good_requests(good)
    want = [results(env, [r])[0] for r in goods]                      # each good request alone
    assert all(f.finish_reason == "length" for f, _ in want)

    import adapterkit.serve.sampling as sampling
    real_filter, real_add = sampling.filter_logits, Detokenizer.add

    def flaky_filter(logits, params):
        if params.seed == 666:
            raise RuntimeError("sampler exploded")
        return real_filter(logits, params)

    def flaky_add(self, token):
        if "zz-poison" in self.stop:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")
        return real_add(self, token)
    monkeypatch.setattr(sampling, "filter_logits", flaky_filter)
    monkeypatch.setattr(Detokenizer, "add", flaky_add)
    real_init = Engine.__init__

    def poisoned_engine(self, *a, **k):
        real_init(self, *a, **k)
        inner = self.decoder.hidden

        def hidden(tokens, positions, segments, **kwargs):
            for seg in segments:
                if POISON in tokens[seg.start:seg.start + seg.n].tolist():
                    raise RuntimeError("a kernel failed on this sequence")
            return inner(tokens, positions, segments, **kwargs)
        self.decoder.hidden = hidden
    monkeypatch.setattr(Engine, "__init__", poisoned_engine)

    blown = [GenerationRequest(prompt_ids=prompt(20 + i), adapter=name, params=params)
             for i, (name, params) in enumerate((n, p) for n in overflow for p in (GREEDY, SAMPLED))]
    bad = [GenerationRequest(prompt_ids=prompt(22), adapter="nan", params=GREEDY),
           GenerationRequest(prompt_ids=prompt(24), adapter=good[0],
                             params=SamplingParams(max_tokens=6, temperature=0.8, seed=666, ignore_eos=True)),
           GenerationRequest(prompt_ids=prompt(25), adapter=good[0],
                             params=SamplingParams(max_tokens=6, temperature=0.0, stop=["zz-poison"], ignore_eos=True))]
    if poison:
        bad.append(GenerationRequest(prompt_ids=prompt(23)[:-1] + [POISON], adapter=good[0], params=GREEDY))
    mixed = goods[:len(goods) // 2] + blown + bad + goods[len(goods) // 2:]   # bad ones in the middle of the batch

    engine = build(env)
    try:
        streams = [engine.submit(r) for r in mixed]
        by_request = {id(s.request): s for s in streams}
        engine.start()
        for s in streams:
            s.result(timeout=60)
    finally:
        engine.stop(drain=False)

    for r, (final, tokens) in zip(goods, want):
        s = by_request[id(r)]
        assert s.final.finish_reason == "length", s.final.error
        assert tuple(s.token_ids) == tokens                          # exactly what it returns alone
    for r in blown:
        final = by_request[id(r)].final
        assert final.finish_reason == "error" and isinstance(final.error, NonFiniteError), final
        assert f"adapter(s) '{r.adapter}' made the model's output non-finite" in str(final.error)
        assert final.error.param == "model"
    outcome = [by_request[id(r)].final for r in bad]
    assert all(f.finish_reason == "error" for f in outcome)
    assert isinstance(outcome[0].error, NonFiniteError) and "non-finite value" in str(outcome[0].error)
    assert "sampler exploded" in str(outcome[1].error)
    assert "UnicodeDecodeError" in str(outcome[2].error)
    if poison:
        assert "generation failed for this request (RuntimeError: a kernel failed on this sequence)" \
            in str(outcome[3].error)


@pytest.mark.parametrize("hook", ["_attend", "_attend_group"], ids=["prefill", "batched-decode"])
def test_a_failed_batch_forward_leaves_no_trace_in_the_caches(env, monkeypatch, hook):
    """The batch forward raises once (after layer 0 wrote its K/V; in a prefill, or in the arena's batched
    decode call); every sequence is re-run alone and continues exactly as if nothing had happened."""
    goods = good_requests(["g1", "g2"])
    want = [results(env, [r])[0][1] for r in goods]
    calls = {"n": 0}

    def build_flaky(env):
        engine = build(env)
        real = getattr(engine.decoder, hook)

        def flaky(layer, q, k, v, what, out):
            batched = len(what) > 1 if hook == "_attend" else True
            if batched:
                calls["n"] += 1
                if calls["n"] == 2:                   # layer 1 of the first batched call
                    raise RuntimeError("transient")
            return real(layer, q, k, v, what, out)
        setattr(engine.decoder, hook, flaky)
        return engine
    got = results(env, goods, build_flaky(env))
    assert calls["n"] >= 2                            # it did raise
    assert [tokens for _, tokens in got] == want


def test_a_failed_sequences_kv_never_reaches_the_sequence_that_takes_its_slot(env):
    """Three requests of one KV capacity class (need 15): "boom" fails after its prompt with non-finite K/V in
    its arena slot; the class's last request then moves into that slot (compaction) and decodes in a batched
    call that reads the slot's whole [0, longest) under a mask. A masked NaN still poisons an SDPA row, so the
    arena zeroes what a finished sequence leaves: both good requests return exactly their tokens alone."""
    def params(n):
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    goods = [GenerationRequest(prompt(1, 9), adapter="g1", params=params(6)),
             GenerationRequest(prompt(2, 3), adapter="g1", params=params(12))]
    bad = GenerationRequest(prompt(0, 12), adapter="boom", params=params(3))
    want = [results(env, [r])[0][1] for r in goods]
    got = results(env, [bad, *goods])
    assert got[0][0].finish_reason == "error" and isinstance(got[0][0].error, NonFiniteError)
    assert [final.finish_reason for final, _ in got[1:]] == ["length", "length"]
    assert [tokens for _, tokens in got[1:]] == want
