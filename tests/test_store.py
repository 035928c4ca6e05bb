"""The adapter store: folders + SQLite catalog; clashes refused; interrupted writes harmless."""

import json

import pytest
import torch
from conftest import ATTN, save_tiny
from typer.testing import CliRunner

from adapterkit import AdapterNameError, AdapterNotFoundError, LoraConfig, create_adapter, load_base
from adapterkit.cli.main import app
from adapterkit.store import AdapterStore


@pytest.fixture
def base(tmp_path):
    return load_base(str(save_tiny("llama", tmp_path / "llama")))


def make(base, name, seed=0, r=4):
    a = create_adapter(name, base.model, LoraConfig(r=r, target_modules=ATTN, init="nonzero"), seed=seed,
                       fingerprint=base.fingerprint, base_name="tiny", task="reuters-r8")
    a.meta.labels = ["acq", "earn"]
    a.meta.metrics = {"accuracy": 0.93}
    a.meta.lineage = [{"op": "train", "inputs": [], "params": {"steps": 3}}]
    return a


def test_put_get_list_show(base, tmp_path):
    store = AdapterStore(tmp_path / "store")
    a = make(base, "r8-lora")
    store.put(a)
    got = store.get("r8-lora")
    site = next(iter(a.tensors))
    assert torch.equal(got.tensors[site]["lora_A"], a.tensors[site]["lora_A"]) and got.meta == a.meta
    rows = store.list()
    assert [r["name"] for r in rows] == ["r8-lora"]
    row = rows[0]
    assert (row["method"], row["task"], row["labels"], row["metrics"], row["ranks"]) == \
        ("lora", "reuters-r8", ["acq", "earn"], {"accuracy": 0.93}, [4])
    assert row["base_fingerprint"] == base.fingerprint and row["parameters"] == a.num_parameters()
    assert store.show("r8-lora")["lineage"] == [{"op": "train", "inputs": [], "params": {"steps": 3}}]
    # a second store object on the same folder sees the same catalog
    assert [r["name"] for r in AdapterStore(tmp_path / "store").list()] == ["r8-lora"]


def test_existing_name_is_refused_unless_overwrite(base, tmp_path):
    store = AdapterStore(tmp_path / "s")
    store.put(make(base, "x", seed=0))
    with pytest.raises(AdapterNameError, match=r"an adapter named 'x' is already in the store .* pass --overwrite"):
        store.put(make(base, "x", seed=1))
    first = store.get("x")
    store.put(make(base, "x", seed=1, r=2), overwrite=True)
    assert store.show("x")["ranks"] == [2]
    assert not torch.equal(next(iter(store.get("x").tensors.values()))["lora_A"][:2],
                           next(iter(first.tensors.values()))["lora_A"][:2])


def test_unknown_name_lists_the_stored_ones(base, tmp_path):
    store = AdapterStore(tmp_path / "s")
    with pytest.raises(AdapterNotFoundError, match="no adapter named 'nope' .*; stored: the store is empty"):
        store.get("nope")
    store.put(make(base, "a1"))
    store.put(make(base, "a2"))
    with pytest.raises(AdapterNotFoundError, match="stored: a1, a2"):
        store.show("nope")


def test_interrupted_put_keeps_the_last_good_adapter_and_row(base, tmp_path, monkeypatch):
    store = AdapterStore(tmp_path / "s")
    store.put(make(base, "keep", seed=0, r=4))
    before = store.show("keep")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("adapterkit.formats.peft.write_tensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.put(make(base, "keep", seed=1, r=2), overwrite=True)
    with pytest.raises(OSError):
        store.put(make(base, "new", seed=2))
    monkeypatch.undo()
    assert store.show("keep") == before
    assert store.get("keep").ranks() == [4]
    assert [r["name"] for r in store.list()] == ["keep"]      # the failed new one never appears


def test_remove(base, tmp_path):
    store = AdapterStore(tmp_path / "s")
    store.put(make(base, "gone"))
    store.remove("gone")
    assert store.list() == [] and list((tmp_path / "s" / "adapters").iterdir()) == []


def test_cli_ls_and_show(base, tmp_path):
    store = AdapterStore(tmp_path / "s")
    store.put(make(base, "r8-lora"))
    runner = CliRunner()
    res = runner.invoke(app, ["ls", "--store", str(tmp_path / "s"), "--json"])
    assert res.exit_code == 0, res.output
    assert [r["name"] for r in json.loads(res.output)] == ["r8-lora"]
    res = runner.invoke(app, ["ls", "--store", str(tmp_path / "s")], env={"COLUMNS": "200"})
    assert "r8-lora" in res.output and "accuracy=0.93" in res.output
    res = runner.invoke(app, ["show", "r8-lora", "--store", str(tmp_path / "s"), "--json"])
    assert json.loads(res.output)["task"] == "reuters-r8"
    res = runner.invoke(app, ["show", "missing", "--store", str(tmp_path / "s")])
    assert res.exit_code == 2 and "no adapter named 'missing'" in res.output
