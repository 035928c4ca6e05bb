"""The contract every method passes, on every tiny base (Llama, BERT, GPT-2 Conv1D).

Each case first asserts that the adapter changes the output, so none passes vacuously.
"""

import copy

import pytest
import torch
from conftest import TARGETS, input_ids

from adapterkit import Adapter, AdapterRuntime, LoraConfig, create_adapter, load_base, method_names
from adapterkit.errors import UnsupportedError
from adapterkit.methods.bottleneck import BottleneckConfig
from adapterkit.methods.full import FullConfig
from adapterkit.methods.ia3 import Ia3Config
from adapterkit.methods.mora import MoraConfig
from adapterkit.methods.fusion import FusionConfig
from adapterkit.methods.scalearn import ScaLearnConfig, source_config_json
from adapterkit.methods.sparse import SparseConfig
from method_reference import reference


def _bottleneck(targets, i):
    """Each placement with its own size and nonlinearity (a BERT layer has no MLP module: houlsby twice)."""
    kind = "bert" if "query" in targets else "gpt2" if "c_attn" in targets else "llama"
    placement = ("houlsby", "pfeiffer", "parallel")[i]
    return BottleneckConfig.for_model(kind, placement, reduction_factor=(4, 8, 2)[i],
                                      nonlinearity=("relu", "gelu", "silu")[i], init="nonzero", init_std=3.0,
                                      **({"scaling": 2.0} if placement == "parallel" else {}))


def _scalearn(targets, i):
    """Random sources of the families that attach at a Linear's output, one variant each."""
    lora = [LoraConfig(r=2 + k, target_modules=targets, init="nonzero", init_std=0.3) for k in range(2)]
    sources = [lora, [lora[0], Ia3Config(target_modules=targets, feedforward_modules=(), init="nonzero",
                                         init_std=0.3)],
               [*lora, SparseConfig(target_modules=targets, init="random", init_density=0.2, init_std=0.3)]][i]
    return ScaLearnConfig(sources=tuple(f"src{k}" for k in range(len(sources))),
                          source_configs=tuple(source_config_json(c) for c in sources), target_modules=targets,
                          variant=("vector", "uniform", "shared")[i], init_std=0.3)


def _fusion(targets, i):
    """AdapterFusion over the same sources as _scalearn, with projections far from their init."""
    sc = _scalearn(targets, i)
    return FusionConfig(sources=sc.sources, source_configs=sc.source_configs, target_modules=targets, init_std=0.3)

# One config factory per registered method: a new method must add its entry here.
METHOD_CONFIGS = {
    "lora": lambda targets, i: LoraConfig(r=2 + 2 * i, alpha=4.0 + i, target_modules=targets,
                                          init="nonzero", init_std=0.3, use_rslora=(i == 2)),
    # the last target scales its input (feedforward), the others their output: both attachments
    "ia3": lambda targets, i: Ia3Config(target_modules=targets, feedforward_modules=(targets[-1],),
                                        init="nonzero", init_std=0.3),
    "bottleneck": _bottleneck,
    "full": lambda targets, i: FullConfig(target_modules=targets, init_std=(0.05, 0.1, 0.2)[i]),
    "sparse": lambda targets, i: SparseConfig(target_modules=targets, init="random", init_density=(0.05, 0.2, 1.0)[i],
                                              init_std=0.3),
    "scalearn": _scalearn,
    "fusion": _fusion,
    # top-k gating over rank-1 experts: 2 of 4, all of 3, and 2 of 5 past a threshold
    "mora": lambda targets, i: MoraConfig(r=(4, 3, 5)[i], top_k=(2, 3, 2)[i], threshold=(0.0, 0.0, 0.05)[i],
                                          target_modules=targets, init="nonzero", init_std=0.3),
}


def test_every_registered_method_is_in_the_matrix():
    assert sorted(METHOD_CONFIGS) == method_names()


def out(model, ids):
    return _main_output(model(ids))


def _main_output(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _refuses_merge(rt, name):
    """A family that is not linear in the base weights: merge and export refuse it, nothing changes."""
    before = {k: v.clone() for k, v in rt.model.state_dict().items()}
    with pytest.raises(UnsupportedError, match=f"adapter '{name}' is an? .* adapter, which is not linear in the base "
                                               "weights: it cannot be merged into the base"):
        rt.merge(name)
    assert rt.merged == [] and all(torch.equal(before[k], v) for k, v in rt.model.state_dict().items())


@pytest.fixture(params=sorted(METHOD_CONFIGS))
def setup(request, tiny_base):
    kind, base = tiny_base
    rt = AdapterRuntime.from_base(base, capacity=2)        # small capacity: slots must grow
    adapters = [create_adapter(f"ad{i}", base.model, METHOD_CONFIGS[request.param](TARGETS[kind], i), seed=i,
                               fingerprint=base.fingerprint, base_name=base.name) for i in range(3)]
    for a in adapters:
        rt.add(a)
    return kind, base, rt, adapters


def _base_out(rt, ids):
    with rt.disabled():
        return out(rt.model, ids)


@torch.no_grad()
def test_adapter_changes_output(setup):
    _, base, rt, adapters = setup
    ids = input_ids(3, 6)
    plain = _base_out(rt, ids)
    for a in adapters:
        with rt.batch([a.name] * 3):
            assert (out(rt.model, ids) - plain).abs().max() > 1e-2


@torch.no_grad()
def test_disabled_and_empty_rows_equal_base(setup, tmp_path):
    kind, base, rt, _ = setup
    ids = input_ids(3, 6)
    fresh = load_base(str(base.path)).model
    want = out(fresh, ids)
    assert torch.equal(_base_out(rt, ids), want)
    with rt.batch([None, None, None]):
        assert torch.equal(out(rt.model, ids), want)
    assert torch.equal(out(rt.model, ids), want)     # no batch context: the bare base


@pytest.mark.parametrize("kernel", ["auto", "dense", "gather", "segment"])
@torch.no_grad()
def test_mixed_batch_equals_per_adapter_loop_and_float64(setup, kernel):
    kind, base, rt, adapters = setup
    rows = ["ad0", "ad1", None, "ad2", "ad0", "ad2", "ad1"]
    ids = input_ids(len(rows), 5, seed=3)
    with rt.batch(rows, kernel=kernel):
        mixed = out(rt.model, ids)
    plain = _base_out(rt, ids)
    for i, name in enumerate(rows):
        # per-adapter loop: the row alone, with only its adapter active
        if name is None:
            torch.testing.assert_close(mixed[i], plain[i], rtol=0, atol=0)
            continue
        with rt.batch([name]):
            alone = out(rt.model, ids[i:i + 1])[0]
        assert (alone - plain[i]).abs().max() > 1e-2
        # float32 rounding differs with the batch's shape: on some CPUs (this one has AVX-512 FP16) AdapterFusion's
        # BERT rows differ from the row alone by up to 1.6e-5 on outputs of ~3, both within 2.5e-5 of the float64
        # reference below; a wrong adapter or a row leaking into another moves an output by > 1e-2
        torch.testing.assert_close(mixed[i], alone, rtol=1e-5, atol=5e-5)
    if not rt.adapters["ad0"].method.mergeable:      # float64 reference: each row alone, the family's own forward
        want = reference(rt.model, [[rt.adapters[n]] if n else [] for n in rows], ids, output=_main_output)
        torch.testing.assert_close(mixed.double(), want, rtol=1e-4, atol=1e-4)
        return
    # float64 reference: an independent float64 copy of the base with ΔW merged in
    for name in ["ad0", "ad2"]:
        ref_model = copy.deepcopy(rt.model).double()
        ref_rt = AdapterRuntime(ref_model)
        ref_rt.add(Adapter(name, rt.adapters[name].config,
                           {s: {k: t.double() if t.is_floating_point() else t for k, t in p.items()}
                            for s, p in rt.adapters[name].tensors.items()}))
        ref_rt.merge(name)
        ref = out(ref_model, ids)
        for i in [i for i, r in enumerate(rows) if r == name]:
            torch.testing.assert_close(mixed[i].double(), ref[i], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_weighted_composition_is_linear(setup):
    _, _, rt, _ = setup
    ids = input_ids(2, 4, seed=5)
    # LoRA deltas are linear in the weights, so {a:1, b:1} at one module = a + b - base. Check at
    # the first wrapped module's output instead of logits (the network is non-linear).
    site = next(iter(rt._sites.values()))
    seen = {}
    h = site.module.register_forward_hook(lambda m, a, o: seen.__setitem__("o", o.clone()))
    try:
        outs = {}
        for key, rows in {"a": ["ad0"] * 2, "b": ["ad1"] * 2, "ab": [{"ad0": 1.0, "ad1": 1.0}] * 2,
                          "half": [{"ad0": 0.5}] * 2, "none": [None] * 2}.items():
            with rt.batch(rows):
                out(rt.model, ids)
            outs[key] = seen["o"]
    finally:
        h.remove()
    assert (outs["a"] - outs["none"]).abs().max() > 1e-3
    torch.testing.assert_close(outs["ab"], outs["a"] + outs["b"] - outs["none"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["half"], (outs["a"] + outs["none"]) / 2, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_merged_equals_unmerged_and_unmerge_is_exact(setup):
    _, _, rt, _ = setup
    if not rt.adapters["ad1"].method.mergeable:
        return _refuses_merge(rt, "ad1")
    ids = input_ids(3, 6, seed=1)
    before = {k: v.clone() for k, v in rt.model.state_dict().items()}
    with rt.batch(["ad1"] * 3):
        unmerged = out(rt.model, ids)
    rt.merge("ad1")
    assert any(not torch.equal(before[k], v) for k, v in rt.model.state_dict().items())
    torch.testing.assert_close(out(rt.model, ids), unmerged, rtol=1e-4, atol=1e-5)
    rt.unmerge()
    after = rt.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@torch.no_grad()
def test_export_merged_is_a_plain_transformers_folder(setup, tmp_path):
    kind, base, rt, _ = setup
    if not rt.adapters["ad2"].method.mergeable:
        with pytest.raises(UnsupportedError, match="not linear in the base weights"):
            rt.export_merged(tmp_path / "merged", ["ad2"])
        assert not (tmp_path / "merged").exists() and rt.merged == []
        return
    ids = input_ids(2, 6, seed=2)
    with rt.batch(["ad2"] * 2):
        want = out(rt.model, ids)
    rt.export_merged(tmp_path / "merged", ["ad2"], tokenizer=base.tokenizer)
    assert rt.merged == []                            # the runtime is restored
    reloaded = load_base(str(tmp_path / "merged"))
    torch.testing.assert_close(out(reloaded.model, ids), want, rtol=1e-4, atol=1e-5)
    assert reloaded.fingerprint != base.fingerprint


@torch.no_grad()
def test_save_load_round_trip(setup, tmp_path):
    _, base, rt, adapters = setup
    a = adapters[2]
    a.meta.task = "demo-task"
    a.meta.metrics = {"accuracy": 0.5}
    a.save(tmp_path / "a")
    b = Adapter.load(tmp_path / "a")
    assert (b.name, b.config, b.meta) == (a.name, a.config, a.meta)
    assert b.tensors.keys() == a.tensors.keys()
    for site in a.tensors:
        for k in a.tensors[site]:
            assert torch.equal(a.tensors[site][k], b.tensors[site][k])
    ids = input_ids(2, 6)
    with rt.batch([a.name] * 2):
        want = out(rt.model, ids)
    rt.remove(a.name)
    rt.add(b)
    with rt.batch([b.name] * 2):
        assert torch.equal(out(rt.model, ids), want)


@torch.no_grad()
def test_low_bit_round_trip_or_a_clear_refusal(setup, tmp_path):
    """Every family with float matrices quantizes (codecs), saves packed and reloads to the outputs of its
    dequantized floats, in a mixed batch beside the float adapters; a family without them is refused."""
    from adapterkit import LowBit, UnsupportedError, quantize
    from adapterkit.codecs import quantizable

    _, base, rt, adapters = setup
    a = adapters[1]
    if not quantizable(a):
        with pytest.raises(UnsupportedError, match="has no float matrix to quantize"):
            quantize(a, LowBit(4, 8))
        return
    q = quantize(a, LowBit(4, 8), "q")
    q.save(tmp_path / "q")
    back = Adapter.load(tmp_path / "q")
    assert back.packed is not None and back.summary().endswith("4-bit g8")
    ids = input_ids(3, 6)
    ref = AdapterRuntime.from_base(load_base(str(base.path)))
    ref.add(q.dequantized())
    with ref.batch(["q"] * 3):
        want = out(ref.model, ids)
    rt.add(back)
    with rt.batch(["q", adapters[0].name, None]):
        got = out(rt.model, ids)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    with rt.batch([adapters[0].name]):
        torch.testing.assert_close(got[1], out(rt.model, ids[1:2])[0], rtol=1e-5, atol=1e-5)
    with rt.batch(["q"]):                      # the 4-bit adapter still moves the output (not quantized to 0)
        assert (out(rt.model, ids[:1]) - _base_out(rt, ids[:1])).abs().max() > 1e-3


@torch.no_grad()
def test_activate_and_token_mode_equal_row_mode(setup):
    kind, _, rt, _ = setup
    ids = input_ids(3, 4, seed=4)
    with rt.batch(["ad1"] * 3):
        want = out(rt.model, ids)
    rt.activate("ad1")
    try:
        torch.testing.assert_close(out(rt.model, ids), want, rtol=1e-5, atol=1e-5)
    finally:
        rt.deactivate()
    rows = ["ad0", "ad2", None]
    with rt.batch(rows):
        row_mode = out(rt.model, ids)
    per_token = [r for r in rows for _ in range(ids.shape[1])]
    with rt.batch(per_token, per_token=True):
        if any("pooler" in site for a in rt.adapters.values() for site in a.tensors):
            # BERT's pooler.dense (targeted by "dense") sees one token per row: per-token ids
            # cannot apply there, and the error says so instead of guessing.
            with pytest.raises(Exception, match="built for 12 tokens but a module got 3"):
                out(rt.model, ids)
            return
        torch.testing.assert_close(out(rt.model, ids), row_mode, rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_adapter_tensors_and_fast_kernels_see_updates(setup):
    kind, base, rt, _ = setup
    cfg = METHOD_CONFIGS[rt.adapters["ad0"].config.type](TARGETS[kind], 0)
    trained = create_adapter("trained", base.model, cfg, seed=9)
    kinds = trained.method.tensor_kinds(trained.config)            # an index never trains
    params = [t.requires_grad_() for parts in trained.tensors.values() for k, t in parts.items() if kinds[k].trainable]
    rt.add(trained)
    ids = input_ids(4, 5)
    with rt.batch(["trained", "ad1", "trained", None]):
        o = rt.model(ids)
        pooled = getattr(o, "pooler_output", None)     # BERT's pooler.dense is a target too
        main = o.logits if hasattr(o, "logits") else o.last_hidden_state
        loss = main.pow(2).mean() + (pooled.pow(2).mean() if pooled is not None else 0)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in rt.model.parameters())
    with torch.no_grad():
        for p in params:
            p.sub_(0.5 * p.grad)                      # an optimizer step, in place
        with rt.batch(["trained"] * 4, kernel="dense"):
            live = out(rt.model, ids)
        with rt.batch(["trained", "ad1", "ad2", "trained"] * 1, kernel="gather"):
            fast = out(rt.model, ids)
    torch.testing.assert_close(fast[[0, 3]], live[[0, 3]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, options", [("lora", None), ("ia3", None), ("bottleneck", {"placement": "houlsby"}),
                                             ("sparse", {"sparse_params": 60, "dense_steps": 3})])
def test_a_trained_adapter_of_each_family_reloads_to_the_same_outputs(method, options, tmp_path, one_thread):
    """Trained (the head too), stored, read back into a fresh runtime over a fresh copy of the base:
    the same logits and the same head."""
    from conftest import CLASS_ROWS, classification_files

    from adapterkit.data.tasks import Example
    from adapterkit.store import AdapterStore
    from adapterkit.train.run import train_classifier
    from adapterkit.train.trainer import TrainConfig

    path, _ = classification_files(tmp_path)
    base = load_base(str(path))
    store = AdapterStore(tmp_path / "store")
    examples = [Example(text=t, label=y) for t, y in CLASS_ROWS]
    trained, _ = train_classifier(base, "t", examples, [], task=None, store=store, method=method,
                                  method_options=options, progress=False,
                                  config=TrainConfig(steps=6, batch_size=4, lr=0.05, head_lr=0.05))
    ids = input_ids(2, 6)
    rt = AdapterRuntime.from_base(base)
    rt.add(trained)
    with torch.no_grad(), rt.batch(["t", "t"]):
        want = base.model(ids).logits
    rt.remove("t")
    with torch.no_grad():
        bare = base.model(ids).logits
    assert (want - bare).abs().max() > 1e-4                       # training moved the adapter off the identity
    fresh = load_base(str(path))
    stored = store.get("t")
    rt2 = AdapterRuntime.from_base(fresh)
    rt2.add(stored)
    with torch.no_grad(), rt2.batch(["t", "t"]):
        got = fresh.model(ids).logits
    assert torch.equal(got, want)
    assert stored.head.labels == trained.head.labels
    assert torch.equal(stored.head.weight, trained.head.weight) and torch.equal(stored.head.bias, trained.head.bias)
