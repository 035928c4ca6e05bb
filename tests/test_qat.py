"""Quantization-aware training (`train --bits`, train/qat.py): the forward computes with the quantized
values, the gradient taken there updates fp32 latents (straight through), the stored adapter is the
packed latents, and a resumed run replays the uninterrupted one."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import ATTN, classification_files
from typer.testing import CliRunner

from adapterkit import AdapterRuntime, ConfigError, LoraConfig, SparseConfig, create_adapter
from adapterkit.cli import app
from adapterkit.codecs import LowBit
from adapterkit.train.trainer import TrainConfig, train

def lm_loss(model, batch):
    return model(**batch).loss


def fresh(base, seed=0):
    rt = AdapterRuntime.from_base(base)
    rt.add(create_adapter("t", base.model, LoraConfig(r=8, alpha=16, target_modules=ATTN, init="nonzero",
                                                      init_std=0.1), seed=seed))
    return rt


def _is_packed(adapter) -> bool:
    """The adapter's tensors are exactly what its packed codes read back."""
    values = adapter.packed.unpack()
    return all(torch.equal(adapter.tensors[s][k], values[s][k]) for s, k, _ in adapter.packed.layout)


def _grads(base, examples, coll, values):
    """d loss / d tensors of a float adapter holding `values` (site -> name -> tensor), on all examples."""
    rt = fresh(base)
    a = rt.remove("t")
    for s, parts in a.tensors.items():
        for k in parts:
            parts[k] = values[s][k].clone().requires_grad_(True)
    rt.add(a)
    torch.manual_seed(0)
    rt.activate("t")
    lm_loss(base.model, coll(examples)).backward()
    rt.deactivate()
    return {s: {k: t.grad for k, t in parts.items()} for s, parts in a.tensors.items()}


def test_the_gradient_at_the_quantized_point_moves_the_latents(lm_setup):
    """One AdamW step moves each latent w by lr * g / (|g| + eps) (first step, bias-corrected, no decay), g the
    gradient of the loss at the QUANTIZED adapter q(w0) (straight through): the stored q(w1) matches that and
    not the step a float gradient at w0 would take."""
    base, examples, coll = lm_setup
    codec, lr = LowBit(8, 8), 1e-2
    rt = fresh(base)
    w0 = {s: {k: t.clone() for k, t in p.items()} for s, p in rt.adapters["t"].tensors.items()}
    g_q = _grads(base, examples, coll, {s: {k: codec.round_trip(t) for k, t in p.items()} for s, p in w0.items()})
    g_f = _grads(base, examples, coll, w0)
    cfg = TrainConfig(steps=1, batch_size=4, lr=lr, schedule="constant", max_grad_norm=None, bits=8, group_size=8)
    train(rt, "t", examples, coll, lm_loss, cfg)
    out = rt.adapters["t"]
    assert out.packed is not None and out.packed.codec == codec and out.summary().endswith("8-bit g8")
    assert _is_packed(out) and not any(t.requires_grad for p in out.tensors.values() for t in p.values())
    differs = 0
    for s, parts in out.tensors.items():
        for k in ("lora_A", "lora_B"):
            step = lambda g: w0[s][k] - lr * g / (g.abs() + 1e-8)   # noqa: E731
            torch.testing.assert_close(parts[k], codec.round_trip(step(g_q[s][k])), rtol=0, atol=1e-6)
            differs += int((codec.round_trip(step(g_f[s][k])) != parts[k]).sum())
    assert differs > 0                              # the float gradient would have stored another adapter


def test_the_stored_low_bit_adapter_is_the_trained_one_and_resume_replays(lm_setup, tmp_path):
    base, examples, coll = lm_setup
    cfg = TrainConfig(steps=8, batch_size=2, lr=2e-2, warmup_steps=2, seed=3, bits=2, group_size=16)
    straight = fresh(base)
    full = train(straight, "t", examples, coll, lm_loss, cfg)
    assert full.losses[-1] < full.losses[0]

    def stop(record):
        if record["step"] == 5:
            raise KeyboardInterrupt
    ck = replace(cfg, checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(base), "t", examples, coll, lm_loss, ck, checkpoint_dir=tmp_path / "ck", on_step=stop)
    again = fresh(base)
    resumed = train(again, "t", examples, coll, lm_loss, ck, checkpoint_dir=tmp_path / "ck", resume=True)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    a, b = straight.adapters["t"], again.adapters["t"]
    assert torch.equal(a.packed.codes, b.packed.codes)
    # saved and loaded, the adapter computes exactly what the trainer's last forward did
    a.save(tmp_path / "a")
    from adapterkit import Adapter

    back = Adapter.load(tmp_path / "a")
    for s in a.sites:
        for k in ("lora_A", "lora_B"):
            assert torch.equal(back.tensors[s][k], a.tensors[s][k])
    batch = coll(examples)
    with torch.no_grad(), straight.batch(["t"] * 4):
        live = lm_loss(base.model, batch)
    assert float(live) == pytest.approx(full.losses[-1], rel=0.3)      # the forward on the packed values


def test_training_floats_again_drops_a_stale_packing(lm_setup):
    base, examples, coll = lm_setup
    rt = fresh(base)
    train(rt, "t", examples, coll, lm_loss, TrainConfig(steps=2, batch_size=2, bits=4))
    assert rt.adapters["t"].packed is not None
    train(rt, "t", examples, coll, lm_loss, TrainConfig(steps=2, batch_size=2))
    assert rt.adapters["t"].packed is None


def test_bad_bits_and_a_family_with_nothing_to_quantize(lm_setup):
    base, examples, coll = lm_setup
    with pytest.raises(ConfigError, match="bits must be 1, 2, 4 or 8, got 5"):
        TrainConfig(bits=5)
    rt = AdapterRuntime.from_base(base)
    rt.add(create_adapter("sp", base.model, SparseConfig(target_modules=tuple(ATTN), init="random")))
    with pytest.raises(ConfigError, match=r"--bits 1 trains the adapter's float matrices at low precision; a sparse "
                       r"adapter trains none"):
        train(rt, "sp", examples, coll, lm_loss, TrainConfig(steps=1, batch_size=2, bits=1))


def test_cli_train_bits_stores_a_packed_classifier(tmp_path):
    from adapterkit.store import AdapterStore

    path, data = classification_files(tmp_path)
    common = ["--base", str(path), "--train-file", str(data), "--store", str(tmp_path / "s"), "--no-progress",
              "--steps", "4"]
    res = CliRunner().invoke(app, ["train", "--name", "q", "--bits", "1", *common])
    assert res.exit_code == 0, res.output
    row = AdapterStore(tmp_path / "s").show("q")
    assert row["summary"].endswith("1-bit g64") and row["lineage"][0]["params"]["bits"] == 1
    q = AdapterStore(tmp_path / "s").get("q")
    assert q.head is not None and q.packed.codec == LowBit(1)
    assert _is_packed(q) and len(q.packed.layout) == 2 * len(q.sites)
    res = CliRunner().invoke(app, ["train", "--name", "g", "--group-size", "32", *common])
    assert res.exit_code == 2 and "--group-size sets the scale groups of --bits: add --bits" in res.output
    res = CliRunner().invoke(app, ["train", "--name", "g", "--bits", "3", *common])
    assert res.exit_code == 2 and "bits must be 1, 2, 4 or 8, got 3" in res.output
    assert json.loads(CliRunner().invoke(app, ["ls", "--store", str(tmp_path / "s"), "--json"]).output)[0]["bytes"] > 0
