"""Bad input gets a clear error naming the problem and the fix; nothing stored is harmed."""

import json

import pytest
import torch
from conftest import ATTN, input_ids, save_tiny, tiny_llama

import adapterkit.core.adapter as adapter_mod
from adapterkit import (Adapter, AdapterNameError, AdapterNotFoundError, AdapterRuntime, BaseMismatchError,
                        ConfigError, CorruptAdapterError, LoraConfig, TargetError, create_adapter, load_base)
from adapterkit._atomic import recover_dir


@pytest.fixture
def llama(tmp_path):
    return load_base(str(save_tiny("llama", tmp_path / "llama")))


def make(base, name="a", seed=0, **cfg):
    cfg.setdefault("target_modules", ATTN)
    return create_adapter(name, base.model, LoraConfig(init="nonzero", init_std=0.2, **cfg), seed=seed,
                          fingerprint=base.fingerprint, base_name=base.name)


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "LoRA r must be a positive integer, got 0: set r >= 1"),
    (dict(r=-3), "LoRA r must be a positive integer, got -3"),
    (dict(alpha=-1.0), "LoRA alpha must be a non-negative number, got -1.0"),
    (dict(rank_pattern={"q_proj": 0}), r"LoRA rank_pattern\['q_proj'\] must be a positive integer"),
    (dict(dropout=1.0), r"LoRA dropout must be in \[0, 1\), got 1.0"),
    (dict(init="zeros"), "LoRA init must be one of"),
    (dict(target_modules=[]), "LoRA target_modules is empty"),
])
def test_bad_lora_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kwargs)


def test_unknown_config_field():
    with pytest.raises(ConfigError, match=r"unknown LoRA config field\(s\) \['rank'\]"):
        LoraConfig.from_dict({"type": "lora", "rank": 4})


def test_target_that_matches_nothing_lists_the_linear_layers(llama):
    with pytest.raises(TargetError, match=r"target_modules \['query'\] match no module of the base model; "
                                          r"its linear layers are named: down_proj, gate_proj, k_proj"):
        make(llama, target_modules=["query"])


@pytest.mark.parametrize("name", ["", "has space", "../escape", "-lead", "x" * 129, "a/b"])
def test_malformed_names(llama, name):
    with pytest.raises(AdapterNameError, match="is malformed: use 1-128 letters, digits"):
        make(llama, name=name)


def test_name_clash_and_unknown_name(llama):
    rt = AdapterRuntime.from_base(llama)
    rt.add(make(llama, "alpha"))
    rt.add(make(llama, "beta", seed=1))
    with pytest.raises(AdapterNameError, match="an adapter named 'alpha' is already attached; remove it first"):
        rt.add(make(llama, "alpha", seed=2))
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'gamma'; attached adapters: alpha, beta"):
        rt.make_batch(["alpha", "gamma"])
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'gamma'"):
        rt.remove("gamma")


def test_adapter_for_another_base_is_refused_by_fingerprint(llama, tmp_path):
    other = load_base(str(save_tiny("llama", tmp_path / "other", seed=5)))   # same shapes, other weights
    rt = AdapterRuntime.from_base(llama)
    foreign = make(other, "foreign")
    with pytest.raises(BaseMismatchError, match=rf"made for base .*other \({other.fingerprint}\), but this base "
                                                rf"is .*llama \({llama.fingerprint}\)"):
        rt.add(foreign)
    assert rt.names == []


def test_adapter_for_another_base_is_refused_by_shape(llama, tmp_path):
    wide = tiny_llama(hidden_size=48)
    peft_like = create_adapter("wide", wide, LoraConfig(target_modules=ATTN))      # no fingerprint (as PEFT's)
    rt = AdapterRuntime.from_base(llama)
    with pytest.raises(BaseMismatchError, match=r"does not fit this base at model.layers.0.self_attn.q_proj: "
                                                r"tensors \{'lora_A': \(8, 48\)"):
        rt.add(peft_like)
    assert rt.names == [] and rt._sites == {}


def test_corrupt_and_truncated_files(llama, tmp_path):
    make(llama).save(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptAdapterError, match="is not a readable safetensors file .* truncated or corrupt"):
        Adapter.load(tmp_path / "a")
    weights.write_bytes(b"not safetensors at all")
    with pytest.raises(CorruptAdapterError, match="is not a readable safetensors file"):
        Adapter.load(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{broken")
    with pytest.raises(CorruptAdapterError, match="adapter_config.json is not valid JSON"):
        Adapter.load(tmp_path / "a")
    with pytest.raises(CorruptAdapterError, match="does not exist"):
        Adapter.load(tmp_path / "missing")


def test_pickled_peft_weights_are_not_read(llama, tmp_path):
    make(llama).save(tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(CorruptAdapterError, match="pickled adapter_model.bin files are not read"):
        Adapter.load(tmp_path / "a")


def test_interrupted_save_keeps_the_previous_adapter(llama, tmp_path, monkeypatch):
    first = make(llama, "keep", seed=0)
    first.save(tmp_path / "keep")
    second = make(llama, "keep", seed=1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut while writing tensors")

    monkeypatch.setattr("adapterkit.formats.peft.write_tensors", crash)
    with pytest.raises(KeyboardInterrupt):
        second.save(tmp_path / "keep")
    monkeypatch.undo()
    loaded = Adapter.load(tmp_path / "keep")
    site = next(iter(first.tensors))
    assert torch.equal(loaded.tensors[site]["lora_B"], first.tensors[site]["lora_B"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "llama"]   # no temporary left behind


def test_crash_between_renames_is_recovered(llama, tmp_path):
    make(llama, "keep").save(tmp_path / "keep")
    (tmp_path / "keep").rename(tmp_path / ".keep.old-deadbeef")      # as if the swap died half-way
    recover_dir(tmp_path / "keep")
    assert Adapter.load(tmp_path / "keep").name == "keep"


def test_side_file_from_a_newer_adapterkit(llama, tmp_path):
    make(llama).save(tmp_path / "a")
    side = tmp_path / "a" / adapter_mod.SIDE_FILE
    data = json.loads(side.read_text())
    data["format_version"] = 99
    side.write_text(json.dumps(data))
    with pytest.raises(CorruptAdapterError, match="reads adapterkit.core.adapter up to version 1: upgrade adapterkit"):
        Adapter.load(tmp_path / "a")


@torch.no_grad()
def test_merged_adapter_cannot_also_be_routed(llama):
    rt = AdapterRuntime.from_base(llama)
    rt.add(make(llama, "m"))
    rt.merge("m")
    with pytest.raises(ConfigError, match=r"adapter\(s\) \['m'\] are merged into the base; unmerge\(\)"):
        rt.make_batch(["m"])
    with pytest.raises(ConfigError, match="already merged"):
        rt.merge("m")
    with pytest.raises(ConfigError, match="unmerge\\(\\) before removing it"):
        rt.remove("m")
    rt.unmerge()
    rt.make_batch(["m"])


@torch.no_grad()
def test_batch_rows_must_match_input(llama):
    rt = AdapterRuntime.from_base(llama)
    rt.add(make(llama, "a"))
    with rt.batch(["a", None]):
        with pytest.raises(ConfigError, match="built for 2 rows but a module got input of shape"):
            llama.model(input_ids(3, 4))
