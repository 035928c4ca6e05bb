"""`adapterkit train` / `eval` end to end on a tiny base and user files."""

import json

import pytest
import torch
from conftest import save_tiny_tokenizer, tiny_llama
from typer.testing import CliRunner

from adapterkit.cli.main import app
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
    got = json.loads(res.stdout)           # stdout: eval's progress lines go to stderr
    assert got["accuracy"] == 1.0 and got["macro_f1"] == 1.0 and got["n"] == 6
    shown = json.loads(runner.invoke(app, ["show", "toy", "--store", str(tmp_path / "store"), "--json"]).output)
    assert shown["labels"] == ["canine", "feline"] and shown["metrics"]["validation_accuracy"] == 1.0
    assert shown["lineage"][0]["params"]["steps"] == 40 and shown["lineage"][0]["params"]["best_step"] in (10, 20, 30, 40)
    # the same name again stores its next version, not promoted: the name still resolves to v1
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "stored toy@v2 (not promoted: 'toy' still resolves to its promoted version" in \
        res.output.replace("\n", " ")
    res = runner.invoke(app, ["versions", "toy", "--store", str(tmp_path / "store"), "--json"])
    assert [(v["ref"], v["promoted"]) for v in json.loads(res.output)] == [("toy@v1", True), ("toy@v2", False)]
    res = runner.invoke(app, ["promote", "toy@v2", "--store", str(tmp_path / "store")])
    assert res.exit_code == 0 and "toy -> toy@v2 (was v1" in res.output
    res = runner.invoke(app, ["rollback", "toy", "--store", str(tmp_path / "store")])
    assert res.exit_code == 0 and "toy -> toy@v1" in res.output
    res = runner.invoke(app, ["eval", "toy@v2", "--file", str(data), "--text-field", "sentence", "--label-field", "y",
                              "--base", str(base), "--store", str(tmp_path / "store"), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["n"] == 6          # any command takes NAME@vN
    res = runner.invoke(app, ["adapter", "inspect", "toy@v2", "--store", str(tmp_path / "store"), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["name"] == "toy"
    res = runner.invoke(app, ["promote", "toy@v9", "--store", str(tmp_path / "store")])
    assert res.exit_code == 2 and "adapter 'toy' has no version 9; its versions: v1, v2" in res.output


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
    assert json.loads(res.stdout)["exact_match"] == 1.0       # stdout: progress lines go to stderr
    res = runner.invoke(app, ["eval", "inst", "--base", str(base), "--store", str(tmp_path / "s")])
    assert res.exit_code == 2 and "has no classification head: give --file" in res.output
    recipe = tmp_path / "one.yaml"                      # a merge keeps no head: eval says how to give it one
    recipe.write_text("method: linear\ninputs:\n  - adapter: inst\n")
    assert runner.invoke(app, ["merge", str(recipe), "--name", "m", "--store", str(tmp_path / "s")]).exit_code == 0
    res = runner.invoke(app, ["eval", "m", "--base", str(base), "--store", str(tmp_path / "s")],
                        env={"COLUMNS": "300"})
    assert res.exit_code == 2 and "(a merge keeps no head): merge again with --head-from ADAPTER" in res.output
    # the trained adapter generates the completion through the generate CLI
    path = shown["path"]
    out = runner.invoke(app, ["generate", "give me one tip", "--base", str(base), "--adapter", path,
                              "--max-tokens", "5", "--json"])
    assert json.loads(out.output.splitlines()[-1])["text"].split() == ["write", "clear", "code"]


def _train_args(base, data, store, name, *extra):
    return ["train", "--name", name, "--base", str(base), "--train-file", str(data), "--text-field", "sentence",
            "--label-field", "y", "--steps", "6", "--batch-size", "3", "--lr", "0.03", "--targets", "q_proj,v_proj",
            "--checkpoint-every", "2", "--store", str(store), "--no-progress", *extra]


def test_interrupted_run_resumes_to_the_same_adapter(files, tmp_path, monkeypatch):
    from adapterkit.store import AdapterStore
    from adapterkit.train import progress

    base, data = files
    store = tmp_path / "store"
    runner = CliRunner()
    assert runner.invoke(app, _train_args(base, data, store, "straight")).exit_code == 0

    real_update = progress.TrainProgress.update

    def killed_after_step_3(self, record):
        if record["step"] == 3:
            raise KeyboardInterrupt
        real_update(self, record)
    monkeypatch.setattr(progress.TrainProgress, "update", killed_after_step_3)
    res = runner.invoke(app, _train_args(base, data, store, "cut"))
    assert res.exit_code == 130
    assert "interrupted; nothing was stored as 'cut'. The last checkpoint (step 2) is in" in res.output
    assert "run the same command with --resume to continue" in res.output
    assert "cut" not in AdapterStore(store)                                   # the catalog never saw it
    monkeypatch.setattr(progress.TrainProgress, "update", real_update)

    res = runner.invoke(app, _train_args(base, data, store, "cut"))             # no --resume: refused
    assert res.exit_code == 2 and "an interrupted run of 'cut' left a checkpoint at step 2" in res.output
    assert "pass --resume to continue it, or --overwrite to start over" in res.output
    res = runner.invoke(app, _train_args(base, data, store, "cut", "--resume"))
    assert res.exit_code == 0, res.output
    a, b = AdapterStore(store).get("straight"), AdapterStore(store).get("cut")
    for site in a.tensors:
        torch.testing.assert_close(b.tensors[site]["lora_B"], a.tensors[site]["lora_B"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.head.weight, a.head.weight, rtol=1e-5, atol=1e-6)
    logs = {n: [json.loads(x) for x in (store / "runs" / n / "train_log.jsonl").read_text().splitlines()]
            for n in ("straight", "cut")}
    assert [x["step"] for x in logs["cut"]] == list(range(6))
    assert [x["loss"] for x in logs["cut"]] == pytest.approx([x["loss"] for x in logs["straight"]], rel=1e-5)
    assert not (store / "runs" / "cut" / "checkpoint").exists()                 # dropped once stored


def test_resume_and_overwrite_edge_cases(files, tmp_path):
    base, data = files
    store = tmp_path / "store"
    runner = CliRunner()
    res = runner.invoke(app, _train_args(base, data, store, "none", "--resume"))
    assert res.exit_code == 2 and "nothing to resume: no checkpoint of a run named 'none'" in res.output
    res = runner.invoke(app, _train_args(base, data, store, "x", "--schedule", "exp"))
    assert res.exit_code == 2 and "unknown schedule 'exp'" in res.output


def test_truncated_texts_are_counted(files, tmp_path):
    base, _ = files
    data = tmp_path / "long.jsonl"
    rows = ROWS + [("the cat runs fast and the dog runs slow " * 20, "feline")]
    data.write_text("\n".join(json.dumps({"sentence": t, "y": y}) for t, y in rows) + "\n")
    runner = CliRunner()
    res = runner.invoke(app, _train_args(base, data, tmp_path / "s", "long", "--max-length", "16"))
    assert res.exit_code == 0, res.output
    shown = json.loads(runner.invoke(app, ["show", "long", "--store", str(tmp_path / "s"), "--json"]).output)
    assert shown["lineage"][0]["params"]["truncated_examples"] == 1
    assert shown["lineage"][0]["params"]["max_length"] == 16
    text = " ".join(res.output.split())
    assert ("1 of 7 training examples (14%) were longer than --max-length 16 tokens and were cut; a larger "
            "--max-length keeps more of each") in text


def test_only_the_required_flags_use_the_objectives_defaults_and_say_so(files, tmp_path):
    base, data = files
    res = CliRunner().invoke(app, ["train", "--name", "d", "--base", str(base), "--train-file", str(data), "--eval-file",
                                   str(data), "--text-field", "sentence", "--label-field", "y", "--store",
                                   str(tmp_path / "s"), "--no-progress"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert ("defaults for classification on 6 examples: 50 steps, batch 16, lr 0.002, head lr 0.01, warm-up 5 steps, "
            "best of the checks every 12 steps on 256 validation rows (a flag sets any of them)") in text
    shown = json.loads(CliRunner().invoke(app, ["show", "d", "--store", str(tmp_path / "s"), "--json"]).output)
    params = shown["lineage"][0]["params"]
    assert (params["steps"], params["batch_size"], params["lr"], params["head_lr"], params["warmup_steps"],
            params["eval_every"]) == (50, 16, 2e-3, 1e-2, 5, 12)
    assert params["best_step"] in (12, 24, 36, 48, 50)


def test_head_lr_is_refused_where_there_is_no_head(files, tmp_path):
    base, data = files
    res = CliRunner().invoke(app, ["train", "--name", "c", "--objective", "causal-lm", "--base", str(base),
                                   "--train-file", str(data), "--head-lr", "0.1", "--store", str(tmp_path / "s")])
    assert res.exit_code == 2
    assert ("--head-lr is the learning rate of a classification head (vqa: the image projector); causal-lm training "
            "has no head trained from scratch: leave it out") in " ".join(res.output.split())


def test_chat_records_score_exact_match_on_the_answer(files, tmp_path):
    """A chat template whose turn ends "</s> hello" (like SmolLM2's "<|im_end|>\\n"): the answer is matched, not
    the template's turn end (this scored 0.0 on every chat record before)."""
    from transformers import AutoTokenizer

    base, _ = files
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> hello {% endfor %}"
                         "{% if add_generation_prompt %}<s> assistant {% endif %}")
    tok.save_pretrained(str(base))
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                       {"role": "assistant", "content": c}]})
                              for p, c in [("give me one tip", "write clear code"), ("a cat", "the dog runs")]) + "\n")
    res = CliRunner().invoke(app, ["train", "--objective", "causal-lm", "--name", "chat", "--base", str(base),
                                   "--train-file", str(data), "--eval-file", str(data), "--steps", "60",
                                   "--batch-size", "2", "--lr", "0.03", "--targets", "q_proj,k_proj,v_proj,o_proj",
                                   "--store", str(tmp_path / "s"), "--no-progress"])
    assert res.exit_code == 0, res.output
    shown = json.loads(CliRunner().invoke(app, ["show", "chat", "--store", str(tmp_path / "s"), "--json"]).output)
    assert shown["metrics"]["validation_loss"] < 0.5 and shown["metrics"]["validation_exact_match"] == 1.0


def test_head_init_probe_starts_the_head_at_the_linear_probe(files, tmp_path, monkeypatch):
    """--head-init probe: the head handed to the trainer is exactly fit_probe's on the training rows (LP-FT); the
    lineage says so. A random head (the default) differs from it."""
    import adapterkit.train.run as run
    from adapterkit import load_base
    from adapterkit.data import read_examples
    from adapterkit.train.probe import fit_probe

    base, data = files
    seen = {}
    real_fit = run.fit

    def spy(b, adapter, *a, **k):
        seen.setdefault("heads", []).append((adapter.head.weight.detach().clone(), adapter.head.bias.detach().clone()))
        return real_fit(b, adapter, *a, **k)
    monkeypatch.setattr(run, "fit", spy)
    for init in ("probe", "random"):
        res = CliRunner().invoke(app, ["train", "--name", f"h-{init}", "--base", str(base), "--train-file", str(data),
                                       "--text-field", "sentence", "--label-field", "y", "--steps", "2",
                                       "--head-init", init, "--store", str(tmp_path / "s"), "--no-progress"])
        assert res.exit_code == 0, res.output
    rows = read_examples(data, text_field="sentence", label_field="y").examples
    want = fit_probe(load_base(str(base)), rows, "last", 128, seed=0)
    (pw, pb), (rw, _) = seen["heads"]
    torch.testing.assert_close(pw, want.weight)
    torch.testing.assert_close(pb, want.bias)
    assert not torch.allclose(rw, pw)
    shown = json.loads(CliRunner().invoke(app, ["show", "h-probe", "--store", str(tmp_path / "s"), "--json"]).output)
    assert shown["lineage"][0]["params"]["head_init"] == "probe"


def test_head_init_previous_starts_an_update_where_the_old_version_stands(files, tmp_path, monkeypatch):
    """--continue-from v1 --head-init previous: the trainer starts from v1's LoRA tensors and a copy of v1's
    head (training it leaves v1's stored head as it was); without --continue-from, or from an adapter of
    other labels, a clear error before any training."""
    import adapterkit.train.run as run
    from adapterkit.store import AdapterStore

    base, data = files
    store = tmp_path / "s"
    common = ["train", "--name", "upd", "--base", str(base), "--train-file", str(data), "--text-field", "sentence",
              "--label-field", "y", "--steps", "3", "--lr", "0.05", "--store", str(store), "--no-progress"]
    assert CliRunner().invoke(app, common).exit_code == 0
    seen = {}
    real_fit = run.fit

    def spy(b, adapter, *a, **k):
        seen["head"] = (adapter.head.weight.detach().clone(), adapter.head.bias.detach().clone())
        seen["tensors"] = {s: {n: t.detach().clone() for n, t in p.items()} for s, p in adapter.tensors.items()}
        return real_fit(b, adapter, *a, **k)
    monkeypatch.setattr(run, "fit", spy)
    res = CliRunner().invoke(app, [*common, "--continue-from", "upd@v1", "--head-init", "previous"])
    assert res.exit_code == 0, res.output
    v1, v2 = AdapterStore(store).get("upd@v1"), AdapterStore(store).get("upd@v2")
    torch.testing.assert_close(seen["head"][0], v1.head.weight.float())
    torch.testing.assert_close(seen["head"][1], v1.head.bias.float())
    assert seen["tensors"].keys() == v1.tensors.keys()
    for site, parts in v1.tensors.items():
        for n, t in parts.items():
            torch.testing.assert_close(seen["tensors"][site][n], t)
    assert not torch.allclose(v2.head.weight, v1.head.weight)           # it trained, from v1's head
    res = CliRunner().invoke(app, [*common, "--head-init", "previous"])
    assert res.exit_code == 2
    assert ("--head-init previous starts the head as the head of the adapter the run continues: add --continue-from "
            "NAME (the version being updated), or leave --head-init out") in " ".join(res.output.split())
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"sentence": t, "y": y.upper()}) for t, y in ROWS) + "\n")
    res = CliRunner().invoke(app, [*common[:6], str(other), *common[7:], "--continue-from", "upd@v1",
                                   "--head-init", "previous"])
    assert res.exit_code == 2
    assert ("--head-init previous: 'upd@v1''s labels ['canine', 'feline'] differ from this run's ['CANINE', "
            "'FELINE']; its head can start only a run of the same labels (leave --head-init out)") in \
        " ".join(res.output.split())


def test_head_init_is_checked(files, tmp_path):
    base, data = files
    res = CliRunner().invoke(app, ["train", "--name", "c", "--base", str(base), "--train-file", str(data),
                                   "--head-init", "zeros", "--store", str(tmp_path / "s")])
    assert res.exit_code == 2 and "--head-init must be one of random, probe, previous, source, got 'zeros'" in res.output
    res = CliRunner().invoke(app, ["train", "--name", "c", "--objective", "causal-lm", "--base", str(base),
                                   "--train-file", str(data), "--head-init", "probe", "--store", str(tmp_path / "s")])
    assert res.exit_code == 2
    assert ("--head-init sets a classification head's start; causal-lm training has no classification head: leave "
            "it out") in " ".join(res.output.split())


def test_head_init_source_starts_a_composition_at_its_own_source_head(files, tmp_path, monkeypatch):
    """--method scalearn --head-init source: the head handed to the trainer is a copy of the first source's head
    with the run's labels (a source of other labels is passed over); for a method without sources, or sources
    none of which has the labels, a clear error before any training."""
    import adapterkit.train.run as run
    from adapterkit.store import AdapterStore

    base, data = files
    store = tmp_path / "s"
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"sentence": t, "y": y.upper()}) for t, y in ROWS) + "\n")
    common = ["--base", str(base), "--text-field", "sentence", "--label-field", "y", "--steps", "3", "--lr", "0.05",
              "--targets", "q_proj,v_proj", "--store", str(store), "--no-progress"]
    for name, file in (("upper", other), ("own", data)):
        res = CliRunner().invoke(app, ["train", "--name", name, "--train-file", str(file), *common])
        assert res.exit_code == 0, res.output
    seen = {}
    real_fit = run.fit

    def spy(b, adapter, *a, **k):
        seen["head"] = (adapter.head.weight.detach().clone(), adapter.head.bias.detach().clone())
        seen["omega"] = [p["omega"].detach().clone() for p in adapter.tensors.values()]
        return real_fit(b, adapter, *a, **k)
    monkeypatch.setattr(run, "fit", spy)
    res = CliRunner().invoke(app, ["train", "--name", "comp", "--train-file", str(data), *common, "--method",
                                   "scalearn", "--sources", "upper,own", "--head-init", "source"])
    assert res.exit_code == 0, res.output
    own = AdapterStore(store).get("own")
    torch.testing.assert_close(seen["head"][0], own.head.weight.float())
    torch.testing.assert_close(seen["head"][1], own.head.bias.float())
    assert not torch.allclose(AdapterStore(store).get("comp").head.weight, own.head.weight)   # trained from it
    assert all(abs(float(w.mean()) - 1.0) < 0.01 for w in seen["omega"])     # the paper's start: 2/N each, N = 2
    # --omega-init source: ω starts as 'own' alone (row 1 of [N, d]), so the composition starts as that source
    res = CliRunner().invoke(app, ["train", "--name", "comp-own", "--train-file", str(data), *common, "--method",
                                   "scalearn", "--sources", "upper,own", "--head-init", "source", "--omega-init",
                                   "source"])
    assert res.exit_code == 0, res.output
    for w in seen["omega"]:
        assert torch.equal(w[0], torch.zeros_like(w[0])) and torch.equal(w[1], torch.ones_like(w[1]))
    params = AdapterStore(store).get("comp-own").meta.lineage[-1]["params"]
    assert params["head_init"] == "source" and params["omega_init"] == "source"
    res = CliRunner().invoke(app, ["train", "--name", "comp3", "--train-file", str(data), *common, "--method",
                                   "scalearn", "--sources", "upper,own", "--omega-init", "source"])
    assert res.exit_code == 2
    assert ("--omega-init source starts ScaLearn at the source whose head starts the run: add --head-init source, "
            "or leave --omega-init out") in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["train", "--name", "comp2", "--train-file", str(data), *common, "--method",
                                   "scalearn", "--sources", "upper", "--head-init", "source"])
    assert res.exit_code == 2
    assert ("--head-init source: no source has a classification head with this run's labels ['canine', 'feline'] "
            "(upper ['CANINE', 'FELINE']); add a source trained on the task (e.g. a few-shot adapter of it), or "
            "leave --head-init out (a random head)") in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["train", "--name", "plain", "--train-file", str(data), *common,
                                   "--head-init", "source"])
    assert res.exit_code == 2
    assert ("--head-init source starts the head as a composition source's head; --method lora has no sources: add "
            "--method scalearn or fusion, or leave --head-init out") in " ".join(res.output.split())
