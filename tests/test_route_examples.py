"""Router examples: `data export` writes {"text","adapter","label"} lines; `route fit --examples`
ADDS a file's examples to those of adapters trained on an example task and is the only source for
adapters trained from files; without it, such an adapter gets an error that says to pass it."""

import json

from test_route_cli import world  # noqa: F401  (the fixture: a tiny base + a store of ad-a, ad-b)
from typer.testing import CliRunner

from adapterkit.cli.main import app
from adapterkit.data import load_task
from adapterkit.route.common import read_router
from adapterkit.store import AdapterStore



def test_data_export_writes_router_example_lines(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["data", "export", "rt-sentiment", "--adapter", "ad-a", "--split", "validation",
                              "--n", "5"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    want = load_task("rt-sentiment").validation[:5]
    assert rows == [{"text": e.text, "adapter": "ad-a", "label": e.label} for e in want]
    out = tmp_path / "ex.jsonl"
    res = runner.invoke(app, ["data", "export", "rt-sentiment", "--out", str(out)])
    assert res.exit_code == 0 and "wrote" in res.output
    lines = out.read_text().splitlines()
    assert len(lines) == len(load_task("rt-sentiment").train) and json.loads(lines[0])["adapter"] == "rt-sentiment"
    res = runner.invoke(app, ["data", "export", "rt-sentiment", "--split", "dev"])
    assert res.exit_code == 2 and "unknown split 'dev'" in res.output


def set_task(store_dir, name, task):
    st = AdapterStore(store_dir)
    a = st.get(name)
    a.meta.task = task
    st.put(a, overwrite=True)


def test_file_trained_adapters_need_examples_and_examples_add_to_tasks(world, tmp_path):  # noqa: F811
    store, train, _ = world
    set_task(store, "ad-a", "rt-sentiment")                  # an example task
    set_task(store, "ad-b", "data/train.jsonl")              # trained from a file
    runner = CliRunner()
    args = ["route", "fit", "--adapters", "ad-a,ad-b", "--encoder", "base", "--store", str(store),
            "--n-examples", "40", "--n-held", "8"]
    res = runner.invoke(app, args + ["--name", "r0"], env={"COLUMNS": "300"})
    assert res.exit_code == 2
    assert ("the router has no examples of 'ad-b' (trained on 'data/train.jsonl', not an example task): "
            "pass --examples FILE") in " ".join(res.output.split())
    res = runner.invoke(app, args + ["--name", "r1", "--examples", str(train)])
    assert res.exit_code == 0, res.output
    meta, _ = read_router(AdapterStore(store), "r1")
    from_file = {a: sum(1 for line in train.read_text().splitlines() if json.loads(line)["adapter"] == a)
                 for a in ("ad-a", "ad-b")}
    counts = {a: meta["examples"]["fit"][a]["count"] for a in ("ad-a", "ad-b")}
    # ad-a: 40 task examples + its file lines; ad-b: its file lines only (held-out: a seeded 20 % of each)
    total_a, total_b = 40 + from_file["ad-a"], from_file["ad-b"]
    assert counts["ad-a"] + meta["examples"]["held_out"]["ad-a"]["count"] == total_a
    assert counts["ad-b"] + meta["examples"]["held_out"]["ad-b"]["count"] == total_b
    assert meta["examples"]["source"].startswith("tasks: ad-a=rt-sentiment") and "+ file:" in meta["examples"]["source"]
