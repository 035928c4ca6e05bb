"""IA3 (issue 13 §3): PEFT's format both ways with equal outputs, training losses equal to PEFT's from
the same init, merge / unmerge bit-exact (biases too), mixed batches with other families equal to
the float64 reference, and bad input refused by name."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import input_ids, save_tiny
from method_reference import reference

from adapterkit import Adapter, AdapterRuntime, LoraConfig, create_adapter, load_base
from adapterkit.errors import BaseMismatchError, ConfigError, CorruptAdapterError, UnsupportedError
from adapterkit.methods.ia3 import Ia3Config

peft = pytest.importorskip("peft")

ATOL, RTOL = 1e-5, 1e-4
KINDS = ["llama", "bert", "gpt2"]
MODEL_TYPE = {"llama": "llama", "bert": "bert", "gpt2": "gpt2"}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread (conftest.one_thread)."""


def out(model, ids):
    o = model(ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def peft_ia3(base, kind, seed=0):
    """A PEFT IA3 model over a copy of the base with random vectors around 1 (PEFT's defaults per kind)."""
    targets, ff = Ia3Config.for_model(MODEL_TYPE[kind]).target_modules, Ia3Config.for_model(kind).feedforward_modules
    model = peft.get_peft_model(copy.deepcopy(base.model), peft.IA3Config(target_modules=list(targets),
                                                                          feedforward_modules=list(ff)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_a_peft_ia3_folder_runs_like_peft(kind, tmp_path):
    base = load_base(str(save_tiny(kind, tmp_path / kind)))
    model = peft_ia3(base, kind)
    model.save_pretrained(str(tmp_path / "ia3"))
    adapter = Adapter.load(tmp_path / "ia3")
    assert adapter.config.type == "ia3" and adapter.summary().startswith("ia3 on ")
    ids = input_ids(3, 6)
    rt = AdapterRuntime.from_base(base)
    rt.add(adapter)
    with torch.no_grad():
        want, bare = out(model, ids), out(base.model, ids)
        assert (want - bare).abs().max() > 1e-2                      # the adapter moves the output
        with rt.batch([adapter.name] * 3):
            torch.testing.assert_close(out(base.model, ids), want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", KINDS)
def test_an_adapterkit_ia3_adapter_loads_in_peft_with_equal_outputs(kind, tmp_path):
    base = load_base(str(save_tiny(kind, tmp_path / kind)))
    adapter = create_adapter("mine", base.model, Ia3Config.for_model(kind, init="nonzero", init_std=0.3), seed=1)
    adapter.save(tmp_path / "mine")
    cfg = json.loads((tmp_path / "mine" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and cfg["feedforward_modules"]
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base.model), str(tmp_path / "mine")).eval()
    rt = AdapterRuntime.from_base(base)
    rt.add(adapter)
    ids = input_ids(2, 5)
    with torch.no_grad(), rt.batch(["mine"] * 2):
        torch.testing.assert_close(out(base.model, ids), out(model, ids), atol=ATOL, rtol=RTOL)
    assert (Adapter.load(tmp_path / "mine").tensors.keys() == adapter.tensors.keys())


def test_training_losses_equal_peft_from_the_same_init(tmp_path):
    """The same five AdamW steps on the same batches: adapterkit's dense path (live tensors) and PEFT."""
    base = load_base(str(save_tiny("llama", tmp_path / "llama")))
    model = peft_ia3(base, "llama", seed=3)
    model.save_pretrained(str(tmp_path / "init"))
    adapter = Adapter.load(tmp_path / "init")
    rt = AdapterRuntime.from_base(base)
    for parts in adapter.tensors.values():
        for t in parts.values():
            t.requires_grad_(True)
    rt.add(adapter)
    ours = [t for parts in adapter.tensors.values() for t in parts.values()]
    theirs = [p for n, p in model.named_parameters() if p.requires_grad]
    assert len(ours) == len(theirs) > 0
    opt_a, opt_b = torch.optim.AdamW(ours, lr=1e-2), torch.optim.AdamW(theirs, lr=1e-2)
    rt.activate(adapter.name)
    losses = []
    for step in range(5):
        ids = input_ids(4, 7, seed=step)
        pair = []
        for m, opt in ((base.model, opt_a), (model, opt_b)):
            loss = m(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            pair.append(float(loss))
        losses.append(pair)
    rt.deactivate()
    for a, b in losses:
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert losses[0][0] != pytest.approx(losses[-1][0], rel=1e-3)   # training moved


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
def test_merge_equals_the_adapter_and_unmerge_is_bit_exact(kind, tmp_path):
    """bert's sites have biases: an output scale scales the bias too (as PEFT's merge does)."""
    base = load_base(str(save_tiny(kind, tmp_path / kind)))
    adapter = create_adapter("m", base.model, Ia3Config.for_model(kind, init="nonzero", init_std=0.3), seed=2)
    rt = AdapterRuntime.from_base(base)
    rt.add(adapter)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    ids = input_ids(2, 6)
    with torch.no_grad():
        with rt.batch(["m"] * 2):
            want = out(base.model, ids)
        rt.merge("m")
        merged = out(base.model, ids)
        assert any(not torch.equal(before[k], v) for k, v in base.model.state_dict().items())
        torch.testing.assert_close(merged, want, atol=ATOL, rtol=RTOL)
        rt.unmerge()
        for k, v in base.model.state_dict().items():
            assert torch.equal(before[k], v), k


def test_merging_ia3_and_lora_in_either_order_equals_them_stacked_and_unmerges_bit_exactly(tmp_path):
    """IA3 scales what LoRA made (l ⊙ (W + ΔW) x, and (W + ΔW)(l ⊙ x) at the MLP's input): merging IA3
    first and LoRA after must not give l ⊙ W + ΔW. Merges apply in stage order whatever the call order,
    weights kept; export_merged restores earlier merges with their weights."""
    base = load_base(str(save_tiny("llama", tmp_path / "llama")))
    ia3 = create_adapter("s", base.model, Ia3Config.for_model("llama", init="nonzero", init_std=0.3), seed=2)
    lora = create_adapter("l", base.model, LoraConfig(r=2, init="nonzero", init_std=0.3,
                                                      target_modules=("k_proj", "v_proj", "down_proj")), seed=3)
    rt = AdapterRuntime.from_base(base)
    rt.add(ia3)
    rt.add(lora)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    ids = input_ids(2, 6)
    with torch.no_grad():
        with rt.batch([{"s": 1.0, "l": 0.5}] * 2):
            want = out(base.model, ids)
        for order in (["s", "l"], ["l", "s"]):
            for name in order:
                rt.merge(name, 0.5 if name == "l" else 1.0)
            assert rt.merged == ["l", "s"]
            torch.testing.assert_close(out(base.model, ids), want, atol=ATOL, rtol=RTOL)
            merged = {k: v.clone() for k, v in base.model.state_dict().items()}
            rt.export_merged(tmp_path / f"export-{order[0]}", ["l"])        # already merged: a no-op, then restored
            assert all(torch.equal(merged[k], v) for k, v in base.model.state_dict().items())
            rt.unmerge()
            assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())
        rt.merge("l", 0.5)
        rt.export_merged(tmp_path / "with-s", ["s"])                    # merges s, then back to l at 0.5 alone
        with rt.batch([{"s": 1.0}] * 2):
            assert rt.merged == ["l"]
            torch.testing.assert_close(out(base.model, ids), want, atol=ATOL, rtol=RTOL)


def test_mixed_batch_of_ia3_lora_and_base_rows_equals_the_reference(tmp_path):
    base = load_base(str(save_tiny("llama", tmp_path / "llama")))
    ia3 = create_adapter("i", base.model, Ia3Config(init="nonzero", init_std=0.3), seed=1)
    ia3b = create_adapter("j", base.model, Ia3Config(target_modules=("q_proj", "down_proj"), init="nonzero",
                                                     init_std=0.3), seed=2)
    lora = create_adapter("l", base.model, LoraConfig(r=2, target_modules=("k_proj", "down_proj"), init="nonzero",
                                                       init_std=0.3), seed=3)
    rt = AdapterRuntime.from_base(base, capacity=2)
    for a in (ia3, ia3b, lora):
        rt.add(a)
    ids = input_ids(5, 6)
    rows = [[ia3], [lora], [], [ia3, lora], [ia3b]]
    want = reference(base.model, rows, ids)
    entries = ["i", "l", None, {"i": 1.0, "l": 1.0}, "j"]
    for kernel in ("dense", "gather", "segment"):
        if kernel == "segment":
            entries_k, rows_k, ids_k = ["i", "l", None, "j"], [0, 1, 2, 4], ids[[0, 1, 2, 4]]
        else:
            entries_k, rows_k, ids_k = entries, list(range(5)), ids
        with torch.no_grad(), rt.batch(entries_k, kernel=kernel):
            got = base.model(ids_k).logits
        torch.testing.assert_close(got.double(), want[rows_k], atol=1e-4, rtol=1e-4)


def test_a_weight_scales_the_change_and_sums_to_one_equal_peft_weighted_merge(tmp_path):
    """Row weights w_i: scale 1 + Σ w_i (l_i - 1); with Σ w_i = 1 that is PEFT's l = Σ w_i l_i."""
    base = load_base(str(save_tiny("llama", tmp_path / "llama")))
    a = create_adapter("a", base.model, Ia3Config(init="nonzero", init_std=0.3), seed=1)
    b = create_adapter("b", base.model, Ia3Config(init="nonzero", init_std=0.3), seed=2)
    mixed = create_adapter("ab", base.model, Ia3Config(), seed=0)
    for site in mixed.tensors:
        mixed.tensors[site]["ia3_l"] = 0.25 * a.tensors[site]["ia3_l"] + 0.75 * b.tensors[site]["ia3_l"]
    rt = AdapterRuntime.from_base(base)
    for x in (a, b, mixed):
        rt.add(x)
    ids = input_ids(1, 5).repeat(2, 1)             # one prompt: the mixed row and the merged row
    with torch.no_grad():
        with rt.batch([{"a": 0.25, "b": 0.75}, "ab"], kernel="gather"):
            got = base.model(ids).logits
        with rt.batch([{"a": 0.25, "b": 0.75}, "ab"], kernel="dense"):
            dense = base.model(ids).logits
    torch.testing.assert_close(got[0], got[1], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(dense, got, atol=ATOL, rtol=RTOL)


def test_bad_ia3_input_is_refused_by_name(tmp_path):
    base = load_base(str(save_tiny("llama", tmp_path / "llama")))
    model = peft_ia3(base, "llama")
    model.save_pretrained(str(tmp_path / "ia3"))
    from safetensors.torch import load_file, save_file

    w = tmp_path / "ia3" / "adapter_model.safetensors"
    flat = load_file(str(w))
    key = next(k for k in flat if "k_proj" in k)
    flat[key] = flat[key].reshape(1, -1)                       # an output vector saved as [1, d]
    save_file(flat, str(w))
    with pytest.raises(CorruptAdapterError, match=r"site '.*k_proj' has ia3_l \(1, \d+\); an IA3 vector at a "
                                                  r"non-feedforward site is \[d_out, 1\]"):
        Adapter.load(tmp_path / "ia3")
    wrong = create_adapter("w", base.model, Ia3Config(), seed=0)
    site = next(s for s in wrong.tensors if "k_proj" in s)
    wrong.tensors[site]["ia3_l"] = torch.ones(7, 1)
    with pytest.raises(BaseMismatchError, match=rf"adapter 'w' does not fit this base at {site}: tensors "
                                                r"\{'ia3_l': \(7, 1\)\}"):
        AdapterRuntime.from_base(base).add(wrong)
    with pytest.raises(ConfigError, match=r"IA3 feedforward_modules \['up_proj'\] must be among target_modules"):
        Ia3Config(target_modules=("k_proj",), feedforward_modules=("up_proj",))


def test_weight_space_merges_other_than_linear_are_refused_by_name(tmp_path):
    from adapterkit.merge import merge

    base = load_base(str(save_tiny("llama", tmp_path / "llama")))
    a = create_adapter("a", base.model, Ia3Config(init="nonzero"), seed=1)
    b = create_adapter("b", base.model, Ia3Config(init="nonzero"), seed=2)
    with pytest.raises(UnsupportedError, match="merge 'ties' is not defined for adapter 'a', an IA3 adapter: it "
                                               r"defines \['linear'\]"):
        merge([a, b], method="ties")


def test_linear_merge_is_peft_add_weighted_adapter(tmp_path):
    """l = Σ w_i l_i, compared with PEFT's own add_weighted_adapter on the same two adapters."""
    from adapterkit.merge import merge

    base = load_base(str(save_tiny("llama", tmp_path / "llama")))
    models = [peft_ia3(base, "llama", seed=s) for s in (1, 2)]
    for i, m in enumerate(models):
        m.save_pretrained(str(tmp_path / f"in{i}"))
    a, b = (Adapter.load(tmp_path / f"in{i}", name=f"in{i}") for i in range(2))
    merged = merge([a, b], method="linear", weights=[0.3, 0.7], name="ab")
    assert merged.config.type == "ia3" and merged.meta.lineage[0]["method"] == "linear"
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base.model), str(tmp_path / "in0"), adapter_name="in0")
    pm.load_adapter(str(tmp_path / "in1"), adapter_name="in1")
    pm.add_weighted_adapter(["in0", "in1"], [0.3, 0.7], "ab")
    pm.set_adapter("ab")
    rt = AdapterRuntime.from_base(base)
    rt.add(merged)
    ids = input_ids(2, 6)
    with torch.no_grad(), rt.batch(["ab"] * 2):
        torch.testing.assert_close(out(base.model, ids), out(pm.eval(), ids), atol=ATOL, rtol=RTOL)
    with pytest.raises(ConfigError, match="has no rank"):
        merge([a, b], method="linear", rank=2)
    lora = create_adapter("l", base.model, LoraConfig(r=2), seed=0)
    with pytest.raises(UnsupportedError, match="merge 'linear' combines adapters of one family; the inputs are "
                                               "ia3, lora adapters"):
        merge([a, lora], method="linear")


def test_train_cli_trains_an_ia3_classifier_end_to_end(tmp_path):
    """`adapterkit train --method ia3`: PEFT's targets for the base, the IA3 lr, stored in PEFT's format,
    and the trained vectors moved from ones only where IA3 sits."""
    from typer.testing import CliRunner

    from adapterkit.cli import app
    from adapterkit.store import AdapterStore
    from conftest import classification_files

    path, data = classification_files(tmp_path)
    res = CliRunner().invoke(app, ["train", "--method", "ia3", "--name", "i", "--base", str(path), "--train-file",
                                   str(data), "--eval-file", str(data), "--steps", "30", "--store",
                                   str(tmp_path / "s"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "defaults for classification with ia3 on 12 examples: batch 16, lr 0.01," in res.output
    store = AdapterStore(tmp_path / "s")
    row, adapter = store.show("i"), store.get("i")
    assert row["method"] == "ia3" and row["summary"] == "ia3 on 4 outputs, 2 inputs"
    assert json.loads((store.path("i") / "adapter_config.json").read_text())["peft_type"] == "IA3"
    assert row["lineage"][0]["params"]["method"] == "ia3" and row["lineage"][0]["params"]["lr"] == 0.01
    moved = [float((p["ia3_l"] - 1).abs().max()) for p in adapter.tensors.values()]
    assert min(moved) > 0 and sorted(s.rsplit(".", 1)[-1] for s in adapter.tensors) == \
        ["down_proj", "down_proj", "k_proj", "k_proj", "v_proj", "v_proj"]
    res = CliRunner().invoke(app, ["train", "--method", "loha", "--name", "b", "--base", str(path),
                                   "--train-file", str(data), "--store", str(tmp_path / "s"), "--no-progress"])
    assert res.exit_code != 0 and "unknown adapter method 'loha'" in res.output


def test_the_serving_engine_runs_ia3_rows_beside_lora_rows_like_peft(tmp_path):
    """The engine's own flat forward (per-token routing): IA3, LoRA and base requests in one batch, each
    greedy output equal to PEFT's single-adapter generate."""
    from conftest import ATTN, save_tiny_tokenizer, tiny_llama

    from adapterkit.serve.engine import Engine, EngineConfig
    from adapterkit.serve.requests import GenerationRequest, SamplingParams

    base = save_tiny("llama", tmp_path / "base")
    save_tiny_tokenizer(base)
    torch.manual_seed(0)
    ia3 = peft.get_peft_model(tiny_llama(), peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                           feedforward_modules=["down_proj"]))
    with torch.no_grad():
        for n, p in ia3.named_parameters():
            if "ia3_l" in n:
                p.copy_(torch.rand(p.shape) * 3)           # far from ones: the tokens change
    ia3.save_pretrained(str(tmp_path / "adapters" / "scale"))
    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=ATTN, init_lora_weights=False))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.mul_(20)
    lora.save_pretrained(str(tmp_path / "adapters" / "low"))

    def peft_greedy(name, ids, n):
        model = tiny_llama()
        if name is not None:
            model = peft.PeftModel.from_pretrained(model, str(tmp_path / "adapters" / name)).eval()
        with torch.no_grad():
            got = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=2,
                                 pad_token_id=0)[0, len(ids):].tolist()
        return got[: got.index(2)] if 2 in got else got

    eng = Engine.build(str(base), adapter_dirs=[tmp_path / "adapters"], config=EngineConfig()).start()
    try:
        prompts = {"scale": [1, 5, 9, 12, 40], "low": [1, 7, 7, 30], None: [1, 50, 60, 70, 80, 90]}
        streams = {n: eng.submit(GenerationRequest(ids, adapter=n, params=SamplingParams(max_tokens=8,
                                                                                         temperature=0.0)))
                   for n, ids in prompts.items()}
        got = {n: s.result(timeout=60) and s.token_ids for n, s in streams.items()}
    finally:
        eng.stop()
    want = {n: peft_greedy(n, ids, 8) for n, ids in prompts.items()}
    assert want["scale"] != want[None]                     # the IA3 adapter changes the tokens
    assert {n: [t for t in v if t != 2] for n, v in got.items()} == want
