"""adapterkit's native adapter format, for every family: `adapter.safetensors` holds each site's
declared tensors under "<module path>.<tensor name>" in their own dtype (an int64 index stays int64,
packed bits stay uint8; never pickle), and adapterkit.json holds the config. Families PEFT also has
(LoRA) are written in PEFT's format instead, so PEFT, vLLM and LoRAX read them as they are."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CorruptAdapterError
from .safetensors_io import read_tensors, write_tensors

WEIGHTS_FILE = "adapter.safetensors"


def write_native(path: Path, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Write the tensors into an existing folder (callers make it atomic)."""
    bad = sorted(k for parts in tensors.values() for k in parts if "." in k)
    if bad:                                  # the key is split at its last dot when read
        raise ValueError(f"tensor names must not contain '.': {bad}")
    seen: set[int] = set()
    flat = {}
    for site, parts in tensors.items():
        for key, t in parts.items():
            # one tensor at several sites (tied while training) is stored at each: safetensors refuses shared memory
            flat[f"{site}.{key}"] = t.clone() if id(t) in seen else t
            seen.add(id(t))
    write_tensors(path / WEIGHTS_FILE, flat)


def read_native(path: Path, config: Any, method: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Per-site tensors, checked against the family's declared names and dtypes."""
    w_path = path / WEIGHTS_FILE
    if not w_path.is_file():
        raise CorruptAdapterError(f"{path} has no {WEIGHTS_FILE}: the {method.title} adapter's weights are missing; "
                                  "save the adapter again")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in read_tensors(w_path).items():
        site, _, key = name.rpartition(".")
        if not site:
            raise CorruptAdapterError(f"{w_path}: key {name!r} is not '<module path>.<tensor>'; save the adapter again")
        tensors.setdefault(site, {})[key] = value
    if not tensors:
        raise CorruptAdapterError(f"{w_path} holds no {method.title} tensors")
    for site, parts in tensors.items():
        method.check_tensors(config, site, parts, str(w_path))
    return tensors
