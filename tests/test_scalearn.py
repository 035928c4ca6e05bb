"""ScaLearn compositions (methods/scalearn.py): ω weighs each frozen source's change at every site. The
contract matrix (test_contract.py) holds the pool to the float64 reference in mixed batches; these
pin what ScaLearn means: one-hot ω is that source alone, ω = 1 is stacking the sources, gradients reach
ω only, and compositions that cannot work are refused by name."""

from __future__ import annotations

import pytest
import torch
from conftest import TARGETS, save_tiny

from adapterkit import AdapterRuntime, ConfigError, Ia3Config, LoraConfig, create_adapter, load_base
from adapterkit.methods.scalearn import ScaLearnConfig, source_config_json


def sources(base, n=2):
    return [create_adapter(f"src{k}", base.model, LoraConfig(r=2 + k, target_modules=TARGETS["llama"],
                                                             init="nonzero", init_std=0.3), seed=k)
            for k in range(n)]


def composition(base, srcs, omega=None, variant="vector", name="comp"):
    """A ScaLearn adapter over `srcs` carrying their tensors, with ω set to `omega` (rows per source) if given."""
    config = ScaLearnConfig(sources=tuple(s.name for s in srcs), source_configs=tuple(source_config_json(s.config)
                                                                                      for s in srcs),
                            target_modules=TARGETS["llama"], variant=variant)
    comp = create_adapter(name, base.model, config, seed=7)
    for site, parts in comp.tensors.items():
        for k, s in enumerate(srcs):
            parts.update({f"s{k}_{key}": t.clone() for key, t in s.tensors[site].items()})
        if omega is not None:
            parts["omega"] = torch.tensor(omega, dtype=torch.float32)[:, None].expand_as(parts["omega"]).clone()
    return comp


@pytest.fixture
def llama(tmp_path):
    """One architecture is enough here: the contract matrix covers the others."""
    return load_base(str(save_tiny("llama", tmp_path / "llama")))


def logits(rt, rows, ids):
    with torch.no_grad(), rt.batch(rows):
        return rt.model(ids).logits


def test_one_hot_omega_is_that_source_alone_and_ones_are_the_sources_stacked(llama):
    srcs = sources(llama)
    rt = AdapterRuntime.from_base(llama)
    for s in srcs:
        rt.add(s)
    rt.add(composition(llama, srcs, omega=[0.0, 1.0], name="only1"))
    rt.add(composition(llama, srcs, omega=[1.0, 1.0], name="both"))
    ids = torch.randint(3, 60, (1, 7)).expand(4, 7)              # the same tokens on every row
    got = logits(rt, ["only1", "both", "src1", {"src0": 1.0, "src1": 1.0}], ids)
    torch.testing.assert_close(got[0], got[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], got[3], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[1], atol=1e-3)          # the sources differ: the test can fail


def test_a_row_with_the_composition_does_not_change_its_neighbours(llama):
    srcs = sources(llama)
    rt = AdapterRuntime.from_base(llama)
    for s in srcs:
        rt.add(s)
    rt.add(composition(llama, srcs))
    ids = torch.randint(3, 60, (3, 6))
    mixed = logits(rt, ["comp", "src0", None], ids)
    alone = torch.cat([logits(rt, [r], ids[i:i + 1]) for i, r in enumerate(["comp", "src0", None])])
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["vector", "uniform", "shared", "shared-uniform"])
def test_gradients_reach_omega_only(llama, variant):
    srcs = sources(llama)
    comp = composition(llama, srcs, variant=variant)
    modules = dict(llama.model.named_modules())
    for site, parts in comp.tensors.items():
        parts["omega"].requires_grad_(True)
        width = 1 if variant.endswith("uniform") else modules[site].out_features
        assert parts["omega"].shape == (2, width)
    rt = AdapterRuntime.from_base(llama)
    rt.add(comp)
    rt.activate("comp")
    rt.model(torch.randint(3, 60, (2, 5))).logits.square().mean().backward()
    grads = [parts["omega"].grad for parts in comp.tensors.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert not any(t.requires_grad for parts in comp.tensors.values() for k, t in parts.items() if k != "omega")
    layers = len({s.split(".")[2] for s in comp.tensors})                 # model.layers.<i>....
    shared = 1 / layers if variant.startswith("shared") else 1                # one ω per kind for all layers
    assert comp.num_parameters() == shared * sum(p["omega"].numel() for p in comp.tensors.values())


def test_compositions_that_cannot_work_are_refused(llama):
    srcs = sources(llama)
    lora_json = source_config_json(srcs[0].config)
    ia3 = Ia3Config(target_modules=TARGETS["llama"], feedforward_modules=(TARGETS["llama"][-1],))
    mixed = ScaLearnConfig(sources=("a", "b"), source_configs=(lora_json, source_config_json(ia3)),
                           target_modules=TARGETS["llama"])
    with pytest.raises(ConfigError, match=r"ScaLearn sources attach to .*o_proj in different ways "
                                          r"\(\['input', 'output'\]\); compose sources of one attachment"):
        create_adapter("bad", llama.model, mixed)
    inner = composition(llama, srcs).config
    with pytest.raises(ConfigError, match=r"ScaLearn source 'inner' is itself a composition \(scalearn\); compose "
                                          "its sources directly"):
        ScaLearnConfig(sources=("inner",), source_configs=(source_config_json(inner),),
                       target_modules=TARGETS["llama"])
    with pytest.raises(ConfigError, match="ScaLearn variant must be one of vector, uniform, shared, "
                                          "shared-uniform, got 'softmax'"):
        ScaLearnConfig(sources=("a",), source_configs=(lora_json,), target_modules=TARGETS["llama"],
                       variant="softmax")
    with pytest.raises(ConfigError, match=r"ScaLearn sources must differ; got \['a', 'a'\]"):
        ScaLearnConfig(sources=("a", "a"), source_configs=(lora_json, lora_json), target_modules=TARGETS["llama"])


def test_a_composition_of_stored_adapters_reloads_and_refuses_replaced_or_deleted_sources(llama, tmp_path):
    from adapterkit.errors import StaleSourceError
    from adapterkit.store import AdapterStore
    from adapterkit.train.compose import compose

    store = AdapterStore(tmp_path / "store")
    for s in sources(llama, 3):
        s.meta.base_fingerprint, s.meta.base_name = llama.fingerprint, llama.name
        store.put(s)
    comp = compose("comp", llama, [store.get("src0"), store.get("src1"), store.get("src2")], seed=3)
    assert comp.num_parameters() == sum(p["omega"].numel() for p in comp.tensors.values())
    assert [s["name"] for s in comp.meta.lineage[0]["sources"]] == ["src0", "src1", "src2"]
    store.put(comp)
    again = store.get("comp")
    rt = AdapterRuntime.from_base(llama)
    rt.add(comp)
    rt.add(again, key="again")
    ids = torch.randint(3, 60, (1, 6)).expand(2, 6)
    out = logits(rt, ["comp", "again"], ids)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    store.put(create_adapter("src1", llama.model, LoraConfig(r=2, target_modules=TARGETS["llama"], init="nonzero"),
                             seed=42), overwrite=True)
    with pytest.raises(StaleSourceError, match=r"adapter 'comp' composes 'src1', which the store no longer holds "
                                               r"as composed: adapter 'src1' was replaced in the store \(content "
                                               r"sha256:\w+, composed over sha256:\w+\); compose and train "
                                               r"it again over the current sources"):
        store.get("comp")
    store.remove("src2")
    with pytest.raises(StaleSourceError, match="adapter 'src2' was deleted from the store"):
        store.get("comp")


def test_sources_must_share_a_site_and_a_base(llama, tmp_path):
    from adapterkit import BaseMismatchError
    from adapterkit.train.compose import compose

    q = create_adapter("q", llama.model, LoraConfig(r=2, target_modules=["q_proj"]))
    v = create_adapter("v", llama.model, LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(ConfigError, match=r"the sources share no site: 'q' \(lora r=2 .*\); 'v' \(lora r=2 .*\); "
                                          "compose adapters that adapt the same modules"):
        compose("c", llama, [q, v])
    v.meta.base_fingerprint, v.meta.base_name = "sha256:other", "other-base"
    with pytest.raises(BaseMismatchError, match="source adapter 'v' was made for base other-base"):
        compose("c", llama, [q, v])


@pytest.mark.parametrize("variant", ["vector", "shared"])
def test_train_cli_learns_omega_over_stored_sources_and_nothing_else(tmp_path, variant):
    """`adapterkit train --method scalearn --sources a,b`: the sources stay as stored, ω moves (tied across
    layers for the shared variant), the trainable parameters are ω's, the lineage pins the sources."""
    from typer.testing import CliRunner

    from adapterkit.cli import app
    from adapterkit.merge.common import content_fingerprint
    from adapterkit.store import AdapterStore
    from conftest import classification_files

    path, data = classification_files(tmp_path)
    common = ["--base", str(path), "--train-file", str(data), "--store", str(tmp_path / "s"), "--no-progress"]
    for name in ("a", "b"):
        res = CliRunner().invoke(app, ["train", "--name", name, "--steps", "3", "--seed", str(ord(name)), *common])
        assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["train", "--method", "scalearn", "--sources", "a,b", "--variant", variant,
                                   "--name", "c", "--steps", "12", *common])
    assert res.exit_code == 0, res.output
    store = AdapterStore(tmp_path / "s")
    comp, a, b = store.get("c"), store.get("a"), store.get("b")
    assert comp.summary() == f"scalearn {variant} over a, b on 8 sites"
    assert store.show("c")["lineage"][0]["inputs"] == [{"name": "a", "fingerprint": content_fingerprint(a)},
                                                        {"name": "b", "fingerprint": content_fingerprint(b)}]
    for site, parts in comp.tensors.items():
        for i, src in enumerate((a, b)):
            for key, t in src.tensors[site].items():
                assert torch.equal(parts[f"s{i}_{key}"], t)                     # the sources did not train
    omegas = {site: p["omega"] for site, p in comp.tensors.items()}
    assert max(float((w - 1.0).abs().max()) for w in omegas.values()) > 1e-3    # ω moved from 2/N = 1
    q = [w for site, w in omegas.items() if site.endswith("q_proj")]
    assert all(torch.equal(q[0], w) for w in q[1:]) == (variant == "shared")   # one ω for every layer's q_proj
    per_layer = 1 / 2 if variant == "shared" else 1                                # the tiny model has 2 layers
    assert comp.num_parameters() == per_layer * sum(w.numel() for w in omegas.values())


def test_train_cli_refuses_a_composition_without_sources_or_of_itself(tmp_path):
    from typer.testing import CliRunner

    from adapterkit.cli import app
    from conftest import classification_files

    path, data = classification_files(tmp_path)
    common = ["--base", str(path), "--train-file", str(data), "--store", str(tmp_path / "s"), "--no-progress"]
    res = CliRunner().invoke(app, ["train", "--method", "scalearn", "--name", "c", "--steps", "2", *common])
    assert res.exit_code != 0 and "--method scalearn composes stored adapters: name them with --sources a,b,c" \
        in res.output
    res = CliRunner().invoke(app, ["train", "--sources", "a", "--name", "c", "--steps", "2", *common])
    assert res.exit_code != 0 and "--sources set a scalearn adapter; this run trains lora: add --method scalearn" \
        in res.output
    res = CliRunner().invoke(app, ["train", "--method", "scalearn", "--sources", "c,a", "--name", "c", "--steps",
                                   "2", *common])
    assert res.exit_code != 0 and "the composition 'c' cannot be one of its own --sources" in res.output


def test_the_server_answers_with_a_composition_and_refuses_one_whose_source_changed(llama, tmp_path):
    import asyncio

    import httpx

    from adapterkit.serve.api import ApiSettings, create_app
    from adapterkit.serve.engine import Engine, EngineConfig
    from adapterkit.store import AdapterStore
    from adapterkit.train.compose import compose
    from conftest import save_tiny_tokenizer

    path = save_tiny("llama", tmp_path / "base")
    save_tiny_tokenizer(path)
    base = load_base(str(path))
    store = AdapterStore(tmp_path / "store")
    for s in sources(base, 2):
        s.meta.base_fingerprint, s.meta.base_name = base.fingerprint, base.name
        store.put(s)
    for name in ("c1", "c2"):
        store.put(compose(name, base, [store.get("src0"), store.get("src1")], seed=len(name)))
    engine = Engine.build(str(path), store=store, config=EngineConfig(max_batch=4)).start()

    async def ask(model):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(engine, ApiSettings())),
                                     base_url="http://t") as c:
            return await c.post("/v1/completions", json={"model": model, "prompt": "w1 w2", "max_tokens": 3,
                                                         "temperature": 0})
    try:
        assert asyncio.run(ask("c1")).status_code == 200
        store.put(create_adapter("src0", base.model, LoraConfig(r=2, target_modules=TARGETS["llama"]),
                                 fingerprint=base.fingerprint, base_name=base.name), overwrite=True)
        r = asyncio.run(ask("c2"))                     # not loaded before: read now, and refused
        assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_sources_changed"
        assert "adapter 'c2' composes 'src0', which the store no longer holds as composed" in \
            r.json()["error"]["message"]
    finally:
        engine.stop(drain=False)


def test_adapterfusion_starts_near_the_mean_of_its_sources_and_trains_its_projections_only(llama):
    """With Wq = 0 the attention is uniform and Wv = I: the mean of the sources' outputs, which for LoRA
    sources is the row {src0: 0.5, src1: 0.5}."""
    from adapterkit import FusionConfig

    srcs = sources(llama)
    config = FusionConfig(sources=("src0", "src1"), source_configs=tuple(source_config_json(s.config) for s in srcs),
                          target_modules=TARGETS["llama"])
    fused = create_adapter("fused", llama.model, config, seed=1)
    for site, parts in fused.tensors.items():
        for k, s in enumerate(srcs):
            parts.update({f"s{k}_{key}": t.clone() for key, t in s.tensors[site].items()})
        d = parts["value"].shape[0]
        assert torch.equal(parts["value"], torch.eye(d)) and parts["query"].shape == parts["key"].shape == (d, d)
        parts["query"].zero_()
    rt = AdapterRuntime.from_base(llama)
    for a in (*srcs, fused):
        rt.add(a)
    ids = torch.randint(3, 60, (1, 6)).expand(2, 6)
    got = logits(rt, ["fused", {"src0": 0.5, "src1": 0.5}], ids)
    torch.testing.assert_close(got[0], got[1], rtol=1e-5, atol=1e-5)
    assert fused.num_parameters() == sum(3 * p["value"].numel() for p in fused.tensors.values())
    rt.remove("fused")
    for parts in fused.tensors.values():
        parts["query"].normal_(0, 0.3)
        for key in ("query", "key", "value"):
            parts[key].requires_grad_(True)
    rt.add(fused)
    rt.activate("fused")
    rt.model(ids).logits.square().mean().backward()
    assert all(p[k].grad is not None and p[k].grad.abs().sum() > 0 for p in fused.tensors.values()
               for k in ("query", "key", "value"))


def test_train_cli_trains_an_adapterfusion_over_stored_sources(tmp_path):
    from typer.testing import CliRunner

    from adapterkit.cli import app
    from adapterkit.store import AdapterStore
    from conftest import classification_files

    path, data = classification_files(tmp_path)
    common = ["--base", str(path), "--train-file", str(data), "--store", str(tmp_path / "s"), "--no-progress"]
    for name in ("a", "b"):
        res = CliRunner().invoke(app, ["train", "--name", name, "--steps", "3", "--seed", str(ord(name)), *common])
        assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["train", "--method", "fusion", "--sources", "a,b", "--variant", "uniform",
                                   "--name", "f", "--steps", "2", *common])
    assert res.exit_code != 0 and "--variant set a scalearn adapter; this run trains fusion" in res.output
    res = CliRunner().invoke(app, ["train", "--method", "fusion", "--sources", "a,b", "--name", "f", "--steps", "6",
                                   *common])
    assert res.exit_code == 0, res.output
    fused = AdapterStore(tmp_path / "s").get("f")
    assert fused.summary() == "fusion over a, b on 8 sites"
    assert any(not torch.equal(p["value"], torch.eye(p["value"].shape[0])) for p in fused.tensors.values())



def test_adapterfusion_combine_equals_the_papers_formula():
    """The reassociated combine (3 d x d products per token) equals attention written out per source."""
    from adapterkit.methods.fusion import FUSION

    g = torch.Generator().manual_seed(0)
    d, n = 8, 3
    own = {k: torch.randn(d, d, generator=g, dtype=torch.float64) for k in ("query", "key", "value")}
    base = torch.randn(2, 5, d, generator=g, dtype=torch.float64)
    outs = [torch.randn(2, 5, d, generator=g, dtype=torch.float64) for _ in range(n)]
    q = base @ own["query"].t()
    scores = torch.stack([(q * (o @ own["key"].t())).sum(-1) for o in outs], -1).softmax(-1)
    want = sum(scores[..., i:i + 1] * (o @ own["value"].t()) for i, o in enumerate(outs))
    torch.testing.assert_close(FUSION.combine(None, own, base, outs, False), want)
