"""Next-token choice per sequence: greedy (argmax, batched) or sampling with temperature, top-k and
top-p from a per-request generator (same seed, same tokens, whatever else shares the batch).

Rows are independent: a row whose logits are not finite, or whose sampling fails, gets its own
exception in place of a token and the other rows are unaffected (DESIGN.md convention 13)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .requests import SamplingParams


def make_generator(seed: Optional[int]) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2 ** 62, (1,), device="cpu").item()))
    return g


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] float32 -> temperature-scaled logits with everything outside top-k / top-p at -inf.
    top-p keeps the smallest set of most likely tokens whose probability reaches top_p (always >= 1)."""
    x = logits.float() / params.temperature
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


class NonFiniteLogitsError(ArithmeticError):
    """A row's logits hold NaN or inf (the engine says which adapter(s) the row used)."""


def choose(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[Optional[torch.Generator]]) -> list[Union[int, Exception]]:
    """logits [m, V] (any device) -> per row a token, or the exception that row alone fails with.
    Greedy rows are picked where the logits are; sampled rows draw on the host with their (host)
    generator, so a seed gives the same tokens on every device."""
    finite = torch.isfinite(logits).all(-1).tolist()       # one pass: NaN/inf rows never sample
    out: list[Union[int, Exception]] = list(logits.argmax(-1).tolist())   # greedy rows keep this
    for i, (p, g) in enumerate(zip(params, generators)):
        if not finite[i]:
            out[i] = NonFiniteLogitsError("the model's output (logits) holds NaN or inf for this request")
        elif not p.greedy:
            try:
                probs = filter_logits(logits[i].cpu(), p).softmax(-1)
                out[i] = int(torch.multinomial(probs, 1, generator=g).item())
            except Exception as exc:                       # e.g. probabilities that overflowed
                out[i] = exc
    return out
