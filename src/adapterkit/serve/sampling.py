"""Next-token choice per sequence: greedy (argmax, batched) or sampling with temperature, top-k and
top-p from a per-request generator (same seed, same tokens, whatever else shares the batch)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .requests import SamplingParams


def make_generator(seed: Optional[int]) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2 ** 62, (1,)).item()))
    return g


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] float32 -> temperature-scaled logits with everything outside top-k / top-p at -inf.
    top-p keeps the smallest set of most likely tokens whose probability reaches top_p (always >= 1)."""
    x = logits / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        before = probs.cumsum(-1) - probs                  # mass strictly before each token
        drop = before >= params.top_p
        drop[0] = False
        x = x.clone()
        x[order[drop]] = float("-inf")
    return x


def choose(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[Optional[torch.Generator]]) -> list[int]:
    """logits [m, V] -> one token per row."""
    out = logits.argmax(-1).tolist()                       # greedy rows keep this
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        probs = filter_logits(logits[i], p).softmax(-1)
        out[i] = int(torch.multinomial(probs, 1, generator=g).item())
    return out
