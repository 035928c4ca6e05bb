"""A learned per-token gate inside the continuous-batching engine: a gated request's tokens equal
the gate run over a full HF forward (GateRouter.routing), next to fixed-adapter and base rows in the
same steps; the gate weight per adapter is reported; bad gated requests are refused."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from test_engine import GREEDY, engine, env, peft_greedy, prompt  # noqa: F401  (env is a fixture)

from adapterkit import Adapter, AdapterNotFoundError, AdapterRuntime, BaseMismatchError, ConfigError
from adapterkit.route import GateRouter
from adapterkit.serve.requests import GenerationRequest

GATED = ["t0", "t1", "t2", "t3"]


def make_gate(env, top_k: int, seed: int = 0):
    """A gate over four of the engine's adapters with large random weights (tokens pick different
    adapters), and the runtime it was made on (the reference)."""
    rt = AdapterRuntime(tiny_llama(), capacity=len(GATED) + 1)
    for name in GATED:
        rt.add(Adapter.load(env.adapters / name))
    gate = GateRouter.create("g", rt, [rt.adapters[n] for n in GATED], top_k=top_k, seed=seed, init_std=2.0)
    return gate, rt


def reference(gate, rt, ids: list[int], n: int) -> tuple[list[int], dict[str, float]]:
    """Greedy tokens with the gate over full HF forwards (no cache), up to EOS, and each adapter's
    share of gate weight over the tokens the engine feeds (the prompt and every generated token
    but the last)."""
    seq = list(ids)
    with torch.no_grad(), gate.routing(rt):
        for _ in range(n):
            token = int(rt.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(token)
            if token == 2:
                break
    out = seq[len(ids):]
    with torch.no_grad(), gate.routing(rt) as trace:
        rt.model(input_ids=torch.tensor([seq[:-1]]))
    usage = torch.zeros(len(gate.names), dtype=torch.float64)
    for top_ids, top_w in zip(trace.ids, trace.weights):
        usage.scatter_add_(0, top_ids.flatten(), top_w.flatten().double())
    shares = {n: float(u / usage.sum()) for n, u in zip(gate.names, usage) if u > 0}
    return (out[: out.index(2)] if 2 in out else out), shares


@pytest.mark.parametrize("top_k", [1, 2])
def test_gated_requests_equal_the_gate_over_a_full_forward_beside_fixed_and_base_rows(env, top_k):
    gate, rt = make_gate(env, top_k)
    prompts = [prompt(20 + i, 5 + 2 * i) for i in range(3)]
    want = [reference(gate, rt, p, GREEDY.max_tokens) for p in prompts]
    eng = engine(env, max_batch=8)
    try:
        gated = [eng.submit(GenerationRequest(p, gate=gate, params=GREEDY)) for p in prompts]
        fixed = eng.submit(GenerationRequest(prompts[0], adapter="t5", params=GREEDY))
        base = eng.submit(GenerationRequest(prompts[1], params=GREEDY))
        for s in gated + [fixed, base]:
            s.result(timeout=60)
        counts = eng.metrics()["requests_total"]
    finally:
        eng.stop()
    for s, (tokens, shares) in zip(gated, want):
        assert s.token_ids == tokens
        assert s.adapter_usage.keys() == shares.keys() and len(shares) >= 2      # tokens switched adapters
        assert s.adapter_usage == pytest.approx(shares, abs=2e-6)
    assert fixed.token_ids == peft_greedy(env, "t5", prompts[0], GREEDY.max_tokens)
    assert base.token_ids == peft_greedy(env, None, prompts[1], GREEDY.max_tokens)
    assert fixed.adapter_usage is None and counts["gate:g"] == 3
    # the gate matters: fixed single adapters give other tokens than the gated request
    assert all(peft_greedy(env, n, prompts[0], GREEDY.max_tokens) != want[0][0] for n in GATED)


def test_bad_gated_requests_are_refused_with_the_reason(env, tmp_path):
    gate, _ = make_gate(env, 1)
    with pytest.raises(ConfigError) as e:
        GenerationRequest([1, 5], adapter="t0", gate=gate)
    assert str(e.value) == "a request names either adapter(s) or a gate, not both"
    eng = engine(env)
    try:
        foreign = GateRouter(gate.name, gate.records, gate.layers, gate.weight[:, :, :8], gate.bias, 1)
        with pytest.raises(ConfigError) as e:
            eng.submit(GenerationRequest([1, 5], gate=foreign))
        assert str(e.value) == "gate 'g' reads hidden size 8, the served base has 32; serve the gate with its own base"
        other = GateRouter(gate.name, gate.records, ["model.blocks.0"], gate.weight[:1], gate.bias[:1], 1)
        with pytest.raises(ConfigError) as e:
            eng.submit(GenerationRequest([1, 5], gate=other))
        assert str(e.value) == ("gate 'g' was fitted on a model with layers ['model.blocks.0'], which the served "
                                "base lacks; serve the gate with its own base")
        from dataclasses import replace

        renamed = GateRouter(gate.name, [replace(r, name="nope") if r.name == "t3" else r for r in gate.records],
                             gate.layers, gate.weight, gate.bias, 1)
        with pytest.raises(AdapterNotFoundError, match="nope"):
            eng.submit(GenerationRequest([1, 5], gate=renamed))
        stale = GateRouter(gate.name, gate.records, gate.layers, gate.weight, gate.bias, 1,
                           unusable={n: f"{n} was deleted" for n in GATED})
        with pytest.raises(ConfigError) as e:
            eng.submit(GenerationRequest([1, 5], gate=stale))
        assert str(e.value) == "gate 'g' has no usable adapter: t0 was deleted; t1 was deleted; t2 was deleted; t3 was deleted"
        small = engine(env, max_loaded=3)
        try:
            with pytest.raises(ConfigError) as e:
                small.submit(GenerationRequest([1, 5], gate=gate))
            assert str(e.value) == ("the request needs 4 adapters at once; the server holds at most 3 (raise "
                                    "--max-loaded-adapters)")
        finally:
            small.stop()
        mismatched = GateRouter(gate.name, [replace(r, base_fingerprint="sha256:other", base_name="other")
                                            for r in gate.records], gate.layers, gate.weight, gate.bias, 1)
        with pytest.raises(BaseMismatchError, match="adapter 't0' was made for base other"):
            eng.submit(GenerationRequest([1, 5], gate=mismatched))
    finally:
        eng.stop()
