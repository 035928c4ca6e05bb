"""Classification adapters: an adapter + head learn a toy task on an encoder and a decoder; the
head is saved with the adapter and reloads to the same predictions."""

import pytest
import torch
from conftest import save_tiny_tokenizer, tiny_bert, tiny_llama

from adapterkit import Adapter, AdapterRuntime, ConfigError, LoraConfig, create_adapter, load_base
from adapterkit.data import Example
from adapterkit.core.heads import ClassificationHead
from adapterkit.train.classification import collate_fn, loss_fn, predict
from adapterkit.train.trainer import TrainConfig, train

TRAIN = [Example(t, l) for t, l in [
    ("the cat runs fast", "feline"), ("a cat is on the mat", "feline"), ("cat and cat", "feline"),
    ("the dog runs slow", "canine"), ("a dog is on the mat", "canine"), ("dog and dog", "canine"),
]]
KINDS = {"bert": (tiny_bert, ["query", "value"], "mean"), "llama": (tiny_llama, ["q_proj", "v_proj"], "last")}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_adapter_and_head_learn_and_reload(kind, tmp_path):
    build, targets, pooling = KINDS[kind]
    path = tmp_path / kind
    build(initializer_range=0.2).save_pretrained(str(path))      # wider init: see test_trainer
    save_tiny_tokenizer(path)
    base = load_base(str(path))
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    hidden = base.model.config.hidden_size
    head = ClassificationHead.create(["feline", "canine"], hidden, pooling, seed=0)
    adapter = create_adapter("cls", base.model, LoraConfig(r=4, alpha=8, target_modules=targets), seed=0,
                             fingerprint=base.fingerprint)
    adapter.head = head
    rt = AdapterRuntime.from_base(base)
    rt.add(adapter)
    collate = collate_fn(base.tokenizer, head, max_length=16)
    res = train(rt, "cls", TRAIN, collate, loss_fn(head), TrainConfig(steps=40, batch_size=6, lr=3e-2),
                extra_params=[head.weight, head.bias])
    assert res.losses[-1] < 0.2 * res.losses[0]
    assert predict(rt, "cls", head, TRAIN, collate) == [e.label for e in TRAIN]
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())
    assert not head.weight.requires_grad

    rt.adapters["cls"].save(tmp_path / "saved")
    loaded = Adapter.load(tmp_path / "saved")
    assert loaded.head.labels == ["feline", "canine"] and loaded.head.pooling == pooling
    assert torch.equal(loaded.head.weight, head.weight)
    rt2 = AdapterRuntime.from_base(load_base(str(path)))
    rt2.add(loaded)
    assert predict(rt2, "cls", loaded.head, TRAIN, collate) == [e.label for e in TRAIN]


def test_head_errors():
    head = ClassificationHead.create(["a", "b"], 8, "mean")
    with pytest.raises(ConfigError, match=r"label\(s\) \['c'\] are not in the task's labels \['a', 'b'\]"):
        head.label_ids(["a", "c"])
    with pytest.raises(ConfigError, match="unknown pooling 'max'"):
        ClassificationHead.create(["a", "b"], 8, "max")
    with pytest.raises(ConfigError, match=">= 2 distinct labels"):
        ClassificationHead.create(["a", "a"], 8, "mean")


def test_pooling():
    head = ClassificationHead(["a", "b"], "last", torch.eye(2), torch.zeros(2))
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    assert head.logits(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[0.0, 1.0]]     # last real token
    head.pooling = "mean"
    assert head.logits(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[0.5, 0.5]]     # padding ignored
