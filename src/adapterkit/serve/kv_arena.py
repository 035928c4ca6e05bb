"""KV memory for the engine: sequences grouped by capacity so one step's decode attention is batched.

Per-sequence caches (forward.SeqCache) waste no memory but make decode attention one call per sequence
per layer; at 64 sequences that loop is ~3x the cost of one masked call over a shared tensor
(benchmarks/kv_cache.py). The arena keeps both properties close:

  capacity class  a sequence needing `need` tokens (prompt + max_tokens) gets the smallest class
                  capacity >= need from a ladder 1, 2, ..., 10, 11, 12, ..., 20, 22, 24, 26, 28, 30, 33,
                  36, ... (each step the largest within 10%), so a sequence reserves <= 1.1x its need;
  chunk           one class's sequences live in chunks K, V [layers, slots, kv_heads, capacity, head_dim]
                  of 16 slots, all full but the last, whose size follows its live count: it grows along
                  1, 2, ..., 8, 10, 12, 14, 16 (reallocated, the filled part of each live sequence copied;
                  old and new tensors coexist during the copy) and shrinks to fit when 3 of its slots, or
                  half of it, are free, so few slots stand empty;
  compaction      a finishing sequence's slot is refilled by the class's last sequence (one sequence's
                  K/V copied), so live slots are always 0..n-1 of each chunk, and an emptied last chunk
                  is freed at once. Vacated positions are zeroed: a batched call reads a slot's whole
                  [0, longest) and masks its tail, and a masked NaN / inf (a failed adapter's K/V left
                  behind) still makes that row NaN in SDPA, so no finished sequence's values may stay.

Decode attention is then one call per chunk per layer over the view K[:n, :, :longest] with a length
mask (forward.FlatDecoder). Prefill still runs per sequence on the slot's view (a prompt is long enough
to amortise a call). Reserved memory is counted per slot allocated (free slots of a last chunk included),
so the engine's KV budget is never exceeded by what is really allocated.
"""

from __future__ import annotations

import bisect
from typing import Optional

import torch

STEP = 1.1           # at most this ratio between neighbouring classes
GROWTH = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16)   # sizes the last chunk of a class grows through; 16: full
SHRINK_AT = 3        # free slots in a last chunk that make it shrink to fit (or half of it free)


def class_ladder(limit: int) -> list[int]:
    """Class capacities 1, 2, ... up to >= limit, each the largest within STEP x the one before."""
    out = [1]
    while out[-1] < limit:
        out.append(max(out[-1] + 1, int(out[-1] * STEP)))
    return out


class ArenaCache:
    """One sequence's place in the arena: its chunk and slot (both change when compaction moves it).
    `k`, `v` are views [layers, kv_heads, capacity, head_dim] like forward.SeqCache's tensors."""

    def __init__(self, arena: "KVArena", cls: "_Class", need: int) -> None:
        self.arena, self.cls, self.need = arena, cls, need
        self.capacity = cls.capacity
        self.chunk: Optional[_Chunk] = None
        self.slot = -1
        self.length = 0

    @property
    def k(self) -> torch.Tensor:
        return self.chunk.k[:, self.slot]

    @property
    def v(self) -> torch.Tensor:
        return self.chunk.v[:, self.slot]

    @property
    def nbytes(self) -> int:
        return self.arena.bytes_per_slot(self.capacity)


class _Chunk:
    def __init__(self, arena: "KVArena", capacity: int, slots: int) -> None:
        self.arena, self.capacity = arena, capacity
        self.seqs: list[ArenaCache] = []          # live sequences, seqs[i].slot == i
        self.slots = 0
        self.resize(slots)

    def resize(self, slots: int) -> None:
        """New tensors of `slots` slots; the live sequences' filled K/V are copied over."""
        a = self.arena
        shape = (a.layers, slots, a.kv_heads, self.capacity, a.head_dim)
        # zeros, not empty: a batched call reads slots that are not decoding this step (outputs discarded)
        k = torch.zeros(shape, dtype=a.dtype, device=a.device)
        v = torch.zeros(shape, dtype=a.dtype, device=a.device)
        for c in self.seqs:
            k[:, c.slot, :, :c.length] = self.k[:, c.slot, :, :c.length]
            v[:, c.slot, :, :c.length] = self.v[:, c.slot, :, :c.length]
        self.k, self.v, self.slots = k, v, slots


class _Class:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.chunks: list[_Chunk] = []            # all full but the last

    def has_free_slot(self) -> bool:
        return bool(self.chunks) and len(self.chunks[-1].seqs) < self.chunks[-1].slots

    def growth(self) -> tuple[bool, int]:
        """How to make room for one more: (grow the last chunk?, slots added)."""
        if self.chunks and self.chunks[-1].slots < GROWTH[-1]:
            n = self.chunks[-1].slots
            return True, next(g for g in GROWTH if g > n) - n
        return False, GROWTH[0]


class KVArena:
    """Capacity-classed, chunked K/V storage for every running sequence of an engine."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", max_context: int = 8192) -> None:
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.ladder = class_ladder(max_context)
        self.classes: dict[int, _Class] = {}
        self.reserved_tokens = 0                  # slots allocated x their class capacity
        self.need_tokens = 0                      # sum of live sequences' exact needs

    def capacity_for(self, need: int) -> int:
        """The class capacity a sequence of `need` tokens is given (need rounded up the ladder)."""
        i = bisect.bisect_left(self.ladder, need)
        if i == len(self.ladder):                 # beyond the model's context (submit refuses it): exact
            return need
        return self.ladder[i]

    def bytes_per_slot(self, capacity: int) -> int:
        return 2 * self.layers * self.kv_heads * capacity * self.head_dim * torch.finfo(self.dtype).bits // 8

    def extra_tokens(self, need: int, limit: Optional[int] = None) -> Optional[int]:
        """Tokens the arena would newly reserve to place a sequence of `need` (0: a free slot is ready), or
        None when even a one-slot chunk would take the reservation past `limit`."""
        cap = self.capacity_for(need)
        cls = self.classes.get(cap)
        if cls is not None and cls.has_free_slot():
            return 0
        slots = cls.growth()[1] if cls is not None else GROWTH[0]
        if limit is not None:
            room = (limit - self.reserved_tokens) // cap
            if room < 1:
                return None
            slots = min(slots, room)
        return slots * cap

    def allocate(self, need: int, limit: Optional[int] = None) -> Optional[ArenaCache]:
        """A place for a sequence of `need` tokens, or None if `limit` (reserved tokens) would be passed."""
        extra = self.extra_tokens(need, limit)
        if extra is None:
            return None
        cap = self.capacity_for(need)
        cls = self.classes.get(cap) or _Class(cap)
        if extra:                                 # allocate first: a failed allocation changes nothing
            grow, _ = cls.growth()
            if grow:
                cls.chunks[-1].resize(cls.chunks[-1].slots + extra // cap)
            else:
                cls.chunks.append(_Chunk(self, cap, extra // cap))
            self.reserved_tokens += extra
        self.classes[cap] = cls
        chunk = cls.chunks[-1]
        c = ArenaCache(self, cls, need)
        c.chunk, c.slot = chunk, len(chunk.seqs)
        chunk.seqs.append(c)
        self.need_tokens += need
        return c

    def free(self, c: ArenaCache) -> None:
        """Release c's slot: the class's last sequence moves into it; an emptied last chunk is freed."""
        if c.chunk is None:
            return                                # freed before
        cls, chunk, slot = c.cls, c.chunk, c.slot
        c.chunk, c.slot = None, -1
        self.need_tokens -= c.need
        last_chunk = cls.chunks[-1]
        mover = last_chunk.seqs.pop()
        if mover is not c:                        # the mover's K/V (its filled part) into c's slot, the rest zeroed
            n = mover.length
            chunk.k[:, slot, :, :n] = last_chunk.k[:, mover.slot, :, :n]
            chunk.v[:, slot, :, :n] = last_chunk.v[:, mover.slot, :, :n]
            chunk.k[:, slot, :, n:] = 0
            chunk.v[:, slot, :, n:] = 0
            chunk.seqs[slot] = mover
            vacated = mover.slot
            mover.chunk, mover.slot = chunk, slot
        else:
            vacated = slot
        live = len(last_chunk.seqs)
        if not live:
            cls.chunks.pop()
            self.reserved_tokens -= last_chunk.slots * cls.capacity
            if not cls.chunks:
                del self.classes[cls.capacity]
            return
        last_chunk.k[:, vacated] = 0
        last_chunk.v[:, vacated] = 0
        fit = next(g for g in GROWTH if g >= live)
        if fit < last_chunk.slots and (last_chunk.slots - live >= SHRINK_AT or 2 * live <= last_chunk.slots):
            before = last_chunk.slots
            try:                                  # best effort: on a failed allocation the chunk stays as is
                last_chunk.resize(fit)
            except RuntimeError:
                return
            self.reserved_tokens -= (before - fit) * cls.capacity

    @property
    def nbytes(self) -> int:
        return sum(self.bytes_per_slot(cls.capacity) * ch.slots for cls in self.classes.values() for ch in cls.chunks)

    def stats(self) -> dict[str, int]:
        return {"reserved_tokens": self.reserved_tokens, "need_tokens": self.need_tokens,
                "sequences": sum(len(ch.seqs) for cls in self.classes.values() for ch in cls.chunks),
                "chunks": sum(len(cls.chunks) for cls in self.classes.values()), "classes": len(self.classes)}
