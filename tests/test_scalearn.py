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
    assert comp.num_parameters() == sum(p["omega"].numel() for p in comp.tensors.values())


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
    with pytest.raises(ConfigError, match="ScaLearn source 'inner' is itself a ScaLearn composition; compose its "
                                          "sources directly"):
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
    from adapterkit.train.compose import compose_scalearn

    store = AdapterStore(tmp_path / "store")
    for s in sources(llama, 3):
        s.meta.base_fingerprint, s.meta.base_name = llama.fingerprint, llama.name
        store.put(s)
    comp = compose_scalearn("comp", llama, [store.get("src0"), store.get("src1"), store.get("src2")], seed=3)
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
    from adapterkit.train.compose import compose_scalearn

    q = create_adapter("q", llama.model, LoraConfig(r=2, target_modules=["q_proj"]))
    v = create_adapter("v", llama.model, LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(ConfigError, match=r"the sources share no site: 'q' \(lora r=2 .*\); 'v' \(lora r=2 .*\); "
                                          "compose adapters that adapt the same modules"):
        compose_scalearn("c", llama, [q, v])
    v.meta.base_fingerprint, v.meta.base_name = "sha256:other", "other-base"
    with pytest.raises(BaseMismatchError, match="source adapter 'v' was made for base other-base"):
        compose_scalearn("c", llama, [q, v])
