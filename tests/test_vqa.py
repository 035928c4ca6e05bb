"""Vision-language adapters: the easy-vqa tasks, prompts with image slots, the image projector as a saved
head, and training end to end on a tiny random Llama + MobileNetV2 (the answer is only in the image)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import save_tiny_tokenizer, tiny_llama  # noqa: E402
from test_image_tasks import tiny_image_base, tinted  # noqa: E402

from adapterkit import AdapterRuntime, load_base  # noqa: E402
from adapterkit.core.heads import load_head  # noqa: E402
from adapterkit.data.vqa_tasks import VQAExample, question_type  # noqa: E402
from adapterkit.errors import BaseMismatchError, ConfigError  # noqa: E402
from adapterkit.store import AdapterStore  # noqa: E402
from adapterkit.train.trainer import TrainConfig  # noqa: E402
from adapterkit.train.vqa import answer, evaluate_vqa, feature_table, image_key, train_vqa  # noqa: E402
from adapterkit.vision.projector import ImageProjector  # noqa: E402
from adapterkit.vision.vl_prompt import IMAGE_MARK, content_text, encode_images, encode_vqa  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None, reason="easy-vqa not installed")
def test_easy_vqa_tasks_split_by_image_and_type_questions_by_their_words():
    from adapterkit.data.tasks import list_tasks, load_task

    task = load_task("easy-vqa")
    assert task.card["sizes"] == {"train": 34645, "validation": 3930, "test": 9673}
    assert task.card["images"] == {"train": 3600, "validation": 400, "test": 1000}
    train_images = {e.image for e in task.train}
    assert not train_images & {e.image for e in task.validation}           # an image stays in one split
    assert len(task.labels) == 13 and {"yes", "no", "circle", "teal"} <= set(task.labels)
    colour = load_task("easy-vqa-colour")
    assert {e.qtype for e in colour.test} == {"colour"} and len(colour.test) == 1280
    assert all(e.answer not in ("yes", "no", "circle", "rectangle", "triangle") for e in colour.train)
    assert {"easy-vqa", "easy-vqa-colour", "easy-vqa-shape", "easy-vqa-yesno"} <= set(list_tasks())


def test_question_type_reads_the_words_not_the_answer():
    assert question_type("what is the color of the circle?") == "colour"
    assert question_type("what color is the shape?") == "colour"
    assert question_type("what is the blue shape?") == "shape"
    assert question_type("does the image not contain a gray shape?") == "yesno"


@pytest.fixture
def lm(tmp_path):
    path = tmp_path / "lm"
    tiny_llama(initializer_range=0.3).save_pretrained(str(path))
    save_tiny_tokenizer(path)
    return load_base(str(path))


def test_prompts_put_n_placeholders_where_each_image_is(lm):
    tok = lm.tokenizer
    text, images = content_text([{"type": "text", "text": "hello"}, {"type": "image"}, {"type": "text", "text": "cat"}])
    assert (text, images) == (f"hello{IMAGE_MARK}cat", 1)
    p = encode_images(tok, f"the {IMAGE_MARK} cat {IMAGE_MARK}", 3, 0)
    the, cat = tok("the cat", add_special_tokens=False)["input_ids"]
    assert p.ids == [the, 0, 0, 0, cat, 0, 0, 0] and p.slots == [1, 2, 3, 5, 6, 7]
    prompt, ans = encode_vqa(tok, "the cat", "hello", 2, 0)
    assert ans == tok("hello", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(prompt.slots) == 2 and all(prompt.ids[s] == 0 for s in prompt.slots)
    with pytest.raises(ConfigError, match="U\\+E000, which stands for an image"):
        content_text(f"a {IMAGE_MARK} smuggled image")
    with pytest.raises(ConfigError, match="unknown content part"):
        content_text([{"type": "audio"}])


def test_projector_saves_loads_and_refuses_other_features(tmp_path):
    p = ImageProjector.create("mobilenet-v2", "sha256:abc", 2, 12, 8, 0.05, seed=1)
    feats = torch.randn(3, 4, 12)
    out = p.tokens(feats)
    assert out.shape == (3, 4, 8)
    p.save(tmp_path)
    again = load_head(tmp_path)
    assert isinstance(again, ImageProjector) and again.grid == 2 and again.image_base == "mobilenet-v2"
    assert torch.equal(again.tokens(feats), out)
    with pytest.raises(BaseMismatchError, match="reads 4 x 12 features of mobilenet-v2; got \\(1, 12\\)"):
        p.tokens(torch.randn(3, 1, 12))
    with pytest.raises(BaseMismatchError, match="trained on the image base mobilenet-v2"):
        p.check_image_base("other", "sha256:def")


def _rows(n: int, seed: int) -> list[VQAExample]:
    """The answer is the image's tint (warm -> hello, cool -> world); the question is always the same."""
    return [VQAExample(e.image, "the cat", "hello" if e.label == "warm" else "world", "colour", e.id)
            for e in tinted(n, seed)]


def test_a_vl_adapter_learns_what_only_the_image_tells_and_reloads(lm, tmp_path):
    image_base = tiny_image_base()
    store = AdapterStore(tmp_path / "store")
    train, val = _rows(96, 0), _rows(40, 1)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    cfg = TrainConfig(steps=150, batch_size=16, lr=3e-3, head_lr=1e-2)
    adapter, metrics = train_vqa(lm, "tint", train, val, image_base=image_base, task=None, store=store, config=cfg,
                                 targets=ALL, grid=1, progress=False)
    assert metrics["accuracy"] >= 0.85 and metrics["n"] == 40, metrics          # blind: 0.5
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())    # the LM is frozen
    params = adapter.meta.lineage[0]["params"]
    assert params["objective"] == "vqa" and params["image_tokens"] == 1
    assert params["projector_params"] == adapter.head.num_parameters() == 1280 * 32 + 32 + 32 * 32 + 32
    reloaded = store.get("tint")
    assert isinstance(reloaded.head, ImageProjector) and reloaded.head.image_fingerprint == "sha256:tinyimage"
    rt = AdapterRuntime.from_base(lm)
    rt.add(reloaded)
    features = feature_table(image_base, [e.image for e in val], 1)
    assert evaluate_vqa(rt, reloaded, val, features) == metrics
    # the answer of one row does not depend on what else is in the batch (left padding, one adapter)
    one = answer(rt, "tint", reloaded.head, features[image_key(val[0].image)][None], ["the cat"])
    many = answer(rt, "tint", reloaded.head, torch.stack([features[image_key(e.image)] for e in val[:5]]),
                  ["the cat", "hello world the cat", "the", "cat", "a"])
    assert one[0] == many[0]


def test_projector_only_training_leaves_the_language_model_bare(lm, tmp_path):
    store = AdapterStore(tmp_path / "store")
    cfg = TrainConfig(steps=5, batch_size=8, lr=3e-3, head_lr=1e-2)
    adapter, _ = train_vqa(lm, "proj", _rows(16, 0), [], image_base=tiny_image_base(), task=None, store=store, config=cfg,
                           grid=1, freeze_lm=True, progress=False)
    assert all(float(p["lora_B"].abs().max()) == 0 for p in adapter.tensors.values())
    assert adapter.meta.lineage[0]["params"]["freeze_lm"] is True
    emb_std = float(lm.model.get_input_embeddings().weight.float().std())
    fresh = ImageProjector.create("tiny-mobilenet", "sha256:tinyimage", 1, 1280, 32, emb_std, seed=0)
    assert not torch.equal(adapter.head.w2, fresh.w2)                  # the projector trained from its seeded init


def test_a_task_adapter_starts_from_an_aligned_projector_and_records_it(lm, tmp_path):
    store = AdapterStore(tmp_path / "store")
    image_base = tiny_image_base()
    aligned, _ = train_vqa(lm, "align", _rows(16, 0), [], image_base=image_base, task=None, store=store, grid=1,
                           config=TrainConfig(steps=3, batch_size=8, lr=3e-3, head_lr=1e-2), freeze_lm=True,
                           progress=False)
    kept = store.get("align")
    # a projector lr of 1e-6: two Adam steps (the second at lr 0: the schedule's end) move each weight by at most
    # about 1e-6, so it ends where it started
    task, _ = train_vqa(lm, "task", _rows(16, 1), [], image_base=image_base, task=None, store=store, grid=1,
                        config=TrainConfig(steps=2, batch_size=8, lr=3e-3, head_lr=1e-6), progress=False,
                        projector_from=kept)
    for f in ImageProjector.FIELDS:
        assert torch.allclose(getattr(task.head, f), getattr(kept.head, f), rtol=0, atol=2e-6), f
    assert any(not torch.equal(getattr(task.head, f), getattr(kept.head, f)) for f in ImageProjector.FIELDS)
    again = store.get("align")                                   # the source is copied, never trained in place
    assert all(torch.equal(getattr(again.head, f), getattr(kept.head, f)) for f in ImageProjector.FIELDS)
    assert task.meta.lineage[0]["params"]["projector_from"] == {"name": "align", "projector": kept.head.content()}
    fresh, _ = train_vqa(lm, "fresh", _rows(16, 1), [], image_base=image_base, task=None, store=store, grid=1,
                         config=TrainConfig(steps=1, batch_size=8, lr=3e-3, head_lr=1e-6), progress=False)
    assert fresh.meta.lineage[0]["params"]["projector_from"] is None
    assert not torch.allclose(fresh.head.w2, kept.head.w2, atol=1e-3)


def test_starting_from_a_projector_refuses_what_does_not_fit(lm, tmp_path):
    store = AdapterStore(tmp_path / "store")
    image_base = tiny_image_base()
    cfg = TrainConfig(steps=1, batch_size=8)
    aligned, _ = train_vqa(lm, "align", _rows(8, 0), [], image_base=image_base, task=None, store=store, grid=1,
                           config=cfg, freeze_lm=True, progress=False)
    head = aligned.head                  # (the tiny image base's feature map is 1 x 1: grid 2 is checked here)
    with pytest.raises(ConfigError, match="pools the feature map to grid 1; this run asks for grid 2: pass --grid 1"):
        head.start_copy("sha256:tinyimage", 2, head.feature_dim, head.width)
    with pytest.raises(BaseMismatchError, match="maps 1280 features to width 32; this run needs 1280 -> 64"):
        head.start_copy("sha256:tinyimage", 1, head.feature_dim, 64)
    other = tiny_image_base()
    other.fingerprint = "sha256:otherimage"
    with pytest.raises(BaseMismatchError, match="reads the image base tiny-mobilenet \\(sha256:tinyimage\\); this "
                                                "run's image base is sha256:otherimage"):
        train_vqa(lm, "x", _rows(8, 0), [], image_base=other, task=None, store=store, grid=1, config=cfg,
                  progress=False, projector_from=aligned)
    with pytest.raises(ConfigError, match="--projector-from and --image-adapter do not combine"):
        train_vqa(lm, "x", _rows(8, 0), [], image_base=image_base, task=None, store=store, grid=1, config=cfg,
                  progress=False, projector_from=aligned, image_adapter=True)
    text_only = store.get("align")
    text_only.head = None
    with pytest.raises(ConfigError, match="adapter 'align' has no image projector"):
        train_vqa(lm, "x", _rows(8, 0), [], image_base=image_base, task=None, store=store, grid=1, config=cfg,
                  progress=False, projector_from=text_only)
    assert "x" not in store


def test_vl_training_refuses_the_wrong_bases_and_data(lm, tmp_path):
    store = AdapterStore(tmp_path / "store")
    cfg = TrainConfig(steps=1)
    with pytest.raises(ConfigError, match="--image-base must be an image model"):
        train_vqa(lm, "x", _rows(4, 0), [], image_base=lm, task=None, store=store, config=cfg, progress=False)
    with pytest.raises(ConfigError, match="needs a causal language model"):
        train_vqa(tiny_image_base(), "x", _rows(4, 0), [], image_base=tiny_image_base(), task=None, store=store, config=cfg,
                  progress=False)
    with pytest.raises(ConfigError, match="trains on visual question answering rows"):
        train_vqa(lm, "x", tinted(4, 0), [], image_base=tiny_image_base(), task=None, store=store, config=cfg, progress=False)
    assert store.list() == []                                  # refused before anything was stored


@pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None, reason="easy-vqa not installed")
def test_data_show_and_export_give_the_question_and_answer():
    import json

    from typer.testing import CliRunner

    from adapterkit.cli.main import app

    runner = CliRunner()
    shown = runner.invoke(app, ["data", "show", "easy-vqa-colour"])
    assert shown.exit_code == 0 and "what is the color of the rectangle?" in shown.output
    res = runner.invoke(app, ["data", "export", "easy-vqa-shape", "--split", "test", "--n", "2"])
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert len(rows) == 2 and all(set(r) == {"image", "adapter", "question", "answer", "type"} for r in rows)
    assert all(r["type"] == "shape" and r["answer"] in ("circle", "rectangle", "triangle") for r in rows)


def test_an_adapter_on_the_image_base_trains_with_it_and_is_saved_inside(lm, tmp_path):
    from adapterkit.train.vqa import ImageSide

    image_base = tiny_image_base()
    before = {k: v.clone() for k, v in image_base.model.state_dict().items()}
    store = AdapterStore(tmp_path / "store")
    train, val = _rows(64, 0), _rows(24, 1)
    cfg = TrainConfig(steps=30, batch_size=16, lr=3e-3, head_lr=1e-2)
    adapter, metrics = train_vqa(lm, "both", train, val, image_base=image_base, task=None, store=store, config=cfg,
                                 targets=ALL, grid=1, image_adapter=True, image_r=4, progress=False)
    image_adapter = adapter.head.image_adapter
    assert image_adapter is not None and image_adapter.meta.base_fingerprint == "sha256:tinyimage"
    assert all(float(p["lora_B"].abs().max()) > 0 for p in image_adapter.tensors.values())     # it trained
    assert all(torch.equal(before[k], v) for k, v in image_base.model.state_dict().items())   # base frozen
    params = adapter.meta.lineage[0]["params"]["image_adapter"]
    assert params == {"r": 4, "params": image_adapter.num_parameters()}
    folder = store.path("both") / ImageProjector.IMAGE_ADAPTER
    assert (folder / "adapter_config.json").is_file()                # a PEFT LoRA of the image base in its turn
    reloaded = store.get("both")
    assert reloaded.head.feature_source() == adapter.head.feature_source() != adapter.head.image_fingerprint
    bare = feature_table(image_base, [e.image for e in val[:4]], 1)
    side = ImageSide(image_base, reloaded.head.image_adapter, 1)
    side.freeze()
    rt = AdapterRuntime.from_base(lm)
    rt.add(reloaded)
    assert evaluate_vqa(rt, reloaded, val, feature_table(image_base, [e.image for e in val], 1, side=side)) == metrics
    through = feature_table(image_base, [e.image for e in val[:4]], 1, side=side)
    assert all(not torch.allclose(bare[k], through[k]) for k in bare)          # the image adapter changes features
    side.close()
    assert all(torch.equal(bare[k], v) for k, v in feature_table(image_base, [e.image for e in val[:4]], 1).items())


def test_validation_checks_do_not_change_training(lm, tmp_path):
    """The best-checkpoint checks generate answers inside the trainer; the training steps after them must be
    the same as without checks (the adapter stays applied: same loss curve)."""

    import json

    image_base = tiny_image_base()
    curves = []
    for i, every in enumerate((0, 2)):
        store = AdapterStore(tmp_path / f"s{i}")
        cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, head_lr=1e-2, eval_every=every)
        train_vqa(lm, "v", _rows(32, 0), _rows(8, 1), image_base=image_base, task=None, store=store, config=cfg,
                  grid=1, progress=False, log_path=str(tmp_path / f"log{i}.jsonl"))
        lines = (tmp_path / f"log{i}.jsonl").read_text().splitlines()
        curves.append([json.loads(x)["loss"] for x in lines])
    assert curves[0] == curves[1] and len(curves[0]) == 6
