"""A local transformers vision folder as an image base (tiny random ViT and CLIP built here): its own image
processor, pooled features, LoRA on its linear layers equal to PEFT per image, and image training on it."""

from __future__ import annotations

import copy

import pytest
import torch

from adapterkit import AdapterRuntime, LoraConfig, create_adapter, load_base
from adapterkit.errors import ConfigError
from adapterkit.store import AdapterStore
from adapterkit.train.run import train_classifier
from adapterkit.train.trainer import TrainConfig
from adapterkit.vision.hf import image_features
from adapterkit.vision.images import pixels

peft = pytest.importorskip("peft")
PIL = pytest.importorskip("PIL.Image")

from test_image_tasks import tinted  # noqa: E402


def vit_folder(path, seed: int = 0):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64)
    ViTModel(cfg).save_pretrained(str(path))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(path))
    return path


def clip_folder(path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, projection_dim=16)
    CLIPVisionModel(cfg).save_pretrained(str(path))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(path))
    return path


def test_vit_folder_is_an_image_base_with_its_own_preprocessing(tmp_path):
    base = load_base(str(vit_folder(tmp_path / "vit")))
    assert base.kind == "image" and base.tokenizer is None
    img = tinted(1, 0)[0].image
    x = pixels([img], base.processor)
    want = base.processor(images=[img], return_tensors="pt")["pixel_values"]     # the folder's own processor
    assert x.shape == (1, 3, 32, 32) and torch.equal(x, want)
    with torch.no_grad():
        feats = image_features(base.model, x)
        cls = base.model(pixel_values=x).last_hidden_state[:, 0]
    assert torch.equal(feats, cls)                                  # ViT: the final [CLS] token


def test_clip_vision_folder_pools_with_its_pooler(tmp_path):
    base = load_base(str(clip_folder(tmp_path / "clip")))
    assert base.kind == "image" and base.model.config.model_type == "clip_vision_model"
    x = pixels([tinted(1, 0)[0].image], base.processor)
    with torch.no_grad():
        out = base.model(pixel_values=x)
        feats = image_features(base.model, x)
    want = base.model.post_layernorm(out.last_hidden_state[:, 0])      # CLIP: the post-LayerNorm [CLS]
    assert torch.allclose(feats, want, atol=1e-6) and not torch.allclose(feats, out.last_hidden_state[:, 0])


def test_a_vit_saved_by_its_classifier_loads_with_a_stable_fingerprint(tmp_path):
    """A ViTForImageClassification folder (the hub's usual form) has no pooler: none is made up at load."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, num_labels=3)
    ViTForImageClassification(cfg).save_pretrained(str(tmp_path / "cls"))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(tmp_path / "cls"))
    first, again = load_base(str(tmp_path / "cls")), load_base(str(tmp_path / "cls"))
    assert first.fingerprint == again.fingerprint and first.model.pooler is None


def test_a_bf16_image_base_takes_float32_pixels():
    """Batches are float32; a bf16 base (the GPU default) gets them in its dtype."""
    from adapterkit.vision.mobilenet import MobileNetConfig, MobileNetV2

    model = MobileNetV2(MobileNetConfig(num_classes=3)).to(torch.bfloat16).eval()
    with torch.no_grad():
        feats = image_features(model, torch.randn(2, 3, 32, 32))
    assert feats.dtype == torch.bfloat16 and feats.shape == (2, 1280)


def test_a_vision_folder_without_its_preprocessing_is_refused(tmp_path):
    folder = vit_folder(tmp_path / "vit")
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(ConfigError, match=r"is a vit folder without preprocessor_config.json: an image base needs "
                                          r"its own preprocessing"):
        load_base(str(folder))


@torch.no_grad()
def test_lora_on_vit_per_image_equals_peft(tmp_path):
    base = load_base(str(vit_folder(tmp_path / "vit")))
    x = pixels([e.image for e in tinted(3, 1)], base.processor)
    cfg = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"), init="nonzero", init_std=0.1)
    a = create_adapter("a", base.model, cfg, seed=1, fingerprint=base.fingerprint)
    b = create_adapter("b", base.model, cfg, seed=2, fingerprint=base.fingerprint)
    rt = AdapterRuntime.from_base(base)
    rt.add(a)
    rt.add(b)
    with rt.batch(["a", "b", None]):
        mixed = image_features(base.model, x)
    with rt.disabled():
        bare = image_features(base.model, x)
    for name, adapter in (("a", a), ("b", b)):
        adapter.save(tmp_path / name)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base.model), str(tmp_path / "a"), adapter_name="a")
    pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
    pm.eval()
    for i, name in enumerate(("a", "b")):
        pm.set_adapter(name)
        want = pm(pixel_values=x[i:i + 1]).last_hidden_state[:, 0]
        assert float((want - bare[i:i + 1]).abs().max()) > 1e-3
        assert torch.allclose(mixed[i:i + 1], want, atol=1e-5), name
    assert torch.allclose(mixed[2:], bare[2:], atol=1e-6)


def test_training_on_a_vit_folder_uses_its_default_targets(tmp_path):
    base = load_base(str(vit_folder(tmp_path / "vit")))
    cfg = TrainConfig(steps=30, batch_size=16, lr=1e-2, head_lr=1e-2, seed=0)
    adapter, metrics = train_classifier(base, "tint", tinted(96, 0), tinted(40, 1), task=None,
                                        store=AdapterStore(tmp_path / "store"), config=cfg, progress=False)
    assert adapter.config.target_modules == ("q_proj", "v_proj") and len(adapter.tensors) == 4
    assert metrics["accuracy"] >= 0.9, metrics
