"""Serving an image base: POST /v1/classify with image parts (data URLs), each image scored by the named
classifier adapter's head exactly as the training code scores it; clear 400s for images that do not
decode, are too large, are not data URLs, text sent to an image base (and images to a text base),
generation asked of an image base; 404 for an unknown adapter. A random MobileNetV2 at 32x32, in-process."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import pytest
import torch
from safetensors.torch import save_file

from adapterkit import AdapterRuntime, LoraConfig, create_adapter, load_base
from adapterkit.core.heads import ClassificationHead
from adapterkit.serve.api import create_app
from adapterkit.serve.image_engine import ImageEngine
from adapterkit.store import AdapterStore
from adapterkit.train.classification import classifier_collate, predict_proba
from adapterkit.vision import images as images_mod
from adapterkit.vision.mobilenet import POINTWISE, ImageSpec, MobileNetConfig, MobileNetV2

PIL = pytest.importorskip("PIL.Image")
from test_image_tasks import tinted  # noqa: E402


def image_folder(path):
    """A random MobileNetV2 saved as an image base folder (32x32 preprocessing)."""
    torch.manual_seed(0)
    model = MobileNetV2(MobileNetConfig(num_classes=10, image=ImageSpec(resize=32, crop=32)))
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_in")
    path.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(model.config.to_dict()))
    return path


def data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def part(img) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(img)}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("images")
    base = load_base(str(image_folder(tmp / "base")))
    store = AdapterStore(tmp / "store")
    for i, name in enumerate(("tint-a", "tint-b")):
        a = create_adapter(name, base.model, LoraConfig(r=4, target_modules=POINTWISE, init="nonzero", init_std=0.1),
                           seed=i, fingerprint=base.fingerprint, base_name=base.name)
        a.head = ClassificationHead.create(["cool", "warm"], 1280, "mean", seed=i)
        with torch.no_grad():
            a.head.weight.mul_(20)
        store.put(a)
    store.put(create_adapter("no-head", base.model, LoraConfig(r=2, target_modules=POINTWISE, init="nonzero"),
                             fingerprint=base.fingerprint, base_name=base.name))
    engine = ImageEngine.build(str(tmp / "base"), store=store, max_batch=3)
    yield base, store, engine, create_app(engine)


def post(app, url, body):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return await c.post(url, json=body)
    return asyncio.run(go())


def reference(base, store, name, imgs):
    """The training code's probabilities: the runtime with the adapter, the head over pooled features."""
    rt = AdapterRuntime.from_base(base)
    a = store.get(name)
    rt.add(a)
    _, probs = predict_proba(rt, name, a.head, imgs, classifier_collate(rt, a.head, 0))
    rt.remove(name)
    return a.head.labels, probs


def test_classify_images_equals_the_training_forward(world):
    base, store, engine, app = world
    rows = tinted(5, 7)                                     # 5 images, max_batch 3: two chunks
    r = post(app, "/v1/classify", {"model": "tint-a", "input": [part(e.image) for e in rows]})
    assert r.status_code == 200, r.text
    body = r.json()
    labels, want = reference(base, store, "tint-a", rows)
    assert [d["index"] for d in body["data"]] == list(range(5)) and body["model"] == "tint-a"
    for d, p in zip(body["data"], want):
        assert d["labels"] == labels
        torch.testing.assert_close(torch.tensor(d["probs"]), p, atol=1e-5, rtol=1e-4)
    other = post(app, "/v1/classify", {"model": "tint-b", "input": [part(e.image) for e in rows]}).json()
    assert [d["probs"] for d in other["data"]] != [d["probs"] for d in body["data"]]     # its own adapter


@pytest.mark.parametrize("item, status, message", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}, 400,
     r"input: not a decodable image \(UnidentifiedImageError"),
    ({"type": "image_url", "image_url": {"url": "/etc/passwd"}}, 400,
     r"input: image_url must be a data URL \(data:image/png;base64,...\); the server fetches no URL and reads no local file"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}, 400,
     r"the data URL's base64 payload is malformed"),
    ("a text", 400, r"input is text but the base '.*' is an image model; send image parts"),
    ({"type": "image", "image": "x"}, 400, r"input must be a string or a non-empty list of strings \(or, on an image base"),
])
def test_bad_inputs_are_400s_naming_the_input(world, item, status, message):
    import re

    _, _, _, app = world
    r = post(app, "/v1/classify", {"model": "tint-a", "input": [item]})
    assert r.status_code == status, r.text
    assert re.search(message, r.json()["error"]["message"]), r.json()


def test_an_image_over_the_pixel_limit_is_a_400(world, monkeypatch):
    _, _, _, app = world
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 100)
    r = post(app, "/v1/classify", {"model": "tint-a", "input": [part(tinted(1, 0)[0].image)]})
    assert r.status_code == 400 and "32x32 pixels is over the 100-pixel limit" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "input"


def test_model_errors(world):
    _, _, engine, app = world
    img = part(tinted(1, 0)[0].image)
    r = post(app, "/v1/classify", {"model": "nope", "input": [img]})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = post(app, "/v1/classify", {"model": engine.base_name, "input": [img]})
    assert r.status_code == 400 and "has no classification head" in r.json()["error"]["message"]
    r = post(app, "/v1/classify", {"model": "no-head", "input": [img]})
    assert r.status_code == 400 and "has no classification head" in r.json()["error"]["message"]
    r = post(app, "/v1/chat/completions", {"model": "tint-a", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "is an image model: it classifies images" in r.json()["error"]["message"]
    r = post(app, "/v1/completions", {"model": "tint-a", "prompt": "hi"})
    assert r.status_code == 400 and "generates no text" in r.json()["error"]["message"]
    assert post(app, "/v1/classify", {"model": "tint-a", "input": [img]}).status_code == 200    # still serving
