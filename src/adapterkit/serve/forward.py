"""One forward step over a ragged batch of sequences, each with its own KV cache (vLLM-style
"flattened" batching, no padding anywhere).

Every sequence contributes its new tokens to ONE flat row [1, T]: a whole prompt when it starts
(prefill) or one token per decode step. Linear layers (and so every adapter site, routed per token)
run once over all T tokens; attention is per sequence against that sequence's cache, except the
decode tokens of sequences held in a KV arena (kv_arena.py): those attend in one masked call per
arena chunk.

KV cache: a forward.SeqCache owns K and V tensors [layers, kv_heads, capacity, head_dim] sized exactly
prompt + max_tokens (the reference layout: one attention call per sequence); an ArenaCache is a slot
of a chunk [layers, slots, kv_heads, capacity, head_dim] shared by sequences of one capacity class,
so a step's decode tokens of a chunk attend together over K[:n, :, :longest] (no copy, a length
mask). Measured on this CPU (benchmarks/kv_cache.py): paged blocks need a gather per layer that costs
more than the attention itself here (no fused paged kernel on CPU); the arena's batched call is ~3x
cheaper than the per-sequence loop at 64 sequences. Both layouts give the same outputs
(tests/test_kv_arena.py).

Devices: every tensor made here (caches, attention output, masks) is made on the model's device, in
its dtype; the engine puts the step's tokens and positions there too.

Supported bases: Llama-architecture decoders (Llama, SmolLM2, Mistral without sliding window,
Qwen2), whose layers are `input_layernorm -> self_attn(q,k,v,o) -> post_attention_layernorm -> mlp`
with rotary positions. Output equals the Hugging Face forward (tests/test_engine.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedError
from .kv_arena import ArenaCache, KVArena

SUPPORTED = ("llama", "mistral", "qwen2")


class SeqCache:
    """K/V of one sequence for every layer; `length` tokens are filled."""

    def __init__(self, layers: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.k = torch.empty(layers, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.empty(layers, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


@dataclass
class Segment:
    """Sequence j's new tokens are flat positions [start, start + n); they go to cache[length:length+n]."""

    cache: SeqCache | ArenaCache
    start: int
    n: int


@dataclass
class _DecodeGroup:
    """One step's decode tokens held in one arena chunk: one attention call per layer.
    slots, rows, pos [g]: chunk slot, flat row and cache position of each token; width: slots 0..width-1
    are attended (live slots not decoding this step ride along, their outputs dropped); mask [width, 1, 1,
    longest]: True where a slot's key is filled."""

    chunk: Any
    slots: torch.Tensor
    rows: torch.Tensor
    pos: torch.Tensor
    width: int
    longest: int
    mask: torch.Tensor
    dense: bool                                   # slots == 0..width-1 in order: no scatter needed


def _decode_groups(segments: Sequence[Segment], device: torch.device) -> tuple[list[_DecodeGroup], list[Segment]]:
    """Split a step's segments: decode tokens of arena sequences grouped by chunk; the rest per sequence."""
    by_chunk: dict[int, list[Segment]] = {}
    single: list[Segment] = []
    for s in segments:
        if s.n == 1 and isinstance(s.cache, ArenaCache):
            by_chunk.setdefault(id(s.cache.chunk), []).append(s)
        else:
            single.append(s)
    groups = []
    for segs in by_chunk.values():
        if len(segs) == 1:                        # one token: the per-sequence call is as cheap
            single.append(segs[0])
            continue
        segs.sort(key=lambda s: s.cache.slot)
        chunk = segs[0].cache.chunk
        width = segs[-1].cache.slot + 1
        lengths = [0] * width
        for s in segs:
            lengths[s.cache.slot] = s.cache.length + 1
        lengths = [n or 1 for n in lengths]       # a slot riding along attends its first key only
        longest = max(lengths)
        lt = torch.tensor(lengths, device=device)
        mask = (torch.arange(longest, device=device)[None, :] < lt[:, None])[:, None, None, :]
        slots = [s.cache.slot for s in segs]
        groups.append(_DecodeGroup(chunk, torch.tensor(slots, device=device),
                                   torch.tensor([s.start for s in segs], device=device),
                                   torch.tensor([s.cache.length for s in segs], device=device),
                                   width, longest, mask, slots == list(range(width))))
    return groups, single


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FlatDecoder:
    """Runs a Llama-style HF causal LM over flat ragged batches with per-sequence KV caches."""

    def __init__(self, model: nn.Module) -> None:
        cfg = model.config
        if cfg.model_type not in SUPPORTED:
            raise UnsupportedError(
                f"the serving engine runs Llama-architecture decoders ({', '.join(SUPPORTED)}); this base is "
                f"{cfg.model_type!r}. Use `adapterkit generate` for other architectures")
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) \
                and cfg.model_type == "mistral":
            raise UnsupportedError("sliding-window attention is not supported by the serving engine")
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.max_context = int(cfg.max_position_embeddings)
        self.width = int(cfg.hidden_size)

    def new_cache(self, capacity: int) -> SeqCache:
        return SeqCache(len(self.layers), self.kv_heads, capacity, self.head_dim, self.dtype, self.device)

    def new_arena(self) -> KVArena:
        return KVArena(len(self.layers), self.kv_heads, self.head_dim, self.dtype, self.device, self.max_context)

    def bytes_per_token(self) -> int:
        return 2 * len(self.layers) * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    @torch.inference_mode()
    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, segments: Sequence[Segment],
               before_layer: Optional[Callable[[int, torch.Tensor], ContextManager[Any]]] = None,
               embeds: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """tokens, positions [T] (on the model's device) -> final-norm hidden states [T, hidden]; fills the caches and
        advances each segment's cache length by its n. Adapter routing is the caller's (runtime.use);
        before_layer(i, h [1, T, d] = layer i's input) may return a context that holds for layer i
        only (a per-token gate routes each layer's tokens from that layer's input). embeds: (flat positions [k],
        vectors [k, d]) that replace those tokens' embeddings (a prompt's image tokens, serve/vl.py)."""
        h = self.inner.embed_tokens(tokens[None])                        # [1, T, d]
        if embeds is not None:
            h = h.index_put((torch.zeros_like(embeds[0]), embeds[0]), embeds[1].to(h.dtype))
        cos, sin = self.inner.rotary_emb(h, positions[None])             # [1, T, hd]
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]                # [T, 1, hd]
        T = tokens.shape[0]
        plan = _decode_groups(segments, h.device)
        for i, layer in enumerate(self.layers):
            with before_layer(i, h) if before_layer is not None else contextlib.nullcontext():
                h = self._layer(i, layer, h, cos, sin, T, plan)
        for s in segments:
            s.cache.length += s.n
        return self.inner.norm(h)[0]

    def _layer(self, i: int, layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, T: int,
               plan: tuple[list[_DecodeGroup], list[Segment]]) -> torch.Tensor:
        residual = h
        x = layer.input_layernorm(h)
        att = layer.self_attn
        q = att.q_proj(x).view(T, self.heads, self.head_dim)
        k = att.k_proj(x).view(T, self.kv_heads, self.head_dim)
        v = att.v_proj(x).view(T, self.kv_heads, self.head_dim)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = torch.empty(T, self.heads * self.head_dim, dtype=q.dtype, device=q.device)
        for g in plan[0]:
            self._attend_group(i, q, k, v, g, out)
        self._attend(i, q, k, v, plan[1], out)                        # out [T, heads*hd]
        h = residual + att.o_proj(out[None])
        residual = h
        return residual + layer.mlp(layer.post_attention_layernorm(h))

    def _attend_group(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: _DecodeGroup,
                      out: torch.Tensor) -> None:
        """Decode tokens of one arena chunk: write their K/V, one masked call over the chunk's first `width`
        slots. The query's heads are folded per KV head ([width, kvh, heads/kvh, hd]): one query token,
        so grouped-query attention needs no repeated K/V."""
        K, V = g.chunk.k[layer], g.chunk.v[layer]                     # [slots, kvh, cap, hd]
        K[g.slots, :, g.pos] = k[g.rows]
        V[g.slots, :, g.pos] = v[g.rows]
        group = self.heads // self.kv_heads
        qg = q[g.rows].view(-1, self.kv_heads, group, self.head_dim)   # [g, kvh, group, hd]
        if not g.dense:
            qg = torch.zeros(g.width, *qg.shape[1:], dtype=q.dtype, device=q.device).index_copy_(0, g.slots, qg)
        o = F.scaled_dot_product_attention(qg, K[:g.width, :, :g.longest], V[:g.width, :, :g.longest],
                                           attn_mask=g.mask, scale=self.scale)
        out[g.rows] = (o if g.dense else o[g.slots]).reshape(g.rows.shape[0], -1)

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                segments: Sequence[Segment], out: torch.Tensor) -> None:
        """The reference path: one call per sequence against its own cache view."""
        for s in segments:
            a, b, start = s.start, s.start + s.n, s.cache.length
            end = start + s.n
            kc, vc = s.cache.k[layer], s.cache.v[layer]                 # [kvh, cap, hd]
            kc[:, start:end] = k[a:b].transpose(0, 1)
            vc[:, start:end] = v[a:b].transpose(0, 1)
            qs = q[a:b].transpose(0, 1)[None]                           # [1, heads, n, hd]
            ks, vs = kc[None, :, :end], vc[None, :, :end]               # [1, kvh, end, hd]
            if s.n == 1 or start == 0:                                  # decode, or a fresh prompt
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=s.n > 1, scale=self.scale,
                                                   enable_gqa=True)
            else:                                                       # a chunk after cached tokens
                mask = torch.ones(s.n, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scale, enable_gqa=True)
            out[a:b] = o[0].transpose(0, 1).reshape(s.n, -1)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [m, d] (rows picked by the caller) -> logits [m, vocab] in float32."""
        return self.model.lm_head(hidden[None])[0].float()
