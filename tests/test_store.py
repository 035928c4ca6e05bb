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


def _lora_a(adapter):
    return next(iter(adapter.tensors.values()))["lora_A"]


def test_a_stored_name_gets_versions_promote_and_rollback_switch_the_alias(base, tmp_path):
    store = AdapterStore(tmp_path / "s")
    v1 = store.put_version(make(base, "x", seed=0))
    assert (v1.ref, v1.promoted) == ("x@v1", True)
    v2 = store.put_version(make(base, "x", seed=1))
    assert (v2.ref, v2.promoted) == ("x@v2", False)
    assert torch.equal(_lora_a(store.get("x")), _lora_a(store.get("x@v1")))     # the alias: still v1
    assert store.get("x@v2").name == "x" and not torch.equal(_lora_a(store.get("x@v2")), _lora_a(store.get("x")))
    assert [(v["ref"], v["promoted"]) for v in store.versions("x")] == [("x@v1", True), ("x@v2", False)]
    assert store.list()[0]["versions"] == 2 and store.show("x")["version"] == 1
    assert store.promote("x@v2") == 1
    assert torch.equal(_lora_a(store.get("x")), _lora_a(store.get("x@v2"))) and store.path("x") == v2.path
    store.put_version(make(base, "x", seed=2))                                 # v3, not promoted
    assert store.promote("x@v3") == 2
    assert store.rollback("x") == 2 and store.show("x")["version"] == 2
    assert store.rollback("x") == 1 and store.show("x")["version"] == 1
    with pytest.raises(AdapterNameError, match=r"'x' has no earlier promoted version to roll back to \(v1 is the "
                       r"first\)"):
        store.rollback("x")
    with pytest.raises(AdapterNotFoundError, match=r"adapter 'x' has no version 7; its versions: v1, v2, v3"):
        store.get("x@v7")
    with pytest.raises(AdapterNameError, match=r"'x@v0' is not NAME or NAME@vN"):
        store.get("x@v0")
    with pytest.raises(AdapterNameError, match=r"promote names a version, NAME@vN \(e.g. x@v2\)"):
        store.promote("x")
    with pytest.raises(AdapterNameError, match=r"x@v1 is the promoted version of 'x': promote another version"):
        store.remove("x@v1")
    store.remove("x@v3")
    assert [v["ref"] for v in store.versions("x")] == ["x@v1", "x@v2"]
    # overwrite keeps its meaning: the promoted version is replaced in place, no new version
    store.put(make(base, "x", seed=5, r=2), overwrite=True)
    assert [v["ref"] for v in store.versions("x")] == ["x@v1", "x@v2"] and store.show("x")["ranks"] == [2]
    assert store.show("x@v1")["ranks"] == [2]
    folders = {p.name for p in (tmp_path / "s" / "adapters").iterdir()}
    assert len(folders) == 2                                                  # replaced and removed ones went
    store.remove("x")
    assert "x" not in store and list((tmp_path / "s" / "adapters").iterdir()) == []
    assert store.put_version(make(base, "x")).ref == "x@v1"                  # a fresh history


def test_a_store_from_before_versions_gets_v1_of_each_adapter(base, tmp_path):
    import sqlite3

    store = AdapterStore(tmp_path / "s")
    store.put(make(base, "old"))
    with sqlite3.connect(tmp_path / "s" / "catalog.sqlite") as conn:   # as an older adapterkit left it
        conn.execute("DROP TABLE versions")
        conn.execute("DROP TABLE promotions")
        conn.execute("UPDATE adapters SET version = NULL")
    again = AdapterStore(tmp_path / "s")
    assert [(v["ref"], v["promoted"]) for v in again.versions("old")] == [("old@v1", True)]
    assert again.put_version(make(base, "old", seed=3)).ref == "old@v2"


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


def test_cli_rm_removes_a_version_or_a_name_with_all_its_versions(base, tmp_path):
    store = AdapterStore(tmp_path / "s")
    store.put(make(base, "x"))
    store.put_version(make(base, "x", seed=1))
    store.put_version(make(base, "x", seed=2))
    run = lambda *a: CliRunner().invoke(app, [*a, "--store", str(tmp_path / "s")])  # noqa: E731
    res = run("rm", "x@v1")
    assert res.exit_code == 2 and "x@v1 is the promoted version of 'x': promote another version first, or remove " \
        "'x' with all its versions" in " ".join(res.output.split())
    res = run("rm", "x@v2")
    assert res.exit_code == 0 and "removed x@v2" in res.output
    assert [v["ref"] for v in store.versions("x")] == ["x@v1", "x@v3"]
    kept, want = store.get("x@v3").tensors, make(base, "x", seed=2).tensors     # the other versions untouched
    assert kept.keys() == want.keys() and all(torch.equal(kept[s][k], want[s][k]) for s in want for k in want[s])
    res = run("rm", "x")
    assert res.exit_code == 0 and "removed x@v1, x@v3" in res.output
    assert store.list() == [] and list((tmp_path / "s" / "adapters").iterdir()) == []
    res = run("rm", "x")
    assert res.exit_code == 2 and "no adapter named 'x'" in res.output
    res = run("rm", "x", "--missing-ok")
    assert res.exit_code == 0 and "x: not in the store, nothing to remove" in res.output
    store.put(make(base, "x"))                      # the name starts a fresh history: v1 again
    assert [v["ref"] for v in store.versions("x")] == ["x@v1"]


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
