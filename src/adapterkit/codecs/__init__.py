"""How adapter tensors are stored. Floats are stored as they are (formats/); integer tensors (a sparse
adapter's indices) keep their dtype; the low-bit codec (lowbit.py) packs float matrices into b-bit codes
with per-group scales. A codec is not a family: any family's float matrices can be packed, the family
still computes with floats (unpacked on load or attach)."""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..errors import UnsupportedError
from .lowbit import BITS, LowBit, Packed, pack

__all__ = ["BITS", "LowBit", "Packed", "pack", "quantizable", "quantize"]


def quantizable(adapter: Any) -> list[tuple[str, str]]:
    """(site, tensor name) of every float matrix (2 or more dims) of the adapter; vectors (biases, IA3
    factors, ScaLearn's ω, a sparse adapter's values) and integer tensors stay as they are."""
    return [(site, key) for site, parts in adapter.tensors.items() for key, t in parts.items()
            if t.is_floating_point() and t.dim() >= 2]


def quantize(adapter: Any, codec: LowBit, name: str | None = None) -> Any:
    """A copy of `adapter` (named `name`) whose float matrices are quantized with `codec`: it holds the
    packed form (saved as is) and the values it reads back (what every kernel computes with)."""
    keys = quantizable(adapter)
    if not keys:
        raise UnsupportedError(f"adapter {adapter.name!r}, {adapter.method.an_adapter}, has no float matrix to "
                               "quantize (the low-bit codec packs matrices; vectors and integer tensors stay as "
                               "they are); keep it as it is")
    packed = pack(codec, adapter.tensors, keys)
    values = packed.unpack(torch.float32)
    tensors = {site: {key: values.get(site, {}).get(key, t.detach().clone()) for key, t in parts.items()}
               for site, parts in adapter.tensors.items()}
    out = copy.copy(adapter)
    out.name = adapter.name if name is None else name
    out.tensors, out.packed = tensors, packed
    out.meta = copy.deepcopy(adapter.meta)
    out.__post_init__()
    return out

