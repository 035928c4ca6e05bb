"""`adapterkit route fit|eval|ls|default` end to end on a tiny base and a store of adapters with heads."""

import json
import random

import pytest
from conftest import save_tiny, save_tiny_tokenizer
from typer.testing import CliRunner

from adapterkit import LoraConfig, create_adapter, load_base
from adapterkit.cli.main import app
from adapterkit.core.heads import ClassificationHead
from adapterkit.store import AdapterStore

VOCAB = {"ad-a": [f"w{i}" for i in range(0, 20)], "ad-b": [f"w{i}" for i in range(20, 40)]}
LABELS = {"ad-a": ["neg", "pos"], "ad-b": ["sport", "tech", "arts"]}


@pytest.fixture
def world(tmp_path):
    path = save_tiny("llama", tmp_path / "base")
    save_tiny_tokenizer(path)
    base = load_base(str(path))
    store = AdapterStore(tmp_path / "store")
    for i, name in enumerate(VOCAB):
        ad = create_adapter(name, base.model, LoraConfig(r=2, init="nonzero"), seed=i, fingerprint=base.fingerprint,
                            base_name=base.name)
        ad.head = ClassificationHead.create(LABELS[name], base.model.config.hidden_size, "last", seed=i)
        ad.meta.labels = LABELS[name]
        store.put(ad)
    rng = random.Random(0)

    def rows(n, seed):
        r = random.Random(seed)
        return [{"text": " ".join(r.choice(VOCAB[a]) for _ in range(r.randint(5, 10))), "adapter": a,
                 "label": r.choice(LABELS[a])} for a in VOCAB for _ in range(n)]
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows(30, 1)) + "\n")
    test_rows = rows(10, 2)
    rng.shuffle(test_rows)
    test.write_text("\n".join(json.dumps(r) for r in test_rows) + "\n")
    return tmp_path / "store", train, test


def test_fit_then_eval_retrieval(world, tmp_path):
    store, train, test = world
    runner = CliRunner()
    res = runner.invoke(app, ["route", "fit", "--adapters", "ad-a,ad-b", "--name", "r1", "--encoder", "base",
                              "--examples", str(train),
                              "--store", str(store)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "stored retrieval router r1 over ad-a, ad-b" in text and "(default)" in text
    res = runner.invoke(app, ["route", "fit", "--adapters", "ad-a,ad-b", "--name", "r-lex", "--encoder", "base",
                              "--examples", str(train), "--lexical-weight", "0.5", "--store", str(store), "--json"])
    assert res.exit_code == 0, res.output
    meta = json.loads(res.output)
    assert meta["lexical"]["weight"] == 0.5 and meta["calibration"]["lexical_weight_accuracy"].keys() == {"0.5"}
    assert meta["lexical"]["kind"] == "char-ngram-tfidf" and meta["default"] is False
    res = runner.invoke(app, ["route", "eval", "auto", "--file", str(test), "--store", str(store), "--json",
                              "--plot", str(tmp_path / "cm.png")])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    # the tiny random Llama is a weak encoder: most, not all, prompts are routed right
    assert got["routing_accuracy"] >= 0.8 and got["n"] == 20
    assert got["columns"] == ["ad-a", "ad-b", "(fallback)"] and got["labels"] == ["ad-a", "ad-b"]
    assert [sum(row) for row in got["confusion"]] == [10, 10]
    right = got["confusion"][0][0] + got["confusion"][1][1]
    assert got["routing_accuracy"] == right / 20
    e2e = got["end_to_end"]
    assert e2e["n"] == 20 and e2e["ratio"] == pytest.approx(e2e["auto"] / e2e["oracle"])
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    res = runner.invoke(app, ["route", "eval", "r1", "--file", str(test), "--store", str(store)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert f"routing accuracy {got['routing_accuracy']:.3f}, fallback {got['fallback_rate']:.3f}" in text
    assert "end-to-end accuracy auto" in text and "of the oracle)" in text
    assert (store / "routers" / "r1" / "confusion.png").is_file()
    rows = json.loads(runner.invoke(app, ["route", "ls", "--store", str(store), "--json"]).output)
    [row] = [r for r in rows if r["name"] == "r1"]
    assert row["kind"] == "retrieval" and row["default"] is True


def test_fit_then_eval_linear(world):
    store, train, test = world
    runner = CliRunner()
    res = runner.invoke(app, ["route", "fit", "--adapters", "ad-a,ad-b", "--name", "l1", "--kind", "linear",
                              "--encoder", "base", "--examples", str(train), "--store", str(store)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "stored linear router l1 over ad-a, ad-b" in text and "held-out routing accuracy 1.000" in text
    assert "L2 0.0" in text and "(default)" in text          # the store's first router becomes its default
    res = runner.invoke(app, ["route", "eval", "l1", "--file", str(test), "--store", str(store), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    # the tiny random Llama is a weak encoder (and 1 % of in-task prompts may fall below the OOD threshold)
    assert got["kind"] == "linear" and got["routing_accuracy"] >= 0.8 and got["n"] == 20
    rows = json.loads(runner.invoke(app, ["route", "ls", "--store", str(store), "--json"]).output)
    assert [r["kind"] for r in rows if r["name"] == "l1"] == ["linear"]


def test_fit_gate_from_the_cli(world):
    store, train, test = world
    runner = CliRunner()
    res = runner.invoke(app, ["route", "fit", "--adapters", "ad-a,ad-b", "--name", "g1", "--kind", "gate",
                              "--examples", str(train), "--steps", "30", "--lr", "0.05", "--store", str(store), "--json"])
    assert res.exit_code == 0, res.output
    meta = json.loads(res.output)
    assert meta["type"] == "adapterkit.router.gate" and meta["training"]["task_loss"] == "classification heads"
    assert meta["training"]["final"]["gate_accuracy"] > 0.9
    res = runner.invoke(app, ["route", "eval", "g1", "--file", str(test), "--store", str(store), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["routing_accuracy"] >= 0.9


@pytest.mark.parametrize("args, message", [
    (["--kind", "knn"], "error: unknown router kind 'knn'; use one of retrieval, linear, gate"),
    (["--kind", "linear", "--lexical-weight", "1"],
     "error: --lexical-weight is an option of --kind retrieval; a linear router learns a weight for every character "
     "n-gram"),
    (["--kind", "linear", "--neighbors", "0"], "error: a linear router needs --neighbors >= 1"),
    (["--name", "ad-a"], "routers and adapters share one model namespace"),
    (["--adapters", "ad-a,nope"], "error: no adapter named 'nope' in the store at"),
    ([], "error: the router has no examples of 'ad-a' (it records no task), 'ad-b' (it records no task): pass --examples FILE"),
    (["--kind", "gate", "--lexical-weight", "1"],
     "error: --lexical/--lexical-weight are options of --kind retrieval; a gate reads hidden states"),
    (["--no-lexical", "--lexical-weight", "1"],
     "error: lexical_weight must be a finite number >= 0 with the lexical channel on, got 1.0"),
])
def test_fit_refuses_bad_input(world, args, message):
    store, _, _ = world
    base = ["route", "fit", "--adapters", "ad-a,ad-b", "--name", "r", "--store", str(store)]
    res = CliRunner().invoke(app, base + args)
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())


def test_eval_of_a_missing_router(world):
    store, _, test = world
    res = CliRunner().invoke(app, ["route", "eval", "auto", "--file", str(test), "--store", str(store)])
    assert res.exit_code == 2
    assert "error: no default router in the store at" in " ".join(res.output.split())
