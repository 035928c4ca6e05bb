"""Adapter updates: negative flips (train/compare.py), `adapterkit compare`, and the promotion gate."""

from __future__ import annotations

import json

import pytest
from conftest import classification_files
from typer.testing import CliRunner

from adapterkit import ConfigError
from adapterkit.cli import app
from adapterkit.train.compare import compare_predictions, gate_problems


def test_flip_rates_per_row_and_per_class():
    gold = ["a", "a", "a", "b", "b", "b", "b", "b"]
    old = ["a", "a", "b", "b", "b", "a", "a", "b"]      # right: 0 1 3 4 7
    new = ["a", "b", "a", "b", "a", "b", "a", "b"]      # right: 0 2 3 5 7
    got = compare_predictions(gold, old, new)
    assert (got["n"], got["old_accuracy"], got["new_accuracy"], got["gain"]) == (8, 5 / 8, 5 / 8, 0.0)
    assert (got["negative_flips"], got["positive_flips"]) == (2, 2)             # rows 1, 4 lost; 2, 5 won
    assert got["negative_flip_rows"] == [1, 4] and got["negative_flip_rate"] == 2 / 8
    assert got["inconsistency"] == 4 / 8                                        # rows 1, 2, 4, 5 changed
    assert got["per_class"] == [
        {"label": "a", "rows": 3, "old_accuracy": 2 / 3, "new_accuracy": 2 / 3, "negative_flips": 1, "positive_flips": 1},
        {"label": "b", "rows": 5, "old_accuracy": 3 / 5, "new_accuracy": 3 / 5, "negative_flips": 1, "positive_flips": 1}]
    assert got["gain"] == pytest.approx(got["positive_flip_rate"] - got["negative_flip_rate"])
    assert gate_problems(got, 0.3, 0.0) == []
    assert gate_problems(got, 0.1, 0.05) == [
        "negative flip rate 0.2500 > 0.1 (2 of 8 rows the old version got right)",
        "accuracy gain +0.0000 < +0.05 (0.6250 -> 0.6250)"]
    with pytest.raises(ConfigError, match="compare needs one old and one new prediction per row"):
        compare_predictions(["a"], ["a"], [])


def test_cli_compare_stores_the_numbers_and_promote_applies_the_gate(tmp_path):
    path, data = classification_files(tmp_path)
    store = str(tmp_path / "s")
    runner = CliRunner()
    common = ["--base", str(path), "--train-file", str(data), "--store", store, "--no-progress"]
    assert runner.invoke(app, ["train", "--name", "toy", "--steps", "2", "--lr", "1e-4", *common]).exit_code == 0
    res = runner.invoke(app, ["train", "--name", "toy", "--steps", "12", "--seed", "3", *common])
    assert res.exit_code == 0 and "toy@v2 (not promoted" in res.output.replace("\n", " ")
    res = runner.invoke(app, ["compare", "toy", "toy@v2", "--file", str(data), "--store", store, "--json",
                              "--no-progress", "--plot", str(tmp_path / "flips.png")])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert (got["n"], got["old_ref"], got["stored_with"]) == (12, "toy@v1", "toy@v2")
    assert got["gain"] == pytest.approx(got["new_accuracy"] - got["old_accuracy"])
    assert (tmp_path / "flips.png").stat().st_size > 1000
    versions = json.loads(runner.invoke(app, ["versions", "toy", "--store", store, "--json"]).output)
    assert versions[1]["compare"]["negative_flip_rate"] == got["negative_flip_rate"]
    # a gate the update cannot pass (gain >= 2 is impossible) refuses, naming the numbers; nothing changes
    res = runner.invoke(app, ["promote", "toy@v2", "--min-gain", "2", "--store", store])
    assert res.exit_code == 2 and "the gate refuses toy@v2: accuracy gain" in res.output.replace("\n", " ")
    assert json.loads(runner.invoke(app, ["show", "toy", "--store", store, "--json"]).output)["version"] == 1
    # the store's default gate applies without flags; a passing one promotes
    assert "negative flip rate <= 1.0" in runner.invoke(app, ["gate", "--max-nfr", "1.0", "--min-gain", "-1",
                                                              "--store", store]).output
    res = runner.invoke(app, ["promote", "toy@v2", "--store", store])
    assert res.exit_code == 0 and "toy -> toy@v2 (was v1" in res.output
    # v3 has no comparison: the default gate asks for one (or --force)
    assert runner.invoke(app, ["train", "--name", "toy", "--steps", "2", *common]).exit_code == 0
    res = runner.invoke(app, ["promote", "toy@v3", "--store", store])
    assert res.exit_code == 2 and "toy@v3 has no comparison to gate its promotion on" in res.output.replace("\n", " ")
    # a comparison against a version that is no longer the promoted one is stale
    runner.invoke(app, ["compare", "toy@v1", "toy@v3", "--file", str(data), "--store", store, "--no-progress"])
    res = runner.invoke(app, ["promote", "toy@v3", "--store", store])
    assert res.exit_code == 2 and "was compared with toy@v1, but 'toy' now resolves to toy@v2" in \
        res.output.replace("\n", " ")
    assert runner.invoke(app, ["promote", "toy@v3", "--force", "--store", store]).exit_code == 0
    assert "no default promotion gate" in runner.invoke(app, ["gate", "--clear", "--store", store]).output


def test_the_compatible_loss_is_ce_plus_the_kl_to_the_old_version_on_its_right_rows():
    import torch

    from adapterkit.train import compatible

    z = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    batch = {"labels": torch.tensor([0, 1, 0]), "old_probs": torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]]),
             "old_right": torch.tensor([True, True, False])}
    original = compatible.logits
    compatible.logits = lambda model, head, b: z
    try:
        ce = torch.nn.functional.cross_entropy(z, batch["labels"])
        assert float(compatible.compat_loss(None, 0.0)(None, batch)) == pytest.approx(float(ce))
        logp = torch.log_softmax(z, -1)
        kl = (batch["old_probs"] * (batch["old_probs"].log() - logp)).sum(-1)
        want = ce + 2.0 * (kl[0] + kl[1]) / 3                  # the row the old version got wrong is left out
        assert float(compatible.compat_loss(None, 2.0)(None, batch)) == pytest.approx(float(want))
    finally:
        compatible.logits = original


def test_a_compatible_update_stays_closer_to_the_old_version_where_it_was_right(tmp_path):
    from adapterkit import AdapterRuntime, load_base
    from adapterkit.store import AdapterStore
    from adapterkit.train.classification import collate_fn, predict_proba
    from adapterkit.train.compatible import old_targets
    from conftest import CLASS_ROWS

    path, data = classification_files(tmp_path)
    store = str(tmp_path / "s")
    runner = CliRunner()
    common = ["--base", str(path), "--train-file", str(data), "--store", store, "--no-progress", "--eval-every", "0"]
    assert runner.invoke(app, ["train", "--name", "v", "--steps", "6", "--seed", "1", *common]).exit_code == 0
    assert runner.invoke(app, ["train", "--name", "v", "--steps", "10", "--seed", "2", *common]).exit_code == 0
    res = runner.invoke(app, ["train", "--name", "v", "--steps", "10", "--seed", "2", "--compatible-with", "v@v1",
                              "--compat-weight", "5", *common])
    assert res.exit_code == 0, res.output
    st = AdapterStore(store)
    params = st.show("v@v3")["lineage"][0]["params"]
    assert params["compatible_with"]["name"] == "v" and params["compatible_with"]["weight"] == 5.0
    base = load_base(str(path))
    from adapterkit.data.readers import Example
    rows = [Example(t, y) for t, y in CLASS_ROWS]
    old = st.get("v@v1")
    p_old, right = old_targets(base, old, rows, old.head.labels, 128)
    assert bool(right.any())

    def kl_to_old(ref):
        new = st.get(ref)
        rt = AdapterRuntime.from_base(base)
        rt.add(new)
        _, p_new = predict_proba(rt, new.name, new.head, rows, collate_fn(base.tokenizer, new.head, 128))
        kl = (p_old * (p_old.clamp_min(1e-12).log() - p_new.clamp_min(1e-12).log())).sum(-1)
        return float(kl[right].mean())
    assert kl_to_old("v@v3") < 0.7 * kl_to_old("v@v2")       # the same run without the distillation term
    res = runner.invoke(app, ["train", "--name", "w", "--objective", "mlm", "--compatible-with", "v", *common])
    assert res.exit_code == 2 and "a masked-LM adapter has none to keep" in res.output
    res = runner.invoke(app, ["train", "--name", "w", "--compatible-with", "nope", *common])
    assert res.exit_code == 2 and "no adapter named 'nope'" in res.output


def test_cli_compare_of_instruction_adapters_uses_exact_match_and_completion_loss(tiny_llm_dir, tmp_path):
    from adapterkit import LoraConfig, create_adapter, load_base
    from adapterkit.store import AdapterStore
    from adapterkit.train.compare import compare_instruction_rows
    from conftest import ATTN

    rows_old = [{"loss_sum": 2.0, "tokens": 2, "exact": True}, {"loss_sum": 1.0, "tokens": 1, "exact": False},
                {"loss_sum": 3.0, "tokens": 3, "exact": True}]
    rows_new = [{"loss_sum": 4.0, "tokens": 2, "exact": False}, {"loss_sum": 0.5, "tokens": 1, "exact": True},
                {"loss_sum": 3.0, "tokens": 3, "exact": True}]
    got = compare_instruction_rows(rows_old, rows_new)
    assert (got["negative_flips"], got["positive_flips"], got["negative_flip_rows"]) == (1, 1, [0])
    assert got["old_loss"] == pytest.approx(1.0) and got["new_loss"] == pytest.approx((2.0 + 0.5 + 1.0) / 3)
    assert got["loss_rise_rate"] == pytest.approx(1 / 3) and got["worst_rows"] == [{"row": 0, "old_loss": 1.0,
                                                                                     "new_loss": 2.0}]
    base = load_base(str(tiny_llm_dir))
    st = AdapterStore(tmp_path / "s")
    for seed in (0, 1):
        st.put(create_adapter("chat", base.model, LoraConfig(r=2, target_modules=ATTN, init="nonzero", init_std=0.3),
                              seed=seed, fingerprint=base.fingerprint, base_name=str(tiny_llm_dir)))
    records = tmp_path / "r.jsonl"
    records.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                               for p, c in [("hello", "world"), ("the cat", "runs"), ("a dog", "is here")]))
    res = CliRunner().invoke(app, ["compare", "chat", "chat@v2", "--file", str(records), "--store", str(tmp_path / "s"),
                                   "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["metric"] == "exact_match" and out["n"] == 3 and out["old_loss"] != out["new_loss"]
    assert out["stored_with"] == "chat@v2"


def test_a_compatible_instruction_update_keeps_the_old_versions_right_tokens(lm_setup, tmp_path):
    """CompatLMLoss: the LM loss plus the KL from the old version on the completion tokens it predicted right;
    weight 0 is the plain loss, and the distilled update ends closer to the old version there."""
    import copy

    import torch

    from adapterkit import AdapterRuntime, LoraConfig, create_adapter
    from adapterkit.train.compatible import CompatLMLoss
    from adapterkit.train.instruct import lm_loss
    from adapterkit.train.trainer import TrainConfig, train
    from conftest import ATTN

    base, examples, coll = lm_setup
    rt = AdapterRuntime.from_base(base)
    rt.add(create_adapter("old", base.model, LoraConfig(r=4, target_modules=ATTN), seed=1))
    train(rt, "old", examples, coll, lm_loss, TrainConfig(steps=8, batch_size=4, lr=3e-2))   # right on some tokens
    old = rt.adapters["old"]
    batch = coll(examples)
    plain = CompatLMLoss("old", 0.0)
    plain.bind(rt)
    with torch.no_grad():
        assert float(plain(base.model, batch)) == pytest.approx(float(lm_loss(base.model, batch)))

    def trained(weight):
        run = AdapterRuntime.from_base(base)
        run.add(copy.deepcopy(old))
        run.add(create_adapter("new", base.model, LoraConfig(r=4, target_modules=ATTN), seed=2))
        loss = CompatLMLoss("old", weight)
        loss.bind(run)
        train(run, "new", examples, coll, loss, TrainConfig(steps=15, batch_size=4, lr=3e-2))
        with torch.no_grad():
            with run.batch(["old"] * 4):
                p_old = base.model(**batch).logits.softmax(-1)
            with run.batch(["new"] * 4):
                log_new = base.model(**batch).logits.log_softmax(-1)
        gold = batch["labels"][:, 1:]
        right = (gold != -100) & (p_old[:, :-1].argmax(-1) == gold)
        kl = (p_old * (p_old.clamp_min(1e-12).log() - log_new)).sum(-1)[:, :-1]
        assert int(right.sum()) >= 3
        return float(kl[right].mean())
    assert trained(5.0) < 0.7 * trained(0.0)
