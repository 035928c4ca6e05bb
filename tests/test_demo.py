"""The main job (`adapterkit demo`): trains or reuses one adapter per example task, scores all tasks in
mixed batches, and each row's label equals running its adapter alone."""

import pytest
import torch
from conftest import save_tiny_tokenizer, tiny_llama
from rich.console import Console

from adapterkit import AdapterRuntime, LoraConfig, create_adapter, load_base
from adapterkit import demo as demo_mod
from adapterkit.data import Example
from adapterkit.demo import DemoSettings, classify_mixed, run_demo
from adapterkit.core.heads import ClassificationHead
from adapterkit.store import AdapterStore
from adapterkit.train.classification import collate_fn, predict


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "base"
    tiny_llama(initializer_range=0.2).save_pretrained(str(path))
    save_tiny_tokenizer(path)
    return path


def test_mixed_classification_equals_each_adapter_alone(tiny):
    base = load_base(str(tiny))
    rt = AdapterRuntime.from_base(base)
    labels = {"a": ["x", "y"], "b": ["p", "q", "r"]}
    for seed, name in enumerate(labels):
        adapter = create_adapter(name, base.model, LoraConfig(r=4, init="nonzero", init_std=0.5), seed=seed)
        adapter.head = ClassificationHead.create(labels[name], 32, "last", seed=seed)
        rt.add(adapter)
    texts = ["the cat runs fast", "a dog is on the mat", "give me one tip", "write clear code", "the dog",
             "hello world and the cat", "one tip", "slow"]
    items = [("a" if i % 3 else "b", t) for i, t in enumerate(texts)]
    mixed = classify_mixed(rt, items, max_length=16, batch_size=3)
    for name in labels:
        head = rt.adapters[name].head
        rows = [Example(t, head.labels[0]) for n, t in items if n == name]
        alone = predict(rt, name, head, rows, collate_fn(base.tokenizer, head, 16))
        assert alone == [p for (n, _), p in zip(items, mixed) if n == name]
    # the routing matters: hidden states under the other adapter give other logits
    batch = collate_fn(base.tokenizer, rt.adapters["a"].head, 16)([Example(texts[0], "x")])
    with torch.no_grad(), rt.batch(["a"]):
        ha = base.model.base_model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
    with torch.no_grad(), rt.batch(["b"]):
        hb = base.model.base_model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
    assert (ha - hb).abs().max() > 1e-2


def test_demo_trains_then_reuses(tiny, tmp_path, monkeypatch):
    store = AdapterStore(tmp_path / "store")
    settings = DemoSettings(steps=3, batch_size=4, n_test=6, n_check=3, max_length=16)
    console = Console(record=True, width=80)            # a default terminal: nothing may be cut
    tasks = ("rt-sentiment", "election-tweets")
    first = run_demo(str(tiny), console, tasks=tasks, settings=settings, store=store, progress=False)
    assert [r["task"] for r in first] == list(tasks) and all(r["how"].startswith("trained") for r in first)
    assert all(r["mixed_equals_alone"] for r in first) and [r["n_test"] for r in first] == [6, 6]
    assert sorted(x["name"] for x in store.list()) == ["demo-election-tweets", "demo-rt-sentiment"]
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    for r in first:       # each row: the whole name, then its numbers as computed
        cells = next([c.strip() for c in line.split("│")][1:-1] for line in text.splitlines()
                     if f"│ {r['task']} " in line)
        gain = 100 * (r["adapter_accuracy"] - r["base_accuracy"])
        assert cells[:6] == [r["task"], "2", "6", f"{r['base_accuracy']:.3f}", f"{r['adapter_accuracy']:.3f}",
                             f"{gain:+.1f}"] and cells[6] == "trained" and cells[7] == "yes"

    def no_training(*args, **kwargs):
        raise AssertionError("the stored adapters should have been reused")
    monkeypatch.setattr(demo_mod, "train_classifier", no_training)
    again = run_demo(str(tiny), Console(record=True), tasks=tasks, settings=settings, store=store, progress=False)
    assert [r["how"] for r in again] == ["reused"] * 2
    assert [r["adapter_accuracy"] for r in again] == [r["adapter_accuracy"] for r in first]
    assert [r["base_accuracy"] for r in again] == [r["base_accuracy"] for r in first]
    # other settings: the stored adapters do not fit, so they are trained again
    with pytest.raises(AssertionError, match="should have been reused"):
        run_demo(str(tiny), Console(record=True), tasks=tasks, settings=DemoSettings(steps=4, batch_size=4, n_test=6,
                                                                                       max_length=16),
                 store=store, progress=False)
