"""`adapterkit train` / `eval` end to end on a tiny base and user files."""

import json

import pytest
from conftest import save_tiny_tokenizer, tiny_llama
from typer.testing import CliRunner

from adapterkit.cli import app
from adapterkit.train.run import classification_metrics

ROWS = [("the cat runs fast", "feline"), ("a cat is on the mat", "feline"), ("cat and cat", "feline"),
        ("the dog runs slow", "canine"), ("a dog is on the mat", "canine"), ("dog and dog", "canine")]


@pytest.fixture
def files(tmp_path):
    path = tmp_path / "base"
    tiny_llama(initializer_range=0.2).save_pretrained(str(path))
    save_tiny_tokenizer(path)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"sentence": t, "y": y}) for t, y in ROWS) + "\n")
    return path, data


def test_train_then_eval(files, tmp_path):
    base, data = files
    runner = CliRunner()
    args = ["train", "--name", "toy", "--base", str(base), "--train-file", str(data), "--eval-file", str(data),
            "--text-field", "sentence", "--label-field", "y", "--steps", "40", "--batch-size", "6", "--lr", "0.03",
            "--targets", "q_proj,v_proj", "--eval-every", "10", "--store", str(tmp_path / "store"), "--no-progress"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "validation: accuracy=1.0000" in res.output
    res = runner.invoke(app, ["eval", "toy", "--file", str(data), "--text-field", "sentence", "--label-field", "y",
                              "--base", str(base), "--store", str(tmp_path / "store"), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["accuracy"] == 1.0 and got["macro_f1"] == 1.0 and got["n"] == 6
    shown = json.loads(runner.invoke(app, ["show", "toy", "--store", str(tmp_path / "store"), "--json"]).output)
    assert shown["labels"] == ["canine", "feline"] and shown["metrics"]["validation_accuracy"] == 1.0
    assert shown["lineage"][0]["params"]["steps"] == 40 and shown["lineage"][0]["params"]["best_step"] in (10, 20, 30, 40)
    # the same name again is refused before any training
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "already in the store" in res.output and "--overwrite" in res.output


def test_eval_with_unseen_labels_is_refused(files, tmp_path):
    base, data = files
    runner = CliRunner()
    runner.invoke(app, ["train", "--name", "toy", "--base", str(base), "--train-file", str(data), "--text-field",
                        "sentence", "--label-field", "y", "--steps", "2", "--store", str(tmp_path / "s"),
                        "--no-progress"])
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"sentence": "a bird", "y": "avian"}) + "\n")
    res = runner.invoke(app, ["eval", "toy", "--file", str(other), "--text-field", "sentence", "--label-field", "y",
                              "--base", str(base), "--store", str(tmp_path / "s")])
    assert res.exit_code == 2 and "label(s) ['avian'] are not in the task's labels" in res.output


def test_metrics_table():
    m = classification_metrics(["a", "a", "b", "c"], ["a", "b", "b", "c"], ["a", "b", "c"])
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1.0) / 3)


def test_causal_lm_train_learns_the_completions(files, tmp_path):
    base, _ = files
    data = tmp_path / "instruct.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in [
        ("give me one tip", "write clear code"), ("hello world", "the cat runs")]) + "\n")
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--objective", "causal-lm", "--name", "inst", "--base", str(base),
                              "--train-file", str(data), "--eval-file", str(data), "--steps", "60",
                              "--batch-size", "2", "--lr", "0.03", "--targets", "q_proj,k_proj,v_proj,o_proj",
                              "--store", str(tmp_path / "s"), "--no-progress"])
    assert res.exit_code == 0, res.output
    shown = json.loads(runner.invoke(app, ["show", "inst", "--store", str(tmp_path / "s"), "--json"]).output)
    assert shown["metrics"]["validation_exact_match"] == 1.0
    assert shown["metrics"]["validation_loss"] < 0.5
    assert shown["lineage"][0]["params"]["objective"] == "causal-lm"
    res = runner.invoke(app, ["eval", "inst", "--file", str(data), "--base", str(base), "--store", str(tmp_path / "s"),
                              "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["exact_match"] == 1.0
    res = runner.invoke(app, ["eval", "inst", "--base", str(base), "--store", str(tmp_path / "s")])
    assert res.exit_code == 2 and "has no classification head: give --file" in res.output
    # the trained adapter generates the completion through the generate CLI
    path = shown["path"]
    out = runner.invoke(app, ["generate", "give me one tip", "--base", str(base), "--adapter", path,
                              "--max-tokens", "5", "--json"])
    assert json.loads(out.output.splitlines()[-1])["text"].split() == ["write", "clear", "code"]
