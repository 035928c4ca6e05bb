"""adapterkit's native adapter format, for every family: `adapter.safetensors` holds each site's
declared tensors under "<module path>.<tensor name>" in their own dtype (an int64 index stays int64,
never pickle), and adapterkit.json holds the config. A low-bit adapter (codecs/lowbit.py) keeps its
packed matrices in two entries, CODEC_SITE.codes and CODEC_SITE.scales (uint8 codes, per-group scales),
and its other tensors as above; adapterkit.json's "codec" record says which tensor is where. Families PEFT also has
(LoRA) are written in PEFT's format instead, so PEFT, vLLM and LoRAX read them as they are."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CorruptAdapterError
from .safetensors_io import read_tensors, write_tensors

WEIGHTS_FILE = "adapter.safetensors"
CODEC_SITE = "__codec__"          # not a module path: a low-bit adapter's packed buffers


def write_native(path: Path, tensors: Mapping[str, Mapping[str, torch.Tensor]], packed: Any = None) -> None:
    """Write the tensors into an existing folder (callers make it atomic); with `packed` (a codecs.Packed),
    the tensors it holds are written packed instead."""
    bad = sorted(k for parts in tensors.values() for k in parts if "." in k)
    if bad:                                  # the key is split at its last dot when read
        raise ValueError(f"tensor names must not contain '.': {bad}")
    seen: set[int] = set()
    flat = {}
    skip = {(site, key) for site, key, _ in packed.layout} if packed is not None else set()
    if packed is not None:
        flat[f"{CODEC_SITE}.codes"], flat[f"{CODEC_SITE}.scales"] = packed.codes, packed.scales
    for site, parts in tensors.items():
        for key, t in parts.items():
            if (site, key) in skip:
                continue
            # one tensor at several sites (tied while training) is stored at each: safetensors refuses shared memory
            flat[f"{site}.{key}"] = t.clone() if id(t) in seen else t
            seen.add(id(t))
    write_tensors(path / WEIGHTS_FILE, flat)


def read_native(path: Path, config: Any, method: Any,
                codec: Mapping[str, Any] | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], Any]:
    """Per-site tensors, checked against the family's declared names and dtypes, and the codecs.Packed
    they were read from when `codec` (adapterkit.json's record) says the folder holds a low-bit adapter
    (None otherwise); packed tensors come back unpacked (float32)."""
    w_path = path / WEIGHTS_FILE
    if not w_path.is_file():
        raise CorruptAdapterError(f"{path} has no {WEIGHTS_FILE}: the {method.title} adapter's weights are missing; "
                                  "save the adapter again")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    flat = read_tensors(w_path)
    packed = None
    if codec is not None:
        from ..codecs import Packed

        codes, scales = flat.pop(f"{CODEC_SITE}.codes", None), flat.pop(f"{CODEC_SITE}.scales", None)
        if codes is None or scales is None:
            raise CorruptAdapterError(f"{w_path}: adapterkit.json says the adapter is packed ({codec.get('bits')} "
                                      f"bit(s)) but the file lacks {CODEC_SITE}.codes or {CODEC_SITE}.scales; "
                                      "quantize the adapter again")
        packed = Packed.from_parts(codec, codes, scales, str(w_path))
        for site, key, _ in packed.layout:
            if f"{site}.{key}" in flat:
                raise CorruptAdapterError(f"{w_path}: {site}.{key} is stored both packed and as floats; "
                                          "quantize the adapter again")
        for site, parts in packed.unpack(torch.float32).items():
            for key, value in parts.items():
                flat[f"{site}.{key}"] = value
    elif any(name.startswith(f"{CODEC_SITE}.") for name in flat):
        raise CorruptAdapterError(f"{w_path} holds packed low-bit buffers but adapterkit.json has no 'codec' record "
                                  "saying how to read them; quantize the adapter again")
    for name, value in flat.items():
        site, _, key = name.rpartition(".")
        if not site:
            raise CorruptAdapterError(f"{w_path}: key {name!r} is not '<module path>.<tensor>'; save the adapter again")
        tensors.setdefault(site, {})[key] = value
    if not tensors:
        raise CorruptAdapterError(f"{w_path} holds no {method.title} tensors")
    for site, parts in tensors.items():
        method.check_tensors(config, site, parts, str(w_path))
    return tensors, packed
