"""The low-bit codec: float matrices stored as b-bit codes (b in 1, 2, 4, 8) with one scale per group.

Quantizer (symmetric, mid-rise): a group of `group_size` consecutive values x (row-major) becomes
codes k in [0, 2^b) and one step Δ, read back as x̂ = (k - 2^(b-1) + 1/2)·Δ. At 1 bit this is
sign(x)·Δ/2, the binary adapters of "precision redundancy in parameter-efficient tuning". Δ minimises
Σ(x - x̂)² by alternating the two exact half-steps (Lloyd): the nearest level for each x given Δ, then
the least-squares Δ = Σ x·l / Σ l² given the levels l; the error never rises, and at 1 bit the first
iteration is already the optimum Δ/2 = mean|x|. Above 1 bit the error has several basins in Δ, so each
group starts from the best of GRID candidate steps (fractions of the range-covering step). Δ is stored
as float16 (float32 when a step overflows it) and the codes are chosen again for the stored Δ, so x̂ is
exactly what a reader computes.

Packing: every quantized tensor of an adapter is flattened and zero-padded to a whole number of
groups, and all of them are laid end to end in ONE code buffer (uint8, 8/b codes per byte, the first
code in the low bits) and ONE scale buffer: one safetensors entry each, and unpacking a whole adapter
is two vectorised ops (the cold attach from a packed RAM tier). `Packed.layout` says which tensor is
where ((site, tensor name, shape), in order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..errors import ConfigError, CorruptAdapterError

BITS = (1, 2, 4, 8)
LLOYD_ITERATIONS = 8
GRID = 20                  # candidate steps (fractions of the range-covering one) tried before Lloyd
_F16_MAX = torch.finfo(torch.float16).max
_BYTE_LEVELS: dict[tuple[int, str], torch.Tensor] = {}


@dataclass(frozen=True)
class LowBit:
    """The codec's settings: `bits` per value, one scale per `group_size` values."""

    bits: int
    group_size: int = 64
    type: str = "lowbit"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ConfigError(f"bits must be 1, 2, 4 or 8, got {self.bits!r}: low-bit adapters pack 8/bits codes "
                              "into each byte")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 8 \
                or self.group_size % 8:
            raise ConfigError(f"group_size must be a positive multiple of 8, got {self.group_size!r} (each tensor "
                              "starts on a whole byte of codes)")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LowBit":
        if data.get("type") != "lowbit":
            raise CorruptAdapterError(f"unknown tensor codec {data.get('type')!r}; this adapterkit reads 'lowbit': "
                                      "upgrade adapterkit")
        return cls(int(data["bits"]), int(data["group_size"]))

    def label(self) -> str:
        """"1-bit g64": for summaries."""
        return f"{self.bits}-bit g{self.group_size}"

    # ------------------------------------------------------------------ one group matrix
    def fit(self, groups: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """groups [G, group_size] float -> (codes [G, group_size] uint8, step [G] in its stored dtype);
        `valid` (same shape, bool) leaves padding out of the fit."""
        x = groups.detach().to(torch.float32)
        w = torch.ones_like(x) if valid is None else valid.to(torch.float32)
        half = 2 ** (self.bits - 1)
        top = half - 0.5                                       # the largest level, in steps
        step = (x.abs() * w).amax(dim=1) / top                 # the range's ends on the outer levels
        if self.bits > 1:            # the error is not convex in Δ: start each group from the best of a grid
            best = None
            for f in torch.arange(1, GRID + 1, dtype=torch.float32) / GRID:
                err = self._error(x, w, step * f, half)
                if best is None:
                    best, pick = err, step * f
                else:
                    better = err < best
                    best, pick = torch.where(better, err, best), torch.where(better, step * f, pick)
            step = pick
        for _ in range(LLOYD_ITERATIONS):
            levels = self._levels(x, step, half)
            num = (x * levels * w).sum(1)
            den = (levels * levels * w).sum(1)
            step = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num)).clamp_min(0)
        stored = _store_steps(step)
        codes = (self._levels(x, stored.to(torch.float32), half) + half - 0.5).to(torch.uint8)
        return codes, stored

    @classmethod
    def _error(cls, x: torch.Tensor, w: torch.Tensor, step: torch.Tensor, half: int) -> torch.Tensor:
        """[G] squared error of each group read back on its nearest levels for `step` [G]."""
        return (((x - cls._levels(x, step, half) * step.unsqueeze(1)) ** 2) * w).sum(1)

    @staticmethod
    def _levels(x: torch.Tensor, step: torch.Tensor, half: int) -> torch.Tensor:
        """The nearest level (in steps, k - half + 1/2) of each x for its group's step."""
        safe = torch.where(step > 0, step, torch.ones_like(step)).unsqueeze(1)
        k = torch.floor(x / safe).clamp(-half, half - 1)
        return k + 0.5

    def read(self, codes: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """codes [G, group_size] (integers in [0, 2^b)), step [G] -> values [G, group_size] float32."""
        half = 2 ** (self.bits - 1)
        return (codes.to(torch.float32) - (half - 0.5)) * step.to(torch.float32).unsqueeze(1)

    def byte_levels(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[256, 8/b] float32: the levels (in steps) of the codes packed in each byte value, first code first
        (made once per bits and device)."""
        key = (self.bits, str(device))
        if key not in _BYTE_LEVELS:
            _BYTE_LEVELS[key] = self._byte_levels().to(device)
        return _BYTE_LEVELS[key]

    def _byte_levels(self) -> torch.Tensor:
        per, bits = 8 // self.bits, self.bits
        shifts = torch.arange(per, dtype=torch.int32) * bits
        codes = (torch.arange(256, dtype=torch.int32).unsqueeze(1) >> shifts) & (2 ** bits - 1)
        return codes.to(torch.float32) - (2 ** (bits - 1) - 0.5)

    def round_trip(self, t: torch.Tensor) -> torch.Tensor:
        """t quantized and read back (float32, t's shape): what training with --bits computes with."""
        flat = t.detach().reshape(-1).to(torch.float32)
        pad = -flat.numel() % self.group_size
        groups = torch.nn.functional.pad(flat, (0, pad)).view(-1, self.group_size)
        valid = torch.arange(groups.numel(), device=t.device).view_as(groups) < flat.numel()
        codes, step = self.fit(groups, valid)
        return self.read(codes, step).reshape(-1)[:flat.numel()].view(t.shape)


def _store_steps(step: torch.Tensor) -> torch.Tensor:
    """float16 steps where every one fits (relative rounding 2^-11), else float32."""
    if bool((step <= _F16_MAX).all()):
        half = step.to(torch.float16)
        if not bool(((step > 0) & (half == 0)).any()):         # no step so small it would vanish
            return half
    return step.clone()


@dataclass
class Packed:
    """An adapter's quantized tensors in two buffers (see the module docstring)."""

    codec: LowBit
    layout: list[tuple[str, str, tuple[int, ...]]]   # (site, tensor name, shape), in buffer order
    codes: torch.Tensor                               # uint8 [total padded values * bits / 8]
    scales: torch.Tensor                              # float16 or float32 [total padded values / group_size]

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    def padded_sizes(self) -> list[int]:
        g = self.codec.group_size
        return [math.ceil(math.prod(shape) / g) * g for _, _, shape in self.layout]

    def check(self, where: str) -> None:
        """Refuse buffers whose lengths do not match the layout and bits (CorruptAdapterError)."""
        total = sum(self.padded_sizes())
        want_codes, want_scales = total * self.codec.bits // 8, total // self.codec.group_size
        if self.codes.dtype != torch.uint8 or self.codes.dim() != 1 or self.codes.numel() != want_codes:
            raise CorruptAdapterError(
                f"{where}: the packed codes are {_describe(self.codes)}; {len(self.layout)} tensors of "
                f"{total} values (padded to groups of {self.codec.group_size}) at {self.codec.bits} bit(s) need "
                f"uint8 [{want_codes}]: the file is truncated or was edited; quantize the adapter again")
        if self.scales.dtype not in (torch.float16, torch.float32) or self.scales.dim() != 1 \
                or self.scales.numel() != want_scales:
            raise CorruptAdapterError(
                f"{where}: the packed scales are {_describe(self.scales)}; {total} values in groups of "
                f"{self.codec.group_size} need float16 or float32 [{want_scales}]: quantize the adapter again")
        bad = int((~torch.isfinite(self.scales)).sum()) + int((self.scales < 0).sum())
        if bad:
            raise CorruptAdapterError(f"{where}: {bad} packed scale(s) are negative, NaN or inf; quantize the "
                                      "adapter again")

    def unpack(self, dtype: torch.dtype = torch.float32, copy: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """site -> tensor name -> values (dtype), every tensor of the layout in two vectorised ops.
        copy=False: the tensors are views of one buffer (attach copies them into its slots anyway; safetensors
        refuses to save views that share memory)."""
        g = self.codec.group_size
        # one gather (each byte -> its 8/b levels, in steps) and one multiply by the group's step
        levels = torch.index_select(self.codec.byte_levels(self.codes.device), 0, self.codes.int()).view(-1, g)
        values = levels.mul_(self.scales.to(torch.float32).unsqueeze(1)).view(-1).to(dtype)
        out: dict[str, dict[str, torch.Tensor]] = {}
        # one split into the padded chunks (attach latency: one op, not a slice per tensor)
        for (site, key, shape), chunk in zip(self.layout, values.split(self.padded_sizes())):
            n = math.prod(shape)
            view = (chunk if chunk.numel() == n else chunk[:n]).view(shape)
            out.setdefault(site, {})[key] = view.clone() if copy else view
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON half (the buffers go to safetensors)."""
        return {**self.codec.to_dict(), "layout": [[s, k, list(shape)] for s, k, shape in self.layout]}

    @classmethod
    def from_parts(cls, record: Mapping[str, Any], codes: torch.Tensor, scales: torch.Tensor, where: str) -> "Packed":
        try:
            layout = [(str(s), str(k), tuple(int(d) for d in shape)) for s, k, shape in record["layout"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptAdapterError(f"{where}: the codec record's layout is malformed ({type(exc).__name__}: "
                                      f"{exc}); quantize the adapter again") from None
        try:
            codec = LowBit.from_dict(record)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptAdapterError(f"{where}: the codec record is malformed ({exc}); quantize the adapter "
                                      "again") from None
        packed = cls(codec, layout, codes, scales)
        packed.check(where)
        return packed


def pack(codec: LowBit, tensors: Mapping[str, Mapping[str, torch.Tensor]],
         keys: list[tuple[str, str]]) -> Packed:
    """Quantize tensors[site][key] for each (site, key) in `keys` into one Packed (all groups fitted at once)."""
    g = codec.group_size
    flats, valid = [], []
    layout = []
    for site, key in keys:
        t = tensors[site][key].detach().to("cpu", torch.float32).reshape(-1)
        pad = -t.numel() % g
        flats.append(torch.nn.functional.pad(t, (0, pad)))
        valid.append(torch.arange(t.numel() + pad) < t.numel())
        layout.append((site, key, tuple(tensors[site][key].shape)))
    groups = torch.cat(flats).view(-1, g)
    codes, steps = codec.fit(groups, torch.cat(valid).view(-1, g))
    per = 8 // codec.bits
    shifts = torch.arange(per, dtype=torch.int32) * codec.bits
    packed = (codes.view(-1, per).to(torch.int32) << shifts).sum(1).to(torch.uint8)
    return Packed(codec, layout, packed, steps)


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
