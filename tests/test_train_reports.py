"""Reports of `train` and `eval`: progress while scoring (plain lines when not on a terminal), the
per-class report and confusion matrix, per-row predictions, and the loss-curve PNG beside the log."""

import json
import logging
import re
import sys

import pytest
from test_train_cli import ROWS, files  # noqa: F401  (files: the fixture, a tiny base + labelled JSONL)
from typer.testing import CliRunner

from adapterkit.cli.main import app
from adapterkit.train import fit as fit_module
from adapterkit.train import progress as progress_module
from adapterkit.train.report import class_report, loss_plot_path
from adapterkit.train.run import classification_metrics

TRAIN_LINE = re.compile(r"^train (\d+)/(\d+) \((\d+)%\) loss (\d+\.\d{4}) (\d+) tok/s elapsed \d+:\d\d:\d\d "
                        r"ETA (\d+:\d\d:\d\d|\?)$")
EVAL_LINE = re.compile(r"^eval (\d+)/(\d+) \((\d+)%\) (\d+\.\d) rows/s elapsed \d+:\d\d:\d\d ETA (\d+:\d\d:\d\d|\?)$")


@pytest.fixture(autouse=True)
def _not_a_terminal(monkeypatch):
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):   # rich's switches: auto-detect only
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def plots(monkeypatch):
    """The (losses, evals, eval name) of every loss plot fit draws (the plot is still written)."""
    seen, real = [], fit_module.save_loss_plot

    def spy(path, losses, evals, name, **kw):
        seen.append((losses, evals, name))
        return real(path, losses, evals, name, **kw)
    monkeypatch.setattr(fit_module, "save_loss_plot", spy)
    return seen


def _train(base, data, store, name, *extra, steps=6):
    return ["train", "--name", name, "--base", str(base), "--train-file", str(data), "--text-field", "sentence",
            "--label-field", "y", "--steps", str(steps), "--batch-size", "3", "--lr", "0.03", "--targets",
            "q_proj,v_proj", "--store", str(store), *extra]


def _eval(base, data, store, name, *extra):
    return ["eval", name, "--file", str(data), "--text-field", "sentence", "--label-field", "y", "--base", str(base),
            "--store", str(store), *extra]


def test_class_report_numbers():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    rep = class_report(pred, gold, ["a", "b", "c", "never"])
    assert rep.labels == ["a", "b", "c"]                       # a label neither in gold nor predicted: left out
    assert rep.confusion == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert rep.precision == pytest.approx([1.0, 0.5, 0.5]) and rep.recall == pytest.approx([2 / 3, 0.5, 1.0])
    assert rep.f1 == pytest.approx([0.8, 0.5, 2 / 3]) and rep.support == [3, 2, 1]
    assert rep.macro()["f1"] == pytest.approx(classification_metrics(pred, gold, ["a", "b", "c", "never"])["macro_f1"])
    only_predicted = class_report(["x", "y"], ["y", "y"], ["x", "y"])
    assert only_predicted.precision == [0.0, 1.0] and only_predicted.recall == [0.0, 0.5]   # 0 when undefined
    assert only_predicted.to_dict()["per_class"]["x"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_eval_report_predictions_and_progress(files, tmp_path):
    base, data = files
    store, runner = tmp_path / "store", CliRunner()
    assert runner.invoke(app, _train(base, data, store, "toy", "--no-progress", steps=3)).exit_code == 0
    preds = tmp_path / "out" / "preds.jsonl"                       # a missing folder is made
    res = runner.invoke(app, _eval(base, data, store, "toy", "--report", "--predictions", str(preds)))
    assert res.exit_code == 0, res.output
    assert "per-class report" in res.stdout and "macro avg" in res.stdout and "confusion matrix" in res.stdout
    assert f"predictions: {preds} (6 rows)" in res.stdout
    assert [m.groups()[:3] for m in map(EVAL_LINE.match, res.stderr.splitlines()) if m] == [("6", "6", "100")]
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [(r["text"], r["label"]) for r in rows] == ROWS
    for r in rows:
        assert set(r) == {"text", "label", "predicted", "probabilities"}
        assert sorted(r["probabilities"]) == ["canine", "feline"]
        assert sum(r["probabilities"].values()) == pytest.approx(1)
        assert r["predicted"] == max(r["probabilities"], key=r["probabilities"].get)
    res = runner.invoke(app, _eval(base, data, store, "toy", "--report", "--json", "--no-progress"))
    assert res.exit_code == 0 and res.stderr == ""
    got = json.loads(res.stdout)
    want = class_report([r["predicted"] for r in rows], [r["label"] for r in rows], ["canine", "feline"]).to_dict()
    assert got["per_class"] == want["per_class"] and got["confusion"] == want["confusion"]
    assert sum(map(sum, got["confusion"]["matrix"])) == got["n"] == 6
    assert set(got["per_class"]["canine"]) == {"precision", "recall", "f1", "support"}
    plain = json.loads(runner.invoke(app, _eval(base, data, store, "toy", "--json")).stdout)
    assert "per_class" not in plain and "confusion" not in plain                   # only with --report


def test_eval_refuses_bad_outputs_before_scoring(files, tmp_path, monkeypatch):
    base, data = files
    store, runner = tmp_path / "store", CliRunner()
    assert runner.invoke(app, _train(base, data, store, "toy", "--no-progress", steps=2)).exit_code == 0
    import adapterkit.core.base
    import adapterkit.train.run

    def never(*a, **k):
        raise AssertionError("the output path is checked before loading the base and scoring")
    monkeypatch.setattr(adapterkit.core.base, "load_base", never)
    monkeypatch.setattr(adapterkit.train.run, "score", never)
    (tmp_path / "adir").mkdir()
    res = runner.invoke(app, _eval(base, data, store, "toy", "--predictions", str(tmp_path / "adir")))
    assert res.exit_code == 2 and "the predictions file" in res.output and "is a folder, not a file" in res.output
    (tmp_path / "afile").write_text("x")
    res = runner.invoke(app, _eval(base, data, store, "toy", "--predictions", str(tmp_path / "afile" / "p.jsonl")))
    assert res.exit_code == 2 and "is a file, not a folder" in res.output
    assert not (tmp_path / "adir" / "p.jsonl").exists()


def test_report_needs_a_classifier_and_instruction_plot_shows_the_loss(files, tmp_path, plots):
    base, _ = files
    data = tmp_path / "instruct.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in [
        ("give me one tip", "write clear code"), ("hello world", "the cat runs")]) + "\n")
    runner, store = CliRunner(), tmp_path / "s"
    res = runner.invoke(app, ["train", "--objective", "causal-lm", "--name", "inst", "--base", str(base),
                              "--train-file", str(data), "--eval-file", str(data), "--steps", "4", "--eval-every", "2",
                              "--batch-size", "2", "--targets", "q_proj", "--store", str(store), "--no-progress"])
    assert res.exit_code == 0, res.output
    (losses, evals, name), = plots
    assert len(losses) == 4 and [s for s, _ in evals] == [2, 4] and name == "validation loss"
    assert all(v > 0 for _, v in evals)                           # the loss itself, not the negated score
    assert (store / "runs" / "inst" / "train_log.png").is_file()
    for flag in (["--report"], ["--predictions", str(tmp_path / "p.jsonl")]):
        res = runner.invoke(app, ["eval", "inst", "--file", str(data), "--base", str(base), "--store", str(store),
                                  *flag])
        assert res.exit_code == 2
        assert ("--report and --predictions need a classification adapter; 'inst' is an instruction adapter"
                in res.output)
    assert not (tmp_path / "p.jsonl").exists()


def test_train_writes_the_loss_plot_beside_the_log(files, tmp_path, plots):
    base, data = files
    store, runner = tmp_path / "store", CliRunner()
    args = _train(base, data, store, "toy", "--no-progress", "--eval-file", str(data), "--eval-every", "2")
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    run = store / "runs" / "toy"
    log, png = run / "train_log.jsonl", run / "train_log.png"
    assert f"log: {log}; loss curve: {png}" in res.stdout
    assert sorted(p.name for p in run.iterdir()) == ["train_log.jsonl", "train_log.png"]   # checkpoint dropped
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(x) for x in log.read_text().splitlines()]
    (losses, evals, name), = plots
    assert losses == pytest.approx([r["loss"] for r in records]) and len(losses) == 6
    assert [s for s, _ in evals] == [2, 4, 6] and all(0 <= v <= 1 for _, v in evals) and name == "validation accuracy"
    # the same name again (--overwrite): a fresh log of this run only, not appended to the last one's
    assert runner.invoke(app, args + ["--overwrite"]).exit_code == 0
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == list(range(6))
    # --log elsewhere: the plot goes beside it
    mine = tmp_path / "logs" / "run1.jsonl"
    res = runner.invoke(app, _train(base, data, store, "other", "--no-progress", "--log", str(mine)))
    assert res.exit_code == 0, res.output
    assert loss_plot_path(mine) == tmp_path / "logs" / "run1.png" and (tmp_path / "logs" / "run1.png").is_file()
    assert f"log: {mine}; loss curve: {tmp_path / 'logs' / 'run1.png'}" in res.stdout
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["run1.jsonl", "run1.png"]   # no temp files


def test_no_matplotlib_or_a_failed_plot_never_fails_training(files, tmp_path, monkeypatch, caplog):
    base, data = files
    store, runner = tmp_path / "store", CliRunner()
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)                 # import matplotlib -> ImportError
        res = runner.invoke(app, _train(base, data, store, "a", "--no-progress"))
    assert res.exit_code == 0, res.output
    assert "no loss curve (matplotlib is not installed: pip install matplotlib)" in res.stdout
    run = store / "runs" / "a"
    assert (run / "train_log.jsonl").is_file() and not (run / "train_log.png").exists()

    def broken(*a, **k):
        raise OSError("No space left on device")
    monkeypatch.setattr(fit_module, "save_loss_plot", broken)
    with caplog.at_level(logging.WARNING, logger="adapterkit.train.fit"):
        res = runner.invoke(app, _train(base, data, store, "b", "--no-progress"))
    assert res.exit_code == 0, res.output
    assert "no loss curve (it could not be written: see the warning above)" in res.stdout
    assert "loss curve not written to" in caplog.text and "No space left on device" in caplog.text
    run = store / "runs" / "b"
    assert (run / "train_log.jsonl").is_file() and not (run / "train_log.png").exists()


def test_progress_prints_plain_lines_when_not_a_terminal(files, tmp_path, monkeypatch):
    base, data = files
    store, runner = tmp_path / "store", CliRunner()
    res = runner.invoke(app, _train(base, data, store, "a", "--eval-file", str(data), steps=20))
    assert res.exit_code == 0, res.output
    lines = [TRAIN_LINE.match(x) for x in res.stderr.splitlines()]
    got = [m.groups() for m in lines if m]
    assert [int(g[0]) for g in got] == list(range(2, 21, 2))                         # one per tenth of the steps
    assert all(g[1] == "20" and int(g[2]) == 10 * k for k, g in enumerate(got, 1))
    assert all(float(g[3]) >= 0 and int(g[4]) > 0 for g in got)
    assert not TRAIN_LINE.search(res.stdout) and "(100%)" not in res.stdout          # stdout: the results only
    assert [m.group(1) for m in map(EVAL_LINE.match, res.stderr.splitlines()) if m] == ["6"]   # the final scoring
    monkeypatch.setattr(progress_module, "EVERY_S", 0.0)                            # a line at every update
    res = runner.invoke(app, _train(base, data, store, "b", steps=15))
    assert [int(m.group(1)) for m in map(TRAIN_LINE.match, res.stderr.splitlines()) if m] == list(range(1, 16))
    monkeypatch.setenv("TTY_INTERACTIVE", "1")                                     # a terminal: the live bar
    res = runner.invoke(app, _train(base, data, store, "c", steps=4))
    assert res.exit_code == 0 and not [x for x in res.stderr.splitlines() if TRAIN_LINE.match(x)]


def test_resumed_run_keeps_its_log_and_plots_the_whole_curve(files, tmp_path, monkeypatch, plots):
    base, data = files
    store, runner = tmp_path / "store", CliRunner()
    real = progress_module.TrainProgress.update

    def killed_after_step_3(self, record):
        if record["step"] == 3:
            raise KeyboardInterrupt
        real(self, record)
    monkeypatch.setattr(progress_module.TrainProgress, "update", killed_after_step_3)
    args = _train(base, data, store, "cut", "--checkpoint-every", "2")
    assert runner.invoke(app, [*args, "--no-progress"]).exit_code == 130
    assert plots == [] and not (store / "runs" / "cut" / "train_log.png").exists()
    monkeypatch.setattr(progress_module.TrainProgress, "update", real)
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    log = store / "runs" / "cut" / "train_log.jsonl"
    records = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(6))                      # steps 0-1 kept from the first run
    (losses, _, _), = plots
    assert losses == pytest.approx([r["loss"] for r in records])               # the whole curve, not steps 2-5
    shown = [int(m.group(1)) for m in map(TRAIN_LINE.match, res.stderr.splitlines()) if m]
    assert shown == [3, 4, 5, 6]                                                # counted from the checkpoint
