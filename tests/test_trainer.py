"""The trainer: only adapter tensors change, loss falls, resume replays the same curve."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import ATTN

from adapterkit import AdapterRuntime, ConfigError, LoraConfig, create_adapter
from adapterkit.train.trainer import BatchPlan, TrainConfig, train

@pytest.fixture
def setup(lm_setup):
    return lm_setup


def fresh(base, seed=0, dropout=0.0):
    rt = AdapterRuntime.from_base(base)
    targets = ATTN + ["gate_proj", "up_proj", "down_proj"]
    rt.add(create_adapter("t", base.model, LoraConfig(r=8, alpha=16, target_modules=targets, dropout=dropout),
                          seed=seed))
    return rt


def lm_loss(model, batch):
    return model(**batch).loss


def test_only_adapter_tensors_train_and_loss_falls(setup, tmp_path):
    base, examples, coll = setup
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    rt = fresh(base)
    res = train(rt, "t", examples, coll, lm_loss, TrainConfig(steps=40, batch_size=4, lr=3e-2, warmup_steps=2),
                log_path=tmp_path / "log.jsonl")
    assert res.losses[-1] < 0.5 * res.losses[0]
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())
    site = next(iter(rt.adapters["t"].tensors.values()))
    assert site["lora_B"].abs().sum() > 0 and not site["lora_B"].requires_grad
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(40)) and lines[0]["lr"] == pytest.approx(1.5e-2)
    # after training the fast kernels see the trained tensors
    ids = coll(examples)["input_ids"]
    with torch.no_grad():
        with rt.batch(["t"] * 4, kernel="dense"):
            live = base.model(ids).logits
        with rt.batch(["t"] * 4, kernel="gather"):
            fast = base.model(ids).logits
    torch.testing.assert_close(fast, live, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.3])   # with dropout the masks must replay too
def test_resume_replays_the_uninterrupted_run(setup, tmp_path, dropout):
    base, examples, coll = setup
    cfg = TrainConfig(steps=10, batch_size=3, grad_accum=2, lr=5e-3, warmup_steps=3, seed=7)
    straight = fresh(base, dropout=dropout)
    full = train(straight, "t", examples, coll, lm_loss, cfg)

    def stop(record):
        if record["step"] == 5:                                 # killed after step 5; the checkpoint holds step 3
            raise KeyboardInterrupt

    checkpointed = replace(cfg, checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(base, dropout=dropout), "t", examples, coll, lm_loss, checkpointed, checkpoint_dir=tmp_path / "ck",
              on_step=stop, log_path=tmp_path / "log.jsonl")
    torch.rand(5)                                               # the caller's RNG moved on meanwhile
    resumed_rt = fresh(base, dropout=dropout)
    resumed = train(resumed_rt, "t", examples, coll, lm_loss, checkpointed, checkpoint_dir=tmp_path / "ck",
                    resume=True, log_path=tmp_path / "log.jsonl")
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    # the log reads like one run: steps 0..9 once each (4 and 5 were logged, then replayed)
    logged = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged] == list(range(10))
    assert [x["loss"] for x in logged] == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    a = straight.adapters["t"].tensors
    b = resumed_rt.adapters["t"].tensors
    for site in a:
        torch.testing.assert_close(b[site]["lora_A"], a[site]["lora_A"], rtol=1e-5, atol=1e-6)


def test_same_seed_same_run_and_batch_order(setup):
    base, examples, coll = setup
    cfg = TrainConfig(steps=5, batch_size=2, lr=5e-3, seed=3)
    assert train(fresh(base), "t", examples, coll, lm_loss, cfg).losses == \
        train(fresh(base), "t", examples, coll, lm_loss, cfg).losses
    # each epoch is a permutation: over 2 micro-batches of 2, every example appears once
    plan = BatchPlan(4, 2, 3)
    assert sorted(plan.indices(0) + plan.indices(1)) == [0, 1, 2, 3]


def test_length_bucketing_cuts_padding_and_stays_deterministic():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (1000,), generator=gen).tolist()

    def padding(plan):
        batches = [plan.indices(k) for k in range(1000 // 8)]
        assert sorted(i for b in batches for i in b) == list(range(1000))      # one epoch, each once
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    plain, bucketed = padding(BatchPlan(1000, 8, 1)), padding(BatchPlan(1000, 8, 1, lengths))
    assert bucketed < 0.1 * plain
    assert BatchPlan(1000, 8, 1, lengths).indices(77) == BatchPlan(1000, 8, 1, lengths).indices(77)
    with pytest.raises(ConfigError, match="3 lengths for 4 examples"):
        BatchPlan(4, 2, 0, [1, 2, 3])


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps must be >= 1, got 0"),
    (dict(lr=0.0), "lr must be a positive number"),
    (dict(warmup_steps=5, steps=3), r"warmup_steps must be in \[0, steps=3\], got 5"),
    (dict(schedule="exp"), "unknown schedule 'exp'"),
])
def test_bad_train_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kwargs)


def test_resume_needs_a_checkpoint(setup, tmp_path):
    base, examples, coll = setup
    with pytest.raises(ConfigError, match="cannot resume: no checkpoint in"):
        train(fresh(base), "t", examples, coll, lm_loss, TrainConfig(steps=2), checkpoint_dir=tmp_path / "none",
              resume=True)


def test_eval_every_keeps_the_best_tensors(setup):
    base, examples, coll = setup
    rt = fresh(base)
    scores = iter([0.2, 0.9, 0.5, 0.4])              # the best is the 2nd evaluation (after 4 steps)
    snapshots = []

    def evaluate():
        snapshots.append(next(iter(rt.adapters["t"].tensors.values()))["lora_B"].clone())
        return next(scores)

    res = train(rt, "t", examples, coll, lm_loss, TrainConfig(steps=8, batch_size=2, lr=1e-2, eval_every=2),
                evaluate=evaluate)
    assert res.evals == [(2, 0.2), (4, 0.9), (6, 0.5), (8, 0.4)] and res.best_step == 4
    final = next(iter(rt.adapters["t"].tensors.values()))["lora_B"]
    assert torch.equal(final, snapshots[1]) and not torch.equal(final, snapshots[3])


def test_the_best_tensors_survive_a_resume(setup, tmp_path):
    base, examples, coll = setup
    cfg = TrainConfig(steps=8, batch_size=2, lr=1e-2, eval_every=2, checkpoint_every=4)
    scores = {2: 0.2, 4: 0.9, 6: 0.5, 8: 0.4}           # the best is after step 4, before the interruption
    done, snaps = {}, {}

    def hooks(rt, stop_at=None):
        def on_step(record):
            done["n"] = record["step"] + 1
            if record["step"] == stop_at:
                raise KeyboardInterrupt

        def evaluate():
            snaps[done["n"]] = next(iter(rt.adapters["t"].tensors.values()))["lora_B"].clone()
            return scores[done["n"]]
        return {"on_step": on_step, "evaluate": evaluate}

    first = fresh(base)
    with pytest.raises(KeyboardInterrupt):
        train(first, "t", examples, coll, lm_loss, cfg, checkpoint_dir=tmp_path / "ck", **hooks(first, stop_at=5))
    best_before = snaps[4]
    second = fresh(base)
    res = train(second, "t", examples, coll, lm_loss, cfg, checkpoint_dir=tmp_path / "ck", resume=True,
                **hooks(second))
    assert res.evals == [(2, 0.2), (4, 0.9), (6, 0.5), (8, 0.4)] and res.best_step == 4
    assert torch.equal(next(iter(second.adapters["t"].tensors.values()))["lora_B"], best_before)


def test_resume_refuses_another_run(setup, tmp_path):
    base, examples, coll = setup
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-2)
    train(fresh(base), "t", examples, coll, lm_loss, cfg, checkpoint_dir=tmp_path / "ck", run_info={"r": 8})
    with pytest.raises(ConfigError, match=r"other settings \(lr, steps: 0.01 vs 0.02, 2 vs 3\)"):
        train(fresh(base), "t", examples, coll, lm_loss, replace(cfg, lr=2e-2, steps=3), checkpoint_dir=tmp_path / "ck",
              resume=True, run_info={"r": 8})
    with pytest.raises(ConfigError, match=r"belongs to another run \(different examples\)"):
        train(fresh(base), "t", examples[:3], coll, lm_loss, cfg, checkpoint_dir=tmp_path / "ck", resume=True,
              run_info={"r": 8})
    with pytest.raises(ConfigError, match=r"belongs to another run \(different r\)"):
        train(fresh(base), "t", examples, coll, lm_loss, cfg, checkpoint_dir=tmp_path / "ck", resume=True,
              run_info={"r": 4})


def test_a_full_disk_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    import errno

    from adapterkit.train import trainer as trainer_mod

    base, examples, coll = setup
    cfg = TrainConfig(steps=6, batch_size=2, lr=1e-2, checkpoint_every=2)
    real_write, calls = trainer_mod.write_tensors, []

    def write_tensors(path, tensors):
        calls.append(path)
        if len(calls) == 2:                                      # the checkpoint after step 4: disk full
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, tensors)
    monkeypatch.setattr(trainer_mod, "write_tensors", write_tensors)
    with pytest.raises(OSError, match="No space left on device"):
        train(fresh(base), "t", examples, coll, lm_loss, cfg, checkpoint_dir=tmp_path / "ck")
    saved = json.loads((tmp_path / "ck" / "trainer_state.json").read_text())
    assert saved["step"] == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["ck", "m"]   # no temp folders left
    monkeypatch.setattr(trainer_mod, "write_tensors", real_write)
    straight = train(fresh(base), "t", examples, coll, lm_loss, cfg)
    resumed = train(fresh(base), "t", examples, coll, lm_loss, cfg, checkpoint_dir=tmp_path / "ck", resume=True)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5, abs=1e-6)
