"""The engine's KV arena (serve/kv_arena.py): capacity classes within 10% of a sequence's need, chunks and
compaction that never lose a sequence's K/V, the budget it reserves, and batched decode attention equal
to the per-sequence reference (FlatDecoder outputs and the engine's greedy tokens)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_llama

from adapterkit import ConfigError
from adapterkit.serve.engine import EngineConfig
from adapterkit.serve.forward import FlatDecoder, Segment
from adapterkit.serve.kv_arena import KVArena, class_ladder
from adapterkit.serve.requests import ContextLengthError, GenerationRequest, SamplingParams

from test_engine import engine, env, prompt  # noqa: F401  (the module's tiny base + 8 PEFT LoRAs)


def test_every_need_gets_a_class_within_10_percent():
    arena = KVArena(2, 1, 4, torch.float32, max_context=8192)
    caps = [arena.capacity_for(n) for n in range(1, 8193)]
    assert all(n <= c <= 1.1 * n for n, c in zip(range(1, 8193), caps))
    assert len(set(caps)) == len(class_ladder(8192)) <= 90          # few classes: decodes batch together
    assert class_ladder(40)[:26] == list(range(1, 21)) + [22, 24, 26, 28, 30, 33]


def _fill(arena: KVArena, c, tag: float) -> None:
    c.k[:, :, : c.length] = tag
    c.v[:, :, : c.length] = -tag


def _check_invariants(arena: KVArena, live: dict) -> None:
    reserved = 0
    for cap, cls in arena.classes.items():
        assert cls.chunks, "an empty class is dropped"
        for i, ch in enumerate(cls.chunks):
            assert all(s.slot == j and s.chunk is ch for j, s in enumerate(ch.seqs))
            assert len(ch.seqs) == ch.slots or i == len(cls.chunks) - 1, "every chunk but the last is full"
            assert ch.seqs, "an emptied chunk is freed"
            assert ch.slots == 16 or i == len(cls.chunks) - 1, "only the last chunk is not 16 wide"
            assert ch.slots - len(ch.seqs) <= 2, "at most 2 free slots (then it shrinks)"
            n = len(ch.seqs)
            assert torch.all(ch.k[:, n:] == 0) and torch.all(ch.v[:, n:] == 0), "a vacated slot is zeroed"
            reserved += ch.slots * cap
    assert arena.reserved_tokens == reserved
    assert arena.need_tokens == sum(c.need for c in live.values())
    for tag, c in live.items():                   # every sequence's filled K/V is still its own, nothing after it
        assert torch.all(c.k[:, :, : c.length] == tag) and torch.all(c.v[:, :, : c.length] == -tag)
        assert torch.all(c.k[:, :, c.length:] == 0) and torch.all(c.v[:, :, c.length:] == 0)


def test_free_moves_the_last_sequence_into_the_hole_and_keeps_every_cache_intact():
    arena = KVArena(3, 2, 4, torch.float32, max_context=512)
    rng = random.Random(0)
    live: dict[float, object] = {}
    for step in range(300):
        if live and rng.random() < 0.45:
            tag = rng.choice(list(live))
            arena.free(live.pop(tag))
        else:
            tag = float(step + 1)
            c = arena.allocate(rng.choice([30, 31, 33, 100]))
            c.length = rng.randint(1, c.need)
            _fill(arena, c, tag)
            live[tag] = c
        _check_invariants(arena, live)
    assert max(len(cls.chunks) for cls in arena.classes.values()) >= 2    # full chunks and a last one
    for c in list(live.values()):
        arena.free(c)
    assert arena.reserved_tokens == 0 and arena.classes == {} and arena.nbytes == 0


def test_the_budget_limit_shrinks_a_new_chunk_or_refuses():
    arena = KVArena(1, 1, 2, torch.float32)
    assert arena.extra_tokens(12, limit=11) is None
    a = arena.allocate(12, limit=30)                 # first chunk: one slot of 12
    assert (arena.reserved_tokens, a.capacity) == (12, 12)
    assert arena.extra_tokens(12, limit=30) == 12    # the chunk grows 1 -> 2 slots
    arena.allocate(12, limit=30)
    assert arena.allocate(12, limit=30) is None and arena.reserved_tokens == 24
    for added in (12,) * 6 + (24,):                  # 2 -> 3 -> ... -> 8 -> 10 slots
        assert arena.extra_tokens(12) == added
        arena.allocate(12)
    assert arena.extra_tokens(12) == 0               # a free slot is ready
    assert arena.extra_tokens(12, limit=0) == 0


def test_batched_decode_equals_the_per_sequence_reference():
    """21 sequences of one class: a full 16-slot chunk and a last chunk of 5. Decode groups that are dense,
    and groups where slot 3 is still prefilling while the others decode; then sequences 1, 2 and 4 leave,
    the last sequences move into their slots, the last chunk shrinks to 2 slots (its live K/V copied),
    and decoding goes on."""
    torch.manual_seed(0)
    model = tiny_llama()
    fd = FlatDecoder(model)
    arena = fd.new_arena()
    prompts = [torch.tensor(prompt(i, 3 + (i * 5) % 9)) for i in range(21)]
    ref = [fd.new_cache(24) for _ in prompts]
    got = [arena.allocate(24) for _ in prompts]
    first, last = got[0].chunk, got[20].chunk
    assert (first.slots, last.slots, got[20].slot) == (16, 5, 4)

    def step(pieces: dict[int, torch.Tensor]) -> None:
        order = list(pieces)
        toks = torch.cat([pieces[i] for i in order])
        out = []
        for caches in (ref, got):
            pos = torch.cat([torch.arange(caches[i].length, caches[i].length + len(pieces[i])) for i in order])
            segs, start = [], 0
            for i in order:
                segs.append(Segment(caches[i], start, len(pieces[i])))
                start += len(pieces[i])
            out.append(fd.hidden(toks, pos, segs))
        torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-5)

    others = [i for i in range(21) if i != 3]
    step({i: prompts[i] for i in others})
    for t in range(3):
        pieces = {i: torch.tensor([10 + i + t]) for i in others}
        if t < 2:                                    # slot 3 prefills in two pieces while its chunk decodes
            pieces[3] = prompts[3][:2] if t == 0 else prompts[3][2:]
        else:
            pieces[3] = torch.tensor([13])
        step(pieces)
    movers = got[18:21]
    for i in (1, 2, 4):
        arena.free(got[i])
    assert [(c.chunk, c.slot) for c in movers] == [(first, 4), (first, 2), (first, 1)]
    assert (last.slots, [c.slot for c in last.seqs]) == (2, [0, 1])
    for i in (4, 2, 1):
        del ref[i], got[i]
    for t in range(3):
        step({i: torch.tensor([30 + i + t]) for i in range(18)})
    assert [c.length for c in got] == [c.length for c in ref]
    assert got[0].length == len(prompts[0]) + 6


def test_engine_greedy_tokens_are_identical_with_batched_and_per_sequence_attention(env):  # noqa: F811
    jobs = [(f"t{i % 8}" if i % 3 else None, prompt(i, 3 + (i * 5) % 11), 4 + (i * 7) % 9) for i in range(20)]
    out = {}
    for attention in ("batched", "per-sequence"):
        eng = engine(env, max_batch=12, attention=attention)
        try:
            streams = [eng.submit(GenerationRequest(ids, adapter=name, params=SamplingParams(
                max_tokens=n, temperature=0.0, ignore_eos=True))) for name, ids, n in jobs]
            out[attention] = [s.result(timeout=60) and s.token_ids for s in streams]
            if attention == "batched":
                assert eng.kv.reserved_tokens == 0 and eng.kv.classes == {}   # every slot came back
        finally:
            eng.stop()
    assert out["batched"] == out["per-sequence"]
    assert [len(t) for t in out["batched"]] == [n for _, _, n in jobs]


def test_a_need_whose_class_passes_the_budget_is_refused_naming_both(env):  # noqa: F811
    eng = engine(env, kv_budget_tokens=32)
    try:
        with pytest.raises(ContextLengthError, match=r"prompt \+ max_tokens = 31 tokens \(held as 33, its KV capacity class\) "
                                            r"exceed the engine's KV budget of 32 tokens"):
            eng.submit(GenerationRequest([1] * 23, params=SamplingParams(max_tokens=8)))
    finally:
        eng.stop()


def test_an_unknown_attention_mode_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="attention must be one of batched, per-sequence, got 'paged'"):
        EngineConfig(attention="paged")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_decode_on_cuda_equals_the_per_sequence_reference():
    torch.manual_seed(0)
    model = tiny_llama().cuda()
    fd = FlatDecoder(model)
    arena = fd.new_arena()
    ps = [torch.tensor(prompt(i, n), device="cuda") for i, n in enumerate([5, 9, 3])]
    caches = [[fd.new_cache(16) for _ in ps], [arena.allocate(16) for _ in ps]]
    outs = []
    for cs in caches:
        h = [fd.hidden(torch.cat(ps), torch.cat([torch.arange(len(p), device="cuda") for p in ps]),
                       [Segment(cs[0], 0, 5), Segment(cs[1], 5, 9), Segment(cs[2], 14, 3)])]
        for t in range(3):
            h.append(fd.hidden(torch.tensor([20, 21, 22], device="cuda"),
                               torch.tensor([c.length for c in cs], device="cuda"),
                               [Segment(c, i, 1) for i, c in enumerate(cs)]))
        outs.append(torch.cat(h))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_serve_refuses_an_unknown_attention_mode_before_loading_the_base(tmp_path):
    from typer.testing import CliRunner

    from adapterkit.cli.main import app

    res = CliRunner().invoke(app, ["serve", "--attention", "paged", "--base", str(tmp_path / "absent"),
                                   "--store", str(tmp_path)])
    assert res.exit_code == 2, res.output
    assert "attention must be one of batched, per-sequence, got 'paged'" in res.output
