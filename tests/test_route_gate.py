"""Learned per-token gate on a tiny random Llama: gated forwards equal hand-computed references,
training lowers the gate loss to high accuracy on a toy 2-task problem, a chained prompt switches
adapters mid-sequence, and the artifact round-trips."""

import random

import pytest
import torch
from conftest import input_ids, save_tiny, save_tiny_tokenizer, tiny_llama

from adapterkit import AdapterRuntime, LoraConfig, create_adapter, load_base
from adapterkit.errors import AdapterNotFoundError, BaseMismatchError, ConfigError
from adapterkit.methods import get_method
from adapterkit.core.targets import site_info
from adapterkit.route import GateRouter, StaleRouterError, load_router, train_gate
from adapterkit.route.gate import IGNORE, find_layers, gate_loss, token_labels
from adapterkit.store import AdapterStore
from adapterkit.train.classification import encode_texts


def runtime(n=3, model=None, fingerprint="sha256:tiny"):
    model = model if model is not None else tiny_llama()
    rt = AdapterRuntime(model, fingerprint=fingerprint, base_name="tiny")
    ads = [create_adapter(f"g{i}", model, LoraConfig(r=4, alpha=16, init="nonzero", init_std=0.2), seed=i + 1,
                          fingerprint=fingerprint, base_name="tiny") for i in range(n)]
    for a in ads:
        rt.add(a)
    return rt, ads


def test_gate_forced_one_hot_equals_that_adapter_alone():
    rt, ads = runtime()
    gate = GateRouter.create("gate", rt, ads, top_k=1)
    gate.weight.zero_()
    gate.bias[:, 1] = 10.0                                     # every token, every layer: adapter g1
    ids = input_ids(3, 7)
    with torch.no_grad():
        with rt.batch(["g1"] * 3):
            want = rt.model(ids).logits
        with gate.routing(rt) as trace:
            got = rt.model(ids).logits
        base = rt.model(ids).logits
    assert not torch.allclose(want, base, atol=1e-4)            # the adapter changes the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(trace.ids) == 2 and all(bool((i == 1).all()) for i in trace.ids)
    assert all(bool((w == 1).all()) for w in trace.weights)


def test_gate_mixing_equals_per_layer_merged_weights():
    """Bias-only gate, top-2: layer 0 mixes softmax([2, 1]) of (g0, g2), layer 1 of (g1, g2); the reference
    adds w·ΔW to every adapted weight of that layer by hand and runs the plain model."""
    rt, ads = runtime()
    gate = GateRouter.create("gate", rt, ads, top_k=2)
    gate.weight.zero_()
    gate.bias[0] = torch.tensor([2.0, -5.0, 1.0])
    gate.bias[1] = torch.tensor([-5.0, 2.0, 1.0])
    ids = input_ids(2, 9, seed=3)
    with torch.no_grad(), gate.routing(rt):
        got = rt.model(ids).logits
    ref = tiny_llama()                                           # the same weights, no hooks
    w = torch.softmax(torch.tensor([2.0, 1.0]), 0)
    mix = {0: {"g0": float(w[0]), "g2": float(w[1])}, 1: {"g1": float(w[0]), "g2": float(w[1])}}
    modules = dict(ref.named_modules())
    lora = get_method("lora")
    with torch.no_grad():
        for a in ads:
            for site, parts in a.tensors.items():
                layer = int(site.split("layers.")[1].split(".")[0])
                if a.name in mix[layer]:
                    delta = lora.delta_weight(a.config, site_info(site, modules[site]), parts)
                    modules[site].weight += mix[layer][a.name] * delta
        want = ref(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


VOCAB = [[f"w{i}" for i in range(0, 20)], [f"w{i}" for i in range(20, 40)]]


def toy_batches(tok, n_batches, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n_batches):
        tasks = [rng.randrange(2) for _ in range(8)]
        texts = [" ".join(rng.choice(VOCAB[t]) for _ in range(rng.randint(4, 10))) for t in tasks]
        enc = encode_texts(tok, texts, 32)
        out.append({**enc, "gate_labels": token_labels(enc["attention_mask"], tasks)})
    return out


@pytest.fixture
def tiny_lm(tmp_path):
    path = save_tiny("llama", tmp_path / "lm")
    save_tiny_tokenizer(path)
    return load_base(str(path))


def test_training_lowers_the_gate_loss_to_high_accuracy_and_a_chained_prompt_switches(tiny_lm):
    rt = AdapterRuntime.from_base(tiny_lm)
    ads = [create_adapter(f"t{i}", tiny_lm.model, LoraConfig(r=2, init="nonzero"), seed=i,
                          fingerprint=tiny_lm.fingerprint, base_name=tiny_lm.name) for i in range(2)]
    for a in ads:
        rt.add(a)
    gate = GateRouter.create("toy", rt, ads, top_k=1, seed=0)
    history = train_gate(gate, rt, toy_batches(tiny_lm.tokenizer, 16, 0), steps=80, lr=0.05)
    assert history[-1]["gate_loss"] < 0.25 * history[0]["gate_loss"]
    assert not gate.weight.requires_grad and not any(t.requires_grad for a in ads for p in a.tensors.values()
                                                     for t in p.values())
    # held-out batches: gate accuracy over tokens, per layer. Layer 0 reads token embeddings (separable
    # by construction); layer 1 reads states mixed by the random model's attention, so a little lower.
    from adapterkit.route.gate import GateTrace
    with torch.no_grad():
        per_layer = [[], []]
        for b in toy_batches(tiny_lm.tokenizer, 4, 99):
            with gate.routing(rt) as trace:
                rt.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            for layer, logits in enumerate(trace.logits):
                per_layer[layer].append(gate_loss(GateTrace(logits=[logits]), b["gate_labels"])[1])
    assert min(per_layer[0]) == 1.0
    assert sum(per_layer[1]) / len(per_layer[1]) >= 0.85
    # one prompt chaining both tasks: the first words go to t0, the last to t1, at every layer
    enc = encode_texts(tiny_lm.tokenizer, ["w1 w5 w7 w3 w22 w30 w25 w38"], 16)
    with torch.no_grad(), gate.routing(rt) as trace:
        rt.model(**enc)
    assert trace.ids[0][:, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    [d] = gate.summarize(trace, enc["attention_mask"])
    assert set(d.adapters) == {"t0", "t1"} and not d.fallback
    assert gate.route(rt, ["w1 w2 w3 w4"])[0].top == "t0"
    assert gate.route(rt, ["w21 w22 w23"])[0].top == "t1"


def test_gate_artifact_round_trip_and_bad_input(tiny_lm, tmp_path):
    store = AdapterStore(tmp_path / "store")
    rt = AdapterRuntime.from_base(tiny_lm)
    ads = [create_adapter(f"s{i}", tiny_lm.model, LoraConfig(r=2, init="nonzero"), seed=i,
                          fingerprint=tiny_lm.fingerprint, base_name=tiny_lm.name) for i in range(2)]
    for a in ads:
        rt.add(a)
        store.put(a)
    gate = GateRouter.create("gate1", rt, ads, top_k=1, seed=1)
    gate.save(store)
    loaded = load_router(store, "gate1")
    assert isinstance(loaded, GateRouter) and loaded.layers == ["model.layers.0", "model.layers.1"]
    torch.testing.assert_close(loaded.weight, gate.weight)
    assert loaded.route(rt, ["w1 w2 w3"]) == gate.route(rt, ["w1 w2 w3"])
    # the runtime lacks one of the gate's adapters
    rt2 = AdapterRuntime.from_base(tiny_lm)
    rt2.add(ads[0])
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 's1'; attached adapters: s0"):
        with loaded.routing(rt2):
            pass
    # another base
    rt3 = AdapterRuntime(tiny_llama(seed=4), fingerprint="sha256:other", base_name="other")
    with pytest.raises(BaseMismatchError, match=r"adapter 's0' was made for base .* but the router runs on other "
                                                r"\(sha256:other\)"):
        with loaded.routing(rt3):
            pass
    # a deleted adapter: strict refuses; non-strict never picks it
    store.remove("s1")
    with pytest.raises(StaleRouterError, match=r"^router 'gate1' refuses to route to 's1': adapter 's1' was "
                                               r"deleted from the store; fit the router again"):
        load_router(store, "gate1")
    lenient = load_router(store, "gate1", strict=False)
    lenient.bias[:, 1] = 50.0
    with torch.no_grad(), lenient.routing(rt) as trace:
        rt.model(input_ids(2, 5))
    assert all(bool((i == 0).all()) for i in trace.ids)
    with pytest.raises(ConfigError, match=r"top_k must be an integer in \[1, 2\] \(the number of adapters\), got 3"):
        GateRouter.create("g", rt, ads, top_k=3)


def test_layers_are_found_and_sites_outside_them_are_refused():
    model = tiny_llama()
    assert find_layers(model, ["model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj"]) == \
        ["model.layers.0", "model.layers.1"]
    with pytest.raises(ConfigError, match=r"adapted module\(s\) \['lm_head'\] are outside the layers of "
                                          r"'model.layers'"):
        find_layers(model, ["model.layers.0.self_attn.q_proj", "lm_head"])


def test_gate_loss_ignores_padding():
    from adapterkit.route.gate import GateTrace
    mask = torch.tensor([[1, 1, 0]])
    labels = token_labels(mask, [1])
    assert labels.tolist() == [[1, 1, IGNORE]]
    logits = torch.tensor([[0.0, 5.0], [0.0, 5.0], [5.0, 0.0]])
    loss, acc = gate_loss(GateTrace(logits=[logits]), labels)
    assert acc == 1.0 and float(loss) < 0.01
