"""`adapterkit route ...` refuses bad options with a clear error and exit code 2, before the long work;
an output that still cannot be written at the end is an error after the results, not a traceback."""

import json
import os
import shutil

import pytest
from test_route_cli import world  # noqa: F401  (the fixture: a tiny base, a store of 2 adapters, JSONL files)
from typer.testing import CliRunner

from adapterkit.cli.main import app
from adapterkit.errors import ConfigError
from adapterkit.store import AdapterStore

TOP_K_5 = ("top_k must be an integer in [1, 2] (the number of adapters), got 5: the router has 2 adapter(s) "
           "(ad-a, ad-b), so at most 2 can be active; pass --top-k 2 or less")


def _text(res) -> str:
    return " ".join(res.output.split())


def _no_long_work(monkeypatch):
    """Make the long work fail loudly: an error must come before it."""
    def boom(*a, **k):
        raise AssertionError("the long work started before the options were checked")
    for name in ("open_base", "file_examples", "task_examples", "eval_items"):
        monkeypatch.setattr(f"adapterkit.route.api.{name}", boom)


def _fit(store, train, name="r1", *args):
    res = CliRunner().invoke(app, ["route", "fit", "--adapters", "ad-a,ad-b", "--name", name, "--encoder", "base",
                                   "--examples", str(train), "--store", str(store), *args])
    assert res.exit_code == 0, res.output
    return res


@pytest.mark.parametrize("args, message", [
    (["--top-k", "5"], TOP_K_5),
    (["--kind", "gate", "--top-k", "5"], TOP_K_5),
    (["--kind", "gate", "--steps", "0"], "error: steps (--steps, gate training steps) must be an integer >= 1, got 0"),
    (["--kind", "gate", "--steps", "-3"], "steps (--steps, gate training steps) must be an integer >= 1, got -3"),
    (["--kind", "gate", "--batch-size", "0"], "error: batch_size (--batch-size) must be an integer >= 1, got 0"),
    (["--kind", "gate", "--lr", "0"], "error: lr (--lr, the gate's learning rate) must be a finite number > 0, got 0.0"),
    (["--kind", "gate", "--lr", "-0.1"], "lr (--lr, the gate's learning rate) must be a finite number > 0, got -0.1"),
    (["--kind", "gate", "--lr", "nan"], "lr (--lr, the gate's learning rate) must be a finite number > 0, got nan"),
    (["--kind", "gate", "--gate-weight", "-1"], "error: gate_weight (--gate-weight) must be a finite number >= 0, got -1.0"),
    (["--max-length", "0"], "error: max_length (--max-length) must be an integer >= 1, got 0"),
    (["--coverage", "1.5"], "error: coverage must be in (0, 1] (the share of in-task prompts that must pass), got 1.5"),
    (["--coverage", "0"], "error: coverage must be in (0, 1] (the share of in-task prompts that must pass), got 0.0"),
])
def test_fit_refuses_bad_counts_and_fractions_before_the_work(world, monkeypatch, args, message):  # noqa: F811
    store, train, _ = world
    _no_long_work(monkeypatch)
    res = CliRunner().invoke(app, ["route", "fit", "--adapters", "ad-a,ad-b", "--name", "r", "--encoder", "base",
                                   "--examples", str(train), "--store", str(store), *args])
    assert res.exit_code == 2, res.output
    assert message in _text(res)


def test_the_library_refuses_a_top_k_above_the_adapters(world):  # noqa: F811
    from adapterkit.route.api import fit_router
    from adapterkit.route.retrieval import fit_retrieval

    store, train, _ = world
    st = AdapterStore(store)
    with pytest.raises(ConfigError, match=r"got 3: the router has 2 adapter\(s\) \(ad-a, ad-b\)"):
        fit_router(st, ["ad-a", "ad-b"], "r", encoder="base", examples_file=train, top_k=3)
    adapters = [st.get("ad-a"), st.get("ad-b")]
    with pytest.raises(ConfigError, match=r"top_k must be an integer in \[1, 2\] \(the number of adapters\), got 3"):
        fit_retrieval("r", adapters, {"ad-a": ["x y", "y z"], "ad-b": ["p q", "q r"]}, None, top_k=3)


def test_a_stored_router_with_a_bad_top_k_is_refused(world):  # noqa: F811
    store, train, test = world
    _fit(store, train)
    meta_path = store / "routers" / "r1" / "router.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "top_k": 5}))
    res = CliRunner().invoke(app, ["route", "eval", "r1", "--file", str(test), "--store", str(store)])
    assert res.exit_code == 2, res.output
    assert "records top_k 5 for 2 adapter(s); top_k must be in [1, 2]: fit the router again" in _text(res)


def test_fit_refuses_a_store_it_cannot_write_before_the_work(world, monkeypatch):  # noqa: F811
    store, train, _ = world
    (store / "routers").write_text("not a folder")
    _no_long_work(monkeypatch)
    res = CliRunner().invoke(app, ["route", "fit", "--adapters", "ad-a,ad-b", "--name", "r", "--encoder", "base",
                                   "--examples", str(train), "--store", str(store)])
    assert res.exit_code == 2, res.output
    assert (f"error: cannot write router 'r' into {store / 'routers'}: {store / 'routers'} is a file, not a folder; "
            "pass --store FOLDER that you can write to") in _text(res)


@pytest.mark.parametrize("args, message", [
    (["--n", "-1"], "error: n (--n, prompts per task) must be an integer >= 1, got -1"),
    (["--n", "0"], "error: n (--n, prompts per task) must be an integer >= 1, got 0"),
])
def test_eval_refuses_a_non_positive_n(world, monkeypatch, args, message):  # noqa: F811
    store, train, test = world
    _fit(store, train)
    _no_long_work(monkeypatch)
    res = CliRunner().invoke(app, ["route", "eval", "r1", "--file", str(test), "--store", str(store), *args])
    assert res.exit_code == 2, res.output
    assert message in _text(res)
    from adapterkit.route.api import eval_router
    with pytest.raises(ConfigError, match=r"n \(--n, prompts per task\) must be an integer >= 1"):
        eval_router(AdapterStore(store), "r1", file=test, n=int(args[1]))


def test_eval_refuses_an_unknown_split(world):  # noqa: F811
    store, train, _ = world
    _fit(store, train)
    res = CliRunner().invoke(app, ["route", "eval", "r1", "--tasks", "sst2", "--split", "dev", "--store", str(store)])
    assert res.exit_code == 2, res.output
    assert "error: unknown split 'dev'; the splits are train, validation, test: pass --split test" in _text(res)


@pytest.mark.parametrize("where, message", [
    ("folder", "error: the plot {p} is a folder, not a file; pass --plot PATH in a folder you can write to"),
    ("under-a-file", "error: cannot write the plot {p}: {f} is a file, not a folder; pass --plot PATH in a folder "
                     "you can write to"),
    ("read-only", "error: cannot write the plot {p}: the folder {f} is not writable; pass --plot PATH in a folder "
                  "you can write to"),
])
def test_eval_refuses_a_plot_path_it_cannot_write_before_the_work(world, tmp_path, monkeypatch, where, message):  # noqa: F811,E501
    store, train, test = world
    _fit(store, train)
    folder = tmp_path / "plots"
    folder.mkdir()
    if where == "folder":
        path = folder
    elif where == "under-a-file":
        folder = tmp_path / "notes.txt"
        folder.write_text("x")
        path = folder / "sub" / "cm.png"
    else:                                  # as root, chmod does not stop writes: make os.access say no
        path = folder / "cm.png"
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(folder) else real(p, mode, **k))
    _no_long_work(monkeypatch)
    res = CliRunner().invoke(app, ["route", "eval", "r1", "--file", str(test), "--store", str(store),
                                   "--plot", str(path)])
    assert res.exit_code == 2, res.output
    assert message.format(p=path, f=folder) in _text(res)


@pytest.mark.parametrize("as_json", [False, True])
def test_eval_prints_the_results_then_a_clear_error_if_the_plot_cannot_be_written(world, tmp_path, monkeypatch,  # noqa: F811
                                                                                  as_json):
    import adapterkit.route.api as api

    store, train, test = world
    _fit(store, train)
    folder = tmp_path / "plots"
    folder.mkdir()
    real = api.eval_router

    def eval_then_lose_the_folder(*a, **k):
        report = real(*a, **k)
        shutil.rmtree(folder)              # something else takes the folder's place during the work
        folder.write_text("x")
        return report
    monkeypatch.setattr(api, "eval_router", eval_then_lose_the_folder)
    res = CliRunner().invoke(app, ["route", "eval", "r1", "--file", str(test), "--store", str(store),
                                   "--plot", str(folder / "cm.png")] + (["--json"] if as_json else []))
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert f"error: cannot write the plot {folder / 'cm.png'} (File exists); pass --plot PATH" in _text(res)
    if as_json:
        got = json.loads(res.stdout)
        assert got["n"] == 20 and got["plot"] is None
    else:
        assert "routing accuracy" in _text(res) and "plot not written (see the error below)" in _text(res)


def test_eval_without_matplotlib(world, tmp_path, monkeypatch):  # noqa: F811
    store, train, test = world
    _fit(store, train)
    monkeypatch.setattr("adapterkit.route.evaluate.plot_available", lambda: False)
    res = CliRunner().invoke(app, ["route", "eval", "r1", "--file", str(test), "--store", str(store),
                                   "--plot", str(tmp_path / "cm.png")])
    assert res.exit_code == 2, res.output
    assert "error: the confusion-matrix plot needs matplotlib: pip install matplotlib" in _text(res)
    res = CliRunner().invoke(app, ["route", "eval", "r1", "--file", str(test), "--store", str(store)])
    assert res.exit_code == 0, res.output               # the default plot is skipped, the numbers still print
    assert "no plot (pip install matplotlib to save the confusion matrix as a PNG)" in _text(res)
    assert not (store / "routers" / "r1" / "confusion.png").exists()
