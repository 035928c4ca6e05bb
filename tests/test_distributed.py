"""Two processes (gloo, as under torchrun) train to the same adapter as one process with the same
global batch: each rank takes half of every batch and only adapter gradients are all-reduced."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import save_tiny_tokenizer, tiny_bert

from adapterkit import AdapterRuntime, LoraConfig, create_adapter, load_base
from adapterkit.data import Example
from adapterkit.core.heads import ClassificationHead
from adapterkit.train.classification import collate_fn, loss_fn
from adapterkit.train.trainer import TrainConfig, finish_distributed, train

DATA = [Example(t, l) for t, l in [("the cat runs", "a"), ("a dog is on the mat", "b"), ("cat and cat", "a"),
                                   ("dog dog", "b"), ("the cat is fast", "a"), ("a slow dog runs", "b"),
                                   ("cat", "a"), ("dog and the mat", "b")]]
CFG = TrainConfig(steps=6, batch_size=4, lr=1e-2, seed=1)


def run(path, out_file, rank=0, world=1, rendezvous=None):
    torch.set_num_threads(1)
    if world > 1:   # a file rendezvous: no port to race for
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        base = load_base(str(path))
        head = ClassificationHead.create(["a", "b"], 32, "mean", seed=0)
        adapter = create_adapter("d", base.model, LoraConfig(r=4, target_modules=["query", "value"]), seed=0)
        rt = AdapterRuntime.from_base(base)
        rt.add(adapter)
        collate = collate_fn(base.tokenizer, head, 16)

        def sharded(examples):                        # each rank sees only its share of the batch
            assert len(examples) == CFG.batch_size // world, len(examples)
            return collate(examples)

        res = train(rt, "d", DATA, sharded, loss_fn(head), CFG, extra_params=[head.weight, head.bias])
        if rank == 0:
            tensors = {f"{s}.{k}": t for s, p in rt.adapters["d"].tensors.items() for k, t in p.items()}
            torch.save({"tensors": tensors, "head": head.weight, "losses": res.losses}, out_file)
        finish_distributed()
    except BaseException:
        import traceback

        (out_file.parent / f"rank{rank}.err").write_text(traceback.format_exc())
        if dist.is_initialized():
            dist.destroy_process_group()
        raise


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    path = tmp_path / "bert"
    # no dropout: the two runs draw different random streams
    model = tiny_bert(initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.save_pretrained(str(path))
    save_tiny_tokenizer(path)
    run(path, tmp_path / "single.pt")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=run, args=(path, tmp_path / "multi.pt", r, 2, tmp_path / "rdzv")) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    errors = "".join(f.read_text() for f in tmp_path.glob("rank*.err"))
    assert all(p.exitcode == 0 for p in procs), errors
    one = torch.load(tmp_path / "single.pt", weights_only=True)
    two = torch.load(tmp_path / "multi.pt", weights_only=True)
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-4)
    assert one["losses"][-1] < one["losses"][0]
    for k in one["tensors"]:
        torch.testing.assert_close(two["tensors"][k], one["tensors"][k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(two["head"], one["head"], rtol=1e-4, atol=1e-5)


def test_cli_under_torchrun(tmp_path):
    """The same `adapterkit train` entry point under torchrun with 2 processes (gloo)."""
    import json
    import subprocess
    import sys

    path = tmp_path / "bert"
    tiny_bert(initializer_range=0.2).save_pretrained(str(path))
    save_tiny_tokenizer(path)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": e.text, "label": e.label}) for e in DATA) + "\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "adapterkit.cli.main", "train", "--name", "ddp", "--base", str(path), "--train-file", str(data),
           "--steps", "3", "--batch-size", "4", "--targets", "query,value", "--store", str(tmp_path / "s"),
           "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("stored ddp") == 1               # rank 0 alone writes and reports
    from adapterkit.store import AdapterStore

    assert AdapterStore(tmp_path / "s").show("ddp")["lineage"][0]["params"]["steps"] == 3
