"""Read and write tensor files; only safetensors, never pickles."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CorruptAdapterError


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptAdapterError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupt: "
            "save or copy the adapter again"
        ) from None


def write_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(flat, str(path), metadata={"format": "pt", **(metadata or {})})
