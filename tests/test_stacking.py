"""Stacking (MAD-X style): a task adapter trained with a frozen domain or language adapter under it
(`train --stack-on D`), scored with it again by default or with another one swapped in (`eval
--stack-on`). The runtime's underlay makes every row that names the task adapter also get D."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TARGETS, classification_files, save_tiny
from typer.testing import CliRunner

from adapterkit import AdapterNotFoundError, AdapterRuntime, ConfigError, LoraConfig, create_adapter, load_base
from adapterkit.cli import app


def test_an_underlay_adds_its_adapters_to_every_row_naming_the_adapter(tmp_path):
    base = load_base(str(save_tiny("llama", tmp_path / "llama")))
    rt = AdapterRuntime.from_base(base)
    for i, name in enumerate(("d", "t", "e")):
        rt.add(create_adapter(name, base.model, LoraConfig(r=2, target_modules=TARGETS["llama"], init="nonzero",
                                                           init_std=0.3), seed=i))
    ids = torch.randint(3, 60, (1, 6)).expand(3, 6)
    with torch.no_grad(), rt.batch(["t", {"d": 1.0, "t": 1.0}, {"t": 0.5, "e": 1.0}]):
        before = rt.model(ids).logits
    rt.underlay("t", ["d"])
    with torch.no_grad(), rt.batch(["t", {"d": 1.0, "t": 1.0}, {"t": 0.5, "e": 1.0}]):
        after = rt.model(ids).logits
    torch.testing.assert_close(after[0], before[1], rtol=1e-5, atol=1e-5)     # "t" is now d + t
    torch.testing.assert_close(after[1], before[1], rtol=1e-5, atol=1e-5)     # d is not added twice
    assert not torch.allclose(after[2], before[2], atol=1e-4)                 # d joins t's weighted rows too
    assert not torch.allclose(before[0], before[1], atol=1e-4)                # the test can fail
    with pytest.raises(ConfigError, match="adapter 't' cannot be stacked on itself"):
        rt.underlay("t", ["t"])
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'x'"):
        rt.underlay("t", ["x"])
    rt.remove("d")                                      # its stacks end with it
    with torch.no_grad(), rt.batch(["t"]):
        torch.testing.assert_close(rt.model(ids[:1]).logits[0], before[0], rtol=1e-5, atol=1e-5)


def test_train_stack_on_and_eval_with_the_stack_another_or_none(tmp_path):
    from adapterkit.merge.common import content_fingerprint
    from adapterkit.store import AdapterStore
    from adapterkit.train.run import score

    path, data = classification_files(tmp_path)
    common = ["--base", str(path), "--train-file", str(data), "--store", str(tmp_path / "s"), "--no-progress"]
    for name, seed in (("d", "1"), ("d2", "2")):
        res = CliRunner().invoke(app, ["train", "--name", name, "--steps", "3", "--seed", seed, *common])
        assert res.exit_code == 0, res.output
    store = AdapterStore(tmp_path / "s")
    d_before = store.get("d")
    res = CliRunner().invoke(app, ["train", "--name", "t", "--stack-on", "d", "--steps", "8", *common])
    assert res.exit_code == 0, res.output
    t = store.get("t")
    assert store.show("t")["lineage"][0]["params"]["stack_on"] == [{"name": "d",
                                                                    "fingerprint": content_fingerprint(d_before)}]
    assert content_fingerprint(store.get("d")) == content_fingerprint(d_before)   # the domain adapter is frozen
    res = CliRunner().invoke(app, ["train", "--name", "t0", "--steps", "8", *common])     # the same run, no stack
    assert res.exit_code == 0, res.output
    t0 = store.get("t0")
    assert any(not torch.allclose(t.tensors[s][k], t0.tensors[s][k], atol=1e-6)          # it trained under d
               for s in t.tensors for k in t.tensors[s])

    def probs(stack):
        rt = AdapterRuntime.from_base(load_base(str(path)))
        rt.add(t)
        for n in stack:
            rt.add(store.get(n))
        if stack:
            rt.underlay("t", stack)
        from adapterkit.data.readers import read_examples
        return score(rt, t, read_examples(data).examples).probs

    def eval_probs(*flags):
        out = tmp_path / f"pred{len(flags)}{''.join(flags)}.jsonl"
        res = CliRunner().invoke(app, ["eval", "t", "--file", str(data), "--predictions", str(out), "--store",
                                       str(tmp_path / "s"), "--no-progress", *flags])
        assert res.exit_code == 0, res.output
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        return torch.tensor([[r["probabilities"][k] for k in sorted(r["probabilities"])] for r in rows]), res.output
    stacked, said = eval_probs()                                  # default: the stack it was trained on
    assert "stacked on d" in said
    torch.testing.assert_close(stacked, probs(["d"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eval_probs("--stack-on", "none")[0], probs([]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eval_probs("--stack-on", "d2")[0], probs(["d2"]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(probs(["d"]), probs([]), atol=1e-5)               # the stack matters
    res = CliRunner().invoke(app, ["train", "--name", "u", "--stack-on", "u", "--steps", "2", *common])
    assert res.exit_code != 0 and "--stack-on names 'u', the adapter this run trains; stack it on others" in res.output
