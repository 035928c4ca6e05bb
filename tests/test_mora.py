"""MoRA (methods/mora.py): rank-1 experts that select themselves (top-k, threshold), and continual
learning: `train --method mora --continue-from NAME` freezes NAME's experts and appends new ones."""

from __future__ import annotations

import pytest
import torch
from conftest import ATTN, classification_files, tiny_llama
from typer.testing import CliRunner

from adapterkit import ConfigError, MoraConfig, create_adapter
from adapterkit.cli import app
from adapterkit.methods.mora import mora_update


def test_each_token_keeps_its_top_k_experts_above_the_threshold():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])           # norms 1, 2, sqrt 2
    b = torch.eye(3)                                                  # expert i writes output i
    x = torch.tensor([[3.0, 1.0], [0.1, 0.0]])
    # token 0: a·x = (3, 2, 4), scores (3, 1, 2.83): top-2 keeps experts 0 and 2
    got = mora_update(MoraConfig(r=3, alpha=3.0, top_k=2, target_modules=("q",)), a, b, x)
    torch.testing.assert_close(got[0], torch.tensor([3.0, 0.0, 4.0]))
    # threshold 0.5: token 1's scores (0.1, 0, 0.07) keep nothing
    got = mora_update(MoraConfig(r=3, alpha=3.0, top_k=2, threshold=0.5, target_modules=("q",)), a, b, x)
    torch.testing.assert_close(got[1], torch.zeros(3))
    torch.testing.assert_close(got[0], torch.tensor([3.0, 0.0, 4.0]))
    with pytest.raises(ConfigError, match="MoRA top_k must be an integer >= 1, got 0"):
        MoraConfig(top_k=0)


def test_continue_from_freezes_the_old_experts_and_trains_new_ones(tmp_path):
    from adapterkit.store import AdapterStore

    path, data = classification_files(tmp_path)
    store = str(tmp_path / "s")
    common = ["--base", str(path), "--train-file", str(data), "--store", store, "--no-progress", "--steps", "4",
              "--method", "mora", "--r", "3"]
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--name", "t1", *common])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "--name", "t2", "--continue-from", "t1", "--top-k", "2", *common])
    assert res.exit_code == 0, res.output
    st = AdapterStore(store)
    t1, t2 = st.get("t1"), st.get("t2")
    assert (t2.config.frozen, t2.config.r, t2.config.top_k) == (3, 3, 2)
    assert t2.summary() == "mora 6 experts (3 frozen + 3 new), top-2"
    for site in t1.sites:
        assert torch.equal(t2.tensors[site]["A_old"], t1.tensors[site]["A"])        # carried, never trained
        assert torch.equal(t2.tensors[site]["B_old"], t1.tensors[site]["B"])
    assert any(float(p["B"].abs().max()) > 0 for p in t2.tensors.values())          # the new experts learned
    lineage = st.show("t2")["lineage"][0]
    assert lineage["inputs"][0]["name"] == "t1"
    res = runner.invoke(app, ["train", "--name", "t3", "--continue-from", "t2", *common])
    assert res.exit_code == 0 and st.get("t3").config.frozen == 6
    lora = ["--base", str(path), "--train-file", str(data), "--store", store, "--no-progress", "--steps", "2"]
    assert runner.invoke(app, ["train", "--name", "plain", *lora]).exit_code == 0
    res = runner.invoke(app, ["train", "--name", "bad", "--continue-from", "plain", *common])
    assert res.exit_code == 2 and "--continue-from 'plain': it is a LoRA adapter; MoRA continues" in res.output
    # sequential LoRA (the forgetting baseline): the stored adapter's tensors train further
    res = runner.invoke(app, ["train", "--name", "plain2", "--continue-from", "plain", "--lr", "1e-12", *lora])
    assert res.exit_code == 0, res.output
    before, after = st.get("plain"), st.get("plain2")
    for site in before.sites:
        torch.testing.assert_close(after.tensors[site]["lora_A"], before.tensors[site]["lora_A"])
    res = runner.invoke(app, ["train", "--name", "bad", "--continue-from", "t1", *lora])
    assert res.exit_code == 2 and "--continue-from 't1': it is a MoRA adapter; a LoRA run continues" in res.output


def test_frozen_experts_take_no_gradient():
    model = tiny_llama()
    a = create_adapter("m", model, MoraConfig(r=2, frozen=3, target_modules=tuple(ATTN), init="nonzero"))
    kinds = a.method.tensor_kinds(a.config)
    assert [k for k, v in kinds.items() if v.trainable] == ["A", "B"]
    site = next(iter(a.tensors.values()))
    assert site["A_old"].shape[0] == 3 and site["A"].shape[0] == 2
