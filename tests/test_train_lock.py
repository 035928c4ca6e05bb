"""One training run per adapter name and store: a second trainer of the name fails at once, before any
work; the lock is an OS lock, freed when its holder dies (kill -9 included)."""

import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch.multiprocessing as mp
from test_train_cli import ROWS, files  # noqa: F401  (files: the fixture, a tiny base + labelled JSONL)
from typer.testing import CliRunner

from adapterkit.cli.main import app
from adapterkit.store import AdapterStore
from adapterkit.train.filelock import LockHeld, file_lock
from adapterkit.train.fit import RunInProgressError, lock_path, run_lock


HOLD = """import sys, time
from adapterkit.store import AdapterStore
from adapterkit.train.fit import run_lock
with run_lock(AdapterStore(sys.argv[1]), sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""

# A real `adapterkit train` that stalls after step 1 (its checkpoint at step 1 is written).
TRAIN_AND_STALL = """import sys, time
from adapterkit.cli.main import app
from adapterkit.train import progress
real = progress.TrainProgress.update
def update(self, record):
    real(self, record)
    if record["step"] == 1:
        print("stalled", flush=True)
        time.sleep(600)
progress.TrainProgress.update = update
app(sys.argv[1:], prog_name="adapterkit")
"""


def _args(base, data, store, name, *extra):
    return ["train", "--name", name, "--base", str(base), "--train-file", str(data), "--text-field", "sentence",
            "--label-field", "y", "--steps", "6", "--batch-size", "3", "--lr", "0.03", "--targets", "q_proj,v_proj",
            "--checkpoint-every", "1", "--store", str(store), "--no-progress", *extra]


def _start(code, *args, ready):
    """A child python running `code`; returns once it printed `ready`."""
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 1)[0]:
            line = proc.stdout.readline()
            if line.strip() == ready:
                return proc
            if not line:
                break
    proc.kill()
    pytest.fail(f"the helper process never printed {ready!r}: {proc.communicate()[1][-2000:]}")


def _kill9(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def _message(store, name, pid):
    root = AdapterStore(store).root
    return (f"another run is training {name!r} into the store at {root}: it holds the lock "
            f"{root / 'runs' / '.locks' / (name + '.lock')} (pid {pid} on {socket.gethostname()}); wait for it "
            "to end (the lock is freed when that process exits, however it ends) or choose another --name")


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_second_trainer_fails_at_once_and_a_killed_run_resumes(files, tmp_path, monkeypatch):
    base, data = files
    store = tmp_path / "store"
    first = _start(TRAIN_AND_STALL, *_args(base, data, store, "dup"), ready="stalled")
    try:
        run = store / "runs" / "dup"
        before = _snapshot(run)
        assert "checkpoint/trainer_state.json" in before and "train_log.jsonl" in before
        loaded = []
        monkeypatch.setattr("adapterkit.core.base.load_base", lambda *a, **k: loaded.append(a))
        runner = CliRunner()
        # fresh, --overwrite (would delete the live checkpoint) and --resume: all refused before any work
        for extra in ((), ("--overwrite",), ("--resume",)):
            t0 = time.monotonic()
            res = runner.invoke(app, _args(base, data, store, "dup", *extra))
            assert res.exit_code == 2, res.output
            assert res.output.strip() == "error: " + _message(store, "dup", first.pid)
            assert time.monotonic() - t0 < 10          # no training, no base load
        assert loaded == [] and _snapshot(run) == before and "dup" not in AdapterStore(store)
        monkeypatch.undo()
        # another name is not blocked
        res = runner.invoke(app, _args(base, data, store, "other", "--steps", "2"))
        assert res.exit_code == 0, res.output
    finally:
        _kill9(first)
    # the lock died with its holder; the checkpoint it left (step 1) is continued with --resume
    res = CliRunner().invoke(app, _args(base, data, store, "dup"))
    assert res.exit_code == 2 and "an interrupted run of 'dup' left a checkpoint at step 1" in res.output
    res = CliRunner().invoke(app, _args(base, data, store, "dup", "--resume"))
    assert res.exit_code == 0, res.output
    log = [json.loads(x) for x in (store / "runs" / "dup" / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == list(range(6))
    assert AdapterStore(store).show("dup")["lineage"][0]["params"]["steps"] == 6


def test_python_api_takes_the_lock(files, tmp_path):
    from adapterkit import load_base
    from adapterkit.data import Example
    from adapterkit.train.instruct import train_instructions
    from adapterkit.train.run import train_classifier
    from adapterkit.train.trainer import TrainConfig

    base_dir, _ = files
    store = tmp_path / "store"
    holder = _start(HOLD, store, "dup", ready="held")
    try:
        base = load_base(str(base_dir))
        st = AdapterStore(store)
        cfg = TrainConfig(steps=2, batch_size=3)
        examples = [Example(t, y) for t, y in ROWS]
        with pytest.raises(RunInProgressError) as err:
            train_classifier(base, "dup", examples, [], task=None, store=st, config=cfg, targets=["q_proj"],
                             progress=False)
        assert str(err.value) == _message(store, "dup", holder.pid)
        with pytest.raises(RunInProgressError):
            train_instructions(base, "dup", [{"prompt": "hello", "completion": "world"}], [], task=None, store=st,
                               config=cfg, targets=["q_proj"], progress=False)
        assert not (store / "runs" / "dup").exists() and "dup" not in st
        train_classifier(base, "free", examples, [], task=None, store=st, config=cfg, targets=["q_proj"],
                         progress=False)
        assert "free" in st
    finally:
        _kill9(holder)
    with run_lock(AdapterStore(store), "dup"):        # freed by the kill
        pass


def test_file_lock_is_reentrant_in_its_thread_only(tmp_path):
    path = tmp_path / "x.lock"
    seen = []

    def other_thread():
        try:
            with file_lock(path):
                seen.append("got it")
        except LockHeld as exc:
            seen.append(exc.holder)

    with file_lock(path):
        with file_lock(path):                         # the CLI, then the library function it calls
            pass
        assert path.read_text().startswith(f"pid {os.getpid()} on ")
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert seen == [f"another thread of this process (pid {os.getpid()})"]
        code = f"from adapterkit.train.filelock import file_lock\nwith file_lock({str(path)!r}): pass"
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert res.returncode == 1 and f"LockHeld: {path} is locked by pid {os.getpid()}" in res.stderr
    assert path.read_text() == ""                     # released: no stale holder left in the file
    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert seen[-1] == "got it"


def _rank(store, name, rank, world, rendezvous, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        with run_lock(AdapterStore(store), name):
            with run_lock(AdapterStore(store), name):     # the CLI and the train_* function it calls
                dist.barrier()
            got = "ran"
    except RunInProgressError as exc:
        got = str(exc)
    (out / f"{name}.{rank}").write_text(got)
    dist.destroy_process_group()


@pytest.mark.parametrize("held", [False, True])
def test_distributed_ranks_share_rank_0s_outcome(tmp_path, held):
    """Only rank 0 takes the lock (the others would find it taken); every rank learns the outcome, so a
    refused run stops on all ranks instead of leaving the others waiting in a collective."""
    store = tmp_path / "store"
    holder = _start(HOLD, store, "dup", ready="held") if held else None
    try:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_rank, args=(store, "dup", r, 2, tmp_path / "rdzv", tmp_path)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        got = [(tmp_path / f"dup.{r}").read_text() for r in range(2)]
        assert got == ([_message(store, "dup", holder.pid)] * 2 if held else ["ran", "ran"])
    finally:
        if holder is not None:
            _kill9(holder)
    with file_lock(lock_path(AdapterStore(store), "dup")):     # free again (a killed holder's pid may stay)
        pass
