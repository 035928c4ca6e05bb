"""A local transformers vision folder as an image base: ViT (and DeiT, DINOv2), CLIP's and SigLIP's vision
towers. The folder's own preprocessor_config.json is its preprocessing (transformers' image processor; the
PIL backend, no torchvision), and its pooled image features are what a classification head reads:

    vit, deit, dinov2                     the final [CLS] token (after the last LayerNorm), as the *ForImageClassification
                                          heads read it (ViT's pooler is a dense layer many checkpoints leave untrained)
    clip_vision_model, siglip_vision_model  pooler_output (CLIP: post-LayerNorm [CLS]; SigLIP: its attention-pool head)

A full CLIP or SigLIP folder (text and vision) loads its vision tower. Module names stay the transformers
model's, so PEFT adapters made for the same vision model load as they are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

CLS_TYPES = ("vit", "deit", "dinov2")
POOLER_TYPES = ("clip_vision_model", "siglip_vision_model", "clip", "siglip")
VISION_TYPES = CLS_TYPES + POOLER_TYPES
# LoRA's default sites: the attention's query and value projections (PEFT's image classification recipe
# for ViT), named q_proj / v_proj in transformers 5's ViT, CLIP and SigLIP, query / value in older ViTs
LORA_TARGETS = (("q_proj", "v_proj"), ("query", "value"))


def default_lora_targets(model: torch.nn.Module) -> tuple[str, ...]:
    """The first naming of LORA_TARGETS the model has (ConfigError when it has neither)."""
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for names in LORA_TARGETS:
        if set(names) <= leaves:
            return names
    raise ConfigError(f"no default LoRA targets for this {getattr(model.config, 'model_type', '?')} image base (it has "
                      f"no q_proj/v_proj or query/value layers); give --targets from: {', '.join(sorted(leaves))}")


def is_vision_type(model_type: str | None) -> bool:
    return model_type in VISION_TYPES


def load_vision(path: Path, model_type: str, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    """(the vision model, its image processor) from a local folder."""
    import transformers
    from transformers import AutoImageProcessor

    if not (path / "preprocessor_config.json").is_file():
        raise ConfigError(f"{path} is a {model_type} folder without preprocessor_config.json: an image base needs "
                          "its own preprocessing (save the model's image processor with save_pretrained into it)")
    cls = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel", "clip_vision_model": "CLIPVisionModel",
           "siglip_vision_model": "SiglipVisionModel"}.get(model_type)
    auto = getattr(transformers, cls) if cls else transformers.AutoModel
    # ViT / DeiT: no pooler (the [CLS] token is read); a checkpoint saved from *ForImageClassification has none,
    # and a freshly initialised one would change the base's fingerprint at every load
    extra = {"add_pooling_layer": False} if model_type in ("vit", "deit") else {}
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = auto.from_pretrained(str(path), dtype=dtype, **extra)
        processor = AutoImageProcessor.from_pretrained(str(path), use_fast=False)
    finally:
        if was:
            hf_logging.enable_progress_bar()
    return model, processor


def image_features(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, H] pooled features of an image base (adapterkit's MobileNetV2 or a transformers vision model)."""
    pixel_values = pixel_values.to(next(model.parameters()).dtype)          # a bf16 base (the GPU default)
    if hasattr(model, "pooled"):
        return model.pooled(pixel_values)
    out = model(pixel_values=pixel_values)
    if getattr(model.config, "model_type", None) in CLS_TYPES or getattr(out, "pooler_output", None) is None:
        return out.last_hidden_state[:, 0]
    return out.pooler_output


def hf_pixels(images: list[Any], processor: Any) -> torch.Tensor:
    """[B, 3, H, W] float32 through a transformers image processor."""
    return processor(images=images, return_tensors="pt")["pixel_values"].to(torch.float32)
