"""The image base's files: the shipped torchvision checkpoint converted once into a safetensors folder
(config.json + model.safetensors), and that folder loaded back (core/base.py dispatches here when a
folder's config.json has model_type "adapterkit-mobilenet-v2")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import BaseNotAvailableError
from .mobilenet import MODEL_TYPE, MobileNetConfig, MobileNetV2


def is_image_folder(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (json.JSONDecodeError, AttributeError):
        return False


def convert_torchvision(pth: Path, out: Path, done: dict[str, Any] | None = None) -> None:
    """torchvision's MobileNetV2 state dict (a pickle of tensors) -> out/config.json + model.safetensors.
    weights_only=True: only tensors are unpickled, no code runs; the strict load checks every name and shape."""
    from safetensors.torch import save_file

    state = torch.load(pth, map_location="cpu", weights_only=True)
    model = MobileNetV2(MobileNetConfig())
    model.load_state_dict(state, strict=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2), encoding="utf-8")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def load_image_model(path: Path, dtype: torch.dtype) -> MobileNetV2:
    """The network of a converted folder, every tensor checked against the architecture (strict)."""
    from safetensors.torch import load_file

    config = MobileNetConfig.from_dict(json.loads((path / "config.json").read_text(encoding="utf-8")))
    model = MobileNetV2(config)
    try:
        missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    except Exception as exc:            # a shape mismatch; a truncated or damaged file (SafetensorError)
        raise BaseNotAvailableError(f"{path}: model.safetensors cannot be read as MobileNetV2 ({exc}); delete the "
                                  "folder and load the base again to re-convert it") from None
    if missing or unexpected:
        raise BaseNotAvailableError(f"{path}: model.safetensors is missing {sorted(missing)[:3]} / has unexpected "
                                  f"{sorted(unexpected)[:3]}; delete the folder and load the base again")
    return model.to(dtype)
