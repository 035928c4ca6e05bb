"""Bottleneck adapters (issue 13 §2): a fresh adapter is the identity, each placement sits at its
modules, sizes per layer, layers left out, the native format, the serving engine's own forward, and
refusals by name (merges, bad placements, wrong shapes)."""

from __future__ import annotations


import pytest
import torch
from conftest import input_ids, save_tiny, save_tiny_tokenizer
from method_reference import reference

from adapterkit import Adapter, AdapterRuntime, LoraConfig, create_adapter, load_base
from adapterkit.errors import BaseMismatchError, ConfigError, UnsupportedError
from adapterkit.methods.bottleneck import BottleneckConfig


@pytest.fixture
def llama(tmp_path):
    return load_base(str(save_tiny("llama", tmp_path / "llama")))


def test_a_fresh_adapter_is_the_identity_and_each_placement_sits_at_its_modules(llama):
    ids = input_ids(2, 5)
    with torch.no_grad():
        bare = llama.model(ids).logits
    leaves = {"houlsby": ["mlp", "mlp", "o_proj", "o_proj"], "pfeiffer": ["mlp", "mlp"], "parallel": ["mlp", "mlp"]}
    for placement, want in leaves.items():
        a = create_adapter(placement, llama.model, BottleneckConfig.for_model("llama", placement), seed=0)
        assert sorted(s.rsplit(".", 1)[-1] for s in a.tensors) == want
        rt = AdapterRuntime.from_base(llama)
        rt.add(a)
        with torch.no_grad(), rt.batch([placement] * 2):
            assert torch.equal(llama.model(ids).logits, bare)       # up = 0: exactly the base
        rt.remove(placement)


def test_sizes_per_layer_and_layers_left_out(llama):
    cfg = BottleneckConfig.for_model("llama", "houlsby", reduction_factor=4, reduction_pattern={"layers.1.mlp": 16},
                                     exclude_modules=r".*layers\.0\.self_attn\.o_proj")
    a = create_adapter("b", llama.model, cfg, seed=0)
    sizes = {s: tuple(p["down"].shape) for s, p in a.tensors.items()}
    assert sizes == {"model.layers.0.mlp": (8, 32), "model.layers.1.self_attn.o_proj": (8, 32),
                     "model.layers.1.mlp": (2, 32)}
    assert a.summary() == "bottleneck houlsby relu size 2..8 on 3 sites"


def test_native_format_round_trip_and_store(llama, tmp_path):
    from adapterkit.store import AdapterStore

    a = create_adapter("b", llama.model, BottleneckConfig.for_model("llama", "parallel", scaling=2.0,
                                                                    nonlinearity="gelu", init="nonzero"), seed=1)
    a.save(tmp_path / "b")
    assert (tmp_path / "b" / "adapter.safetensors").is_file() and not (tmp_path / "b" / "adapter_config.json").exists()
    back = Adapter.load(tmp_path / "b")
    assert back.config == a.config and all(torch.equal(back.tensors[s][k], t) for s in a.tensors
                                           for k, t in a.tensors[s].items())
    store = AdapterStore(tmp_path / "store")
    store.put(a)
    assert store.show("b")["summary"] == "bottleneck parallel gelu size 2 scale 2 on 2 sites"


def test_merges_are_refused_by_name_and_run_time_stacking_works(llama):
    from adapterkit.merge import merge

    b1 = create_adapter("b1", llama.model, BottleneckConfig(init="nonzero", init_std=3.0), seed=1)
    b2 = create_adapter("b2", llama.model, BottleneckConfig(init="nonzero", init_std=3.0), seed=2)
    with pytest.raises(UnsupportedError, match="merge 'linear' is not defined for adapter 'b1', a bottleneck "
                                               "adapter: it is not linear in the base weights, so it has no weight "
                                               "change to merge; stack it at run time instead"):
        merge([b1, b2], method="linear")
    lora = create_adapter("l", llama.model, LoraConfig(r=2, init="nonzero", init_std=0.3), seed=3)
    with pytest.raises(UnsupportedError, match="merge 'ties' is not defined for adapter 'b1'"):
        merge([lora, b1], method="ties")
    rt = AdapterRuntime.from_base(llama)
    for a in (b1, lora):
        rt.add(a)
    ids = input_ids(1, 6).repeat(2, 1)                                 # one prompt: stacked vs LoRA alone
    want = reference(llama.model, [[b1, lora], [lora]], ids)          # the bottleneck reads LoRA's output
    with torch.no_grad(), rt.batch([{"b1": 1.0, "l": 1.0}, "l"]):
        got = llama.model(ids).logits
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    assert (want[0] - want[1]).abs().max() > 1e-4                      # the bottleneck moved the stacked row


@pytest.mark.parametrize("call_cost, stacked", [(0, False), (10**12, True)])
def test_serving_paths_equal_the_reference_for_mixed_placements_sizes_and_nonlinearities(llama, monkeypatch,
                                                                                           call_cost, stacked):
    """Both serving paths (the step's adapters as one block-diagonal batched matmul pair, or one adapter
    at a time; the cost rule picks by CALL_COST): houlsby relu, parallel gelu with scaling 2 and pfeiffer silu of
    another size in one batch, with weighted and composed rows and base rows, prefill and decode."""
    from adapterkit.methods.bottleneck import BottleneckPool

    monkeypatch.setattr(BottleneckPool, "CALL_COST", call_cost)
    used = []
    real = BottleneckPool.stacked
    monkeypatch.setattr(BottleneckPool, "stacked", lambda self, slots, dt: used.append(slots) or real(self, slots, dt))
    mk = lambda name, seed, placement, **kw: create_adapter(   # noqa: E731
        name, llama.model, BottleneckConfig.for_model("llama", placement, init="nonzero", init_std=0.5, **kw), seed=seed)
    a = mk("a", 1, "houlsby")
    b = mk("b", 2, "parallel", nonlinearity="gelu", scaling=2.0)
    c = mk("c", 3, "pfeiffer", nonlinearity="silu", reduction_factor=4)
    d = mk("d", 4, "pfeiffer")
    rt = AdapterRuntime.from_base(llama)
    for x in (a, b, c, d):
        rt.add(x)
    # parallel adapters read the block's input first, series ones read that output: b before a
    cases = [(["a", "b", None, "c", {"a": 0.5, "b": 1.0}, {"c": 1.5, "b": 0.5}, "d"],
              [[a], [b], [], [c], [b, (a, 0.5)], [(b, 0.5), (c, 1.5)], [d]]),
             # one unit per adapter (no padded columns), weighted, bottlenecks of two widths
             ([{"c": 1.5}, None, "d", "b"], [[(c, 1.5)], [], [d], [b]])]
    for i, (rows, want_rows) in enumerate(cases):
        used.clear()
        for length in (5, 1):
            ids = input_ids(len(rows), length)
            want = reference(llama.model, want_rows, ids)
            with torch.no_grad(), rt.batch(rows, kernel="gather"):
                got = llama.model(ids).logits
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
        # one adapter: the block-diagonal call is per adapter; where nothing is padded it is taken at any cost
        assert any(len(s) > 1 for s in used) == (stacked or i == 1)


def test_a_parallel_adapter_on_bert_reads_the_attention_output_and_adds_to_the_layer_output(tmp_path):
    """BERT has no single MLP module: the parallel adapter sits beside the whole feed-forward block (the
    output block with its residual and LayerNorm), reading the block's input, the attention output
    (argument 1 of BertOutput), computed here by hand from the bare layer."""
    bert = load_base(str(save_tiny("bert", tmp_path / "bert")))
    cfg = BottleneckConfig.for_model("bert", "parallel", init="nonzero", init_std=0.5, scaling=2.0)
    a = create_adapter("p", bert.model, cfg, seed=1)
    assert sorted(a.tensors) == ["encoder.layer.0.output", "encoder.layer.1.output"]
    assert a.tensors["encoder.layer.0.output"]["down"].shape[1] == bert.model.config.hidden_size
    layer = bert.model.get_submodule("encoder.layer.0")
    seen = {}
    layer.attention.register_forward_hook(lambda m, args, out: seen.__setitem__("attn", out[0] if isinstance(out, tuple) else out))
    # the layer's output is its output block's, after every hook on that block (the adapter's too)
    layer.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out[0] if isinstance(out, tuple) else out))
    ids = input_ids(2, 5)
    with torch.no_grad():
        bert.model(ids)
        bare_attn, bare_out = seen["attn"], seen["out"]
        rt = AdapterRuntime.from_base(bert)
        rt.add(a)
        with rt.batch(["p", None]):
            bert.model(ids)
    t = a.tensors["encoder.layer.0.output"]
    f = torch.relu(bare_attn @ t["down"].t() + t["down_bias"]) @ t["up"].t() + t["up_bias"]
    torch.testing.assert_close(seen["out"][0], bare_out[0] + 2.0 * f[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(seen["out"][1], bare_out[1])                # the base row: untouched


def test_bad_configs_and_shapes_are_refused_by_name(llama):
    with pytest.raises(ConfigError, match=r"bottleneck placement must be one of \('houlsby', 'pfeiffer', 'parallel'\)"):
        BottleneckConfig(placement="middle")
    with pytest.raises(ConfigError, match=r"bottleneck nonlinearity must be one of \['gelu', 'relu', 'silu'\]"):
        BottleneckConfig(nonlinearity="tanh")
    with pytest.raises(ConfigError, match="bottleneck reduction_factor must be a positive integer, got 0"):
        BottleneckConfig(reduction_factor=0)
    with pytest.raises(ConfigError, match="bottleneck scaling applies to parallel adapters"):
        BottleneckConfig(scaling=2.0)
    a = create_adapter("w", llama.model, BottleneckConfig(), seed=0)
    site = next(iter(a.tensors))
    a.tensors[site]["up"] = torch.zeros(32, 5)
    with pytest.raises(BaseMismatchError, match=rf"adapter 'w' does not fit this base at {site}"):
        AdapterRuntime.from_base(llama).add(a)


def test_the_serving_engine_runs_bottleneck_rows_with_the_runtime_s_tokens(tmp_path):
    """The engine's flat forward (hooks on o_proj and on the MLP block, per-token routing) gives each
    request the greedy tokens of the HF forward with that adapter alone."""
    from adapterkit.serve.engine import Engine, EngineConfig
    from adapterkit.serve.requests import GenerationRequest, SamplingParams
    from adapterkit.store import AdapterStore

    path = save_tiny("llama", tmp_path / "base")
    save_tiny_tokenizer(path)
    base = load_base(str(path))
    store = AdapterStore(tmp_path / "store")
    for name, placement in (("hou", "houlsby"), ("par", "parallel")):
        cfg = BottleneckConfig.for_model("llama", placement, reduction_factor=4, init="nonzero", init_std=3.0)
        store.put(create_adapter(name, base.model, cfg, seed=len(name) + ord(name[0]),
                                 fingerprint=base.fingerprint, base_name=base.name))
    prompts = {"hou": [1, 5, 9, 12, 40], "par": [1, 7, 7, 30], None: [1, 50, 60, 70]}
    rt = AdapterRuntime.from_base(base)
    for n in ("hou", "par"):
        rt.add(store.get(n))
    want = {}
    for n, ids in prompts.items():
        with torch.no_grad(), rt.batch([n]):
            out = base.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=2,
                                      pad_token_id=0)[0, len(ids):].tolist()
        want[n] = out[: out.index(2)] if 2 in out else out
    assert want["hou"] != want[None] and want["par"] != want[None]
    eng = Engine.build(str(path), store=store, config=EngineConfig()).start()
    try:
        streams = {n: eng.submit(GenerationRequest(ids, adapter=n, params=SamplingParams(max_tokens=6,
                                                                                         temperature=0.0)))
                   for n, ids in prompts.items()}
        got = {n: [t for t in (s.result(timeout=60) and s.token_ids) if t != 2] for n, s in streams.items()}
    finally:
        eng.stop()
    assert got == want


def test_train_cli_trains_a_bottleneck_classifier(tmp_path):
    from typer.testing import CliRunner

    from adapterkit.cli import app
    from adapterkit.store import AdapterStore
    from conftest import classification_files

    path, data = classification_files(tmp_path)
    args = ["train", "--method", "bottleneck", "--placement", "houlsby", "--reduction-factor", "8", "--nonlinearity",
            "silu", "--name", "b", "--base", str(path), "--train-file", str(data), "--steps", "20", "--store",
            str(tmp_path / "s"), "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    row = AdapterStore(tmp_path / "s").show("b")
    assert row["method"] == "bottleneck" and row["summary"] == "bottleneck houlsby silu size 4 on 4 sites"
    trained = AdapterStore(tmp_path / "s").get("b")
    assert all(p["up"].abs().max() > 0 for p in trained.tensors.values())      # up moved off zero
    res = CliRunner().invoke(app, ["train", "--placement", "houlsby", "--name", "c", "--base", str(path),
                                   "--train-file", str(data), "--store", str(tmp_path / "s"), "--no-progress"])
    assert res.exit_code != 0 and "set a bottleneck adapter; this run trains lora" in res.output


def test_train_cli_scales_a_parallel_bottleneck_and_refuses_a_series_scale(tmp_path):
    from typer.testing import CliRunner

    from adapterkit.cli import app
    from adapterkit.store import AdapterStore
    from conftest import classification_files

    path, data = classification_files(tmp_path)
    common = ["--name", "p", "--base", str(path), "--train-file", str(data), "--steps", "2", "--eval-every", "0",
              "--store", str(tmp_path / "s"), "--no-progress"]
    res = CliRunner().invoke(app, ["train", "--method", "bottleneck", "--placement", "parallel", "--scaling", "2.5",
                                   *common])
    assert res.exit_code == 0, res.output
    st = AdapterStore(tmp_path / "s")
    assert st.get("p").config.scaling == 2.5 and " scale 2.5 on " in st.show("p")["summary"]
    for flags, want in (([], 4.0), (["--scaling", "1"], 1.0)):        # the default is He et al.'s 4
        res = CliRunner().invoke(app, ["train", "--method", "bottleneck", "--placement", "parallel", "--overwrite",
                                       *flags, *common])
        assert res.exit_code == 0, res.output
        assert st.get("p").config.scaling == want
    res = CliRunner().invoke(app, ["train", "--method", "bottleneck", "--scaling", "4", "--overwrite", *common])
    assert res.exit_code != 0
    assert "bottleneck scaling applies to parallel adapters; a series adapter's is 1" in res.output
    res = CliRunner().invoke(app, ["train", "--scaling", "4", "--overwrite", *common])
    assert res.exit_code != 0 and "--scaling set a bottleneck adapter; this run trains lora" in res.output


def test_inspect_describes_a_native_family_by_its_summary(llama, tmp_path):
    from adapterkit.cli.inspect import describe

    create_adapter("b", llama.model, BottleneckConfig.for_model("llama", "houlsby"), seed=0).save(tmp_path / "b")
    info = describe(tmp_path / "b")
    assert info["method"] == "bottleneck" and info["summary"] == "bottleneck houlsby relu size 2 on 4 sites"
    assert info["weights"] == "native adapter.safetensors" and "rank" not in info and "alpha" not in info
