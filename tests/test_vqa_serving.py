"""Serving vision-language adapters: a chat with an image part, through the engine, gives exactly the tokens the
training code's generation gives (image tokens in place, the adapter on); two VL adapters and a text adapter
in one batch each answer as alone; clear 400s for images sent to a text-only adapter, the bare base or a router,
undecodable or oversized images, too many images; 404 for an unknown adapter. Tiny random Llama + MobileNetV2
(64x64: a 2x2 feature map, 4 image tokens), in-process."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import httpx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import save_tiny_tokenizer, tiny_llama  # noqa: E402
from test_api_images import image_folder as _image_folder, part  # noqa: E402
from test_image_tasks import tinted  # noqa: E402

from adapterkit import AdapterRuntime, LoraConfig, create_adapter, load_base  # noqa: E402
from adapterkit.data.vqa_tasks import VQAExample  # noqa: E402
from adapterkit.serve.api import create_app  # noqa: E402
from adapterkit.serve.engine import Engine  # noqa: E402
from adapterkit.serve.requests import GenerationRequest, ImageInput, SamplingParams  # noqa: E402
from adapterkit.serve.vl import ImageReader  # noqa: E402
from adapterkit.store import AdapterStore  # noqa: E402
from adapterkit.train.trainer import TrainConfig  # noqa: E402
from adapterkit.train.vqa import image_embeds, train_vqa  # noqa: E402
from adapterkit.vision import images as images_mod  # noqa: E402
from adapterkit.vision.vl_prompt import encode_images, render_chat, vqa_messages  # noqa: E402

PIL = pytest.importorskip("PIL.Image")


def image_folder(path: Path) -> Path:
    """A random MobileNetV2 image base folder at 64x64: a 2x2 feature map."""
    return _image_folder(path, 64)


def images(n: int, seed: int) -> list:
    return [e.image.resize((64, 64)) for e in tinted(n, seed)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vl")
    lm_path = tmp / "lm"
    tiny_llama(initializer_range=0.3).save_pretrained(str(lm_path))
    save_tiny_tokenizer(lm_path)
    lm, image_base = load_base(str(lm_path)), load_base(str(image_folder(tmp / "image-base")))
    store = AdapterStore(tmp / "store")
    rows = [VQAExample(im, "the cat", "hello" if i % 2 else "world", "colour", f"{i}")
            for i, im in enumerate(images(16, 0))]
    for seed, name in enumerate(("vl-a", "vl-b")):
        train_vqa(lm, name, rows, [], image_base=image_base, task=None, store=store, progress=False,
                  config=TrainConfig(steps=3, batch_size=8, lr=1e-2, head_lr=1e-2, seed=seed))
    train_vqa(lm, "vl-img", rows, [], image_base=image_base, task=None, store=store, progress=False, image_adapter=True,
              image_r=2, config=TrainConfig(steps=3, batch_size=8, lr=1e-2, head_lr=1e-2, seed=2))
    store.put(create_adapter("text-only", lm.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                               init="nonzero", init_std=0.1),
                             fingerprint=lm.fingerprint, base_name=lm.name))
    engine = Engine.build(lm, store=store)            # stepped by the tests themselves (run())
    served = Engine.build(load_base(str(lm_path)), store=store).start()    # behind the API, its own loop
    yield lm, store, engine, create_app(served), served
    served.stop()


def request(lm, store, name: str, img, question: str, max_tokens: int = 4) -> GenerationRequest:
    """The request the chat service makes: the prompt rendered as training renders it, the image's features."""
    projector = store.get(name).head
    text, _ = render_chat(lm.tokenizer, vqa_messages(question), True)
    prompt = encode_images(lm.tokenizer, text, projector.n_tokens, lm.tokenizer.pad_token_id)
    feats, fp = ImageReader().read(projector, [img])
    return GenerationRequest(prompt.ids, name, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                             images=ImageInput(tuple(prompt.slots), feats, fp))


def reference(lm, store, req: GenerationRequest) -> list[int]:
    """The training code's greedy tokens: HF generate over the prompt's embeddings with the image tokens in place."""
    adapter = store.get(req.adapter)
    rt = AdapterRuntime.from_base(load_base(str(lm.path)))       # its own copy: the engine's runtime wraps lm
    rt.add(adapter)
    ids = torch.tensor([req.prompt_ids])
    feats = req.images.features.reshape(1, adapter.head.n_tokens, -1)
    rt.activate(adapter.name)
    out: list[int] = []
    try:
        with torch.no_grad():                     # greedy, EOS kept like any token (the request ignores EOS)
            embeds = image_embeds(rt.model, adapter.head, ids, feats, torch.tensor([req.images.slots]))
            for _ in range(req.params.max_tokens):
                out.append(int(rt.model(inputs_embeds=embeds).logits[0, -1].argmax()))
                embeds = torch.cat([embeds, rt.model.get_input_embeddings()(torch.tensor([[out[-1]]]))], 1)
    finally:
        rt.deactivate()
    return out


def run(engine: Engine, reqs: list[GenerationRequest]) -> list[list[int]]:
    """Submit every request before the engine steps, so they share its batches."""
    streams = [engine.submit(r) for r in reqs]
    while any(s.final is None for s in streams):
        engine.step()
    return [list(s.token_ids) for s in streams]


def test_the_engine_answers_an_image_question_as_the_training_code_does(world):
    lm, store, engine, _, _ = world
    img = images(1, 5)[0]
    req = request(lm, store, "vl-a", img, "the cat")
    got = run(engine, [req])[0]
    assert got == reference(lm, store, req) and len(got) == 4
    # the image matters: another image, or the other adapter, changes the logits path (not vacuous)
    other = request(lm, store, "vl-b", img, "the cat")
    assert reference(lm, store, other) != got or reference(lm, store, request(lm, store, "vl-a", images(1, 9)[0],
                                                                              "the cat")) != got


def test_two_vl_adapters_and_a_text_adapter_in_one_batch_answer_as_alone(world):
    lm, store, engine, _, _ = world
    a, b = images(2, 7)
    reqs = [request(lm, store, "vl-a", a, "the cat"), request(lm, store, "vl-b", b, "hello world"),
            GenerationRequest(lm.tokenizer("the dog runs", add_special_tokens=False)["input_ids"], "text-only",
                              SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))]
    together = run(engine, reqs)
    alone = [run(engine, [r])[0] for r in reqs]
    assert together == alone
    assert together[0] == reference(lm, store, reqs[0]) and together[1] == reference(lm, store, reqs[1])


def test_a_vl_adapter_with_an_image_adapter_is_served_through_it(world):
    from adapterkit.train.vqa import ImageSide, feature_table, image_key

    lm, store, engine, app, _ = world
    img = images(1, 4)[0]
    req = request(lm, store, "vl-img", img, "the cat")
    adapter = store.get("vl-img")
    image_base = load_base(adapter.head.image_base)                  # its own copy, bare
    bare = feature_table(image_base, [img], 2)[image_key(img)]
    side = ImageSide(image_base, adapter.head.image_adapter, 2)
    side.freeze()
    through = feature_table(image_base, [img], 2, side=side)[image_key(img)]
    side.close()
    assert torch.allclose(req.images.features, through, atol=1e-6) and not torch.allclose(through, bare, atol=1e-4)
    assert req.images.image_fingerprint == adapter.head.feature_source() != adapter.head.image_fingerprint
    assert run(engine, [req])[0] == reference(lm, store, req)
    r = chat(app, "vl-img", [part(img), {"type": "text", "text": "the cat"}], ignore_eos=True)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == lm.tokenizer.decode(
        run(engine, [request(lm, store, "vl-img", img, "the cat", max_tokens=3)])[0], skip_special_tokens=True)


def chat(app, model: str, content, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 3, "temperature": 0,
            **extra}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return await c.post("/v1/chat/completions", json=body)
    return asyncio.run(go())


def test_the_chat_api_takes_image_parts_for_a_vl_adapter(world):
    lm, store, engine, app, _ = world
    img = images(1, 3)[0]
    r = chat(app, "vl-a", [part(img), {"type": "text", "text": "the cat"}], ignore_eos=True)
    assert r.status_code == 200, r.text
    want = run(engine, [request(lm, store, "vl-a", img, "the cat", max_tokens=3)])[0]
    assert r.json()["choices"][0]["message"]["content"] == lm.tokenizer.decode(want, skip_special_tokens=True)
    assert r.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("model, content, status, message", [
    ("text-only", "IMG", 400, "adapter 'text-only' is text-only (it has no image projector)"),
    ("BASE", "IMG", 400, "is text-only: send images to a vision-language adapter"),
    ("auto", "IMG", 400, "'auto' is a router: routers choose adapters from text"),
    ("no-such", "IMG", 404, "no-such"),
    ("vl-a", "BAD", 400, "image 0: not a decodable image"),
    ("vl-a", "NINE", 400, "at most 8 images per request, got 9"),
    ("vl-a", "MARK", 400, "U+E000, which stands for an image"),
])
def test_bad_image_requests_get_clear_errors(world, model, content, status, message):
    lm, _, _, app, _ = world
    img = part(images(1, 0)[0])
    bad = {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8gd29ybGQ="}}
    parts = {"IMG": [img, {"type": "text", "text": "the cat"}], "BAD": [bad], "NINE": [img] * 9,
             "MARK": [img, {"type": "text", "text": "a \ue000 b"}]}[content]
    r = chat(app, lm.name if model == "BASE" else model, parts)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    if status == 400:
        assert r.json()["error"]["param"] in ("messages", "model", "messages[0].content")


def test_an_adapter_whose_image_base_is_not_here_gets_a_clear_400(world):
    import copy

    lm, store, _, app, _ = world
    lost = copy.deepcopy(store.get("vl-a"))
    lost.name, lost.head.image_base = "vl-lost", str(Path(lm.path).parent / "no-such-image-base")
    store.put(lost)
    r = chat(app, "vl-lost", [part(images(1, 0)[0])])
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert "adapter 'vl-lost': its image base" in r.json()["error"]["message"]
    assert "cannot be used here" in r.json()["error"]["message"]


def test_an_oversized_image_is_refused_before_decoding(world, monkeypatch):
    _, _, _, app, _ = world
    monkeypatch.setattr(images_mod, "MAX_BYTES", 100)
    r = chat(app, "vl-a", [part(images(1, 0)[0])])
    assert r.status_code == 400 and "over the 100-byte limit" in r.json()["error"]["message"]


@pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None, reason="easy-vqa not installed")
def test_cli_trains_and_scores_a_vl_adapter_on_an_easy_vqa_task(world, tmp_path):
    from typer.testing import CliRunner

    from adapterkit.cli.main import app

    lm, _, _, _, _ = world
    image_dir = image_folder(tmp_path / "image-base")
    store = str(tmp_path / "store")
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--base", str(lm.path), "--task", "easy-vqa-shape", "--name", "shapes",
                              "--image-base", str(image_dir), "--train-rows", "16", "--steps", "2", "--eval-every",
                              "0", "--store", store, "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "defaults for vqa on 16 examples" in res.output and "validation: accuracy=" in res.output
    shown = json.loads(runner.invoke(app, ["show", "shapes", "--json", "--store", store]).output)
    params = shown["lineage"][0]["params"]
    assert params["objective"] == "vqa" and params["image_tokens"] == 4 and params["lr"] == 1e-3
    assert params["head_lr"] == 1e-2                                      # the projector, from scratch
    res = runner.invoke(app, ["eval", "shapes", "--task", "easy-vqa-shape", "--json", "--store", store,
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["n"] == 1257 and set(got) >= {"accuracy", "accuracy_shape"}
    res = runner.invoke(app, ["train", "--base", str(lm.path), "--task", "rt-sentiment", "--name", "x", "--grid", "3",
                              "--store", store])
    assert res.exit_code != 0 and "--image-base, --grid, --projector-only, --image-adapter and --projector-from set a vision-language" in res.output
