"""Generation over a mixed batch: one row per (prompt, adapters) pair, in one batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from .base import to_device
from .runtime import AdapterRuntime, RowAdapters

if TYPE_CHECKING:
    from ..serve.requests import SamplingParams


@dataclass
class Generation:
    adapter: Any              # the row's adapters as given (name, None or {name: weight})
    text: str
    token_ids: list[int]      # generated tokens only, up to (not including) EOS
    error: Optional[str] = None   # this row alone failed (e.g. its logits held NaN); text and tokens are empty


def pad_id(tokenizer: Any) -> int:
    """The pad token id, or EOS for tokenizers without one (Llama-style)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class _RowSampler:
    """A logits processor that picks each row's token with the server's sampler (serve/sampling.py)
    and one generator per row, then leaves only that token (so transformers' argmax takes it): same
    seed, same tokens, whatever else shares the batch. A row whose sampling fails is stopped (EOS)
    and remembered; the other rows go on (DESIGN.md convention 13)."""

    def __init__(self, params: "SamplingParams", rows: int, start: int, eos: Optional[int]) -> None:
        from ..serve.sampling import make_generator

        self.params, self.start, self.eos = params, start, eos
        self.generators = [make_generator(params.seed) for _ in range(rows)]
        self.errors: dict[int, Exception] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        from ..serve.sampling import NonFiniteLogitsError, filter_logits

        done = [i in self.errors for i in range(len(scores))]
        if self.eos is not None:                      # finished rows get pad tokens from transformers
            ended = (input_ids[:, self.start:] == self.eos).any(-1).tolist()
            done = [d or e for d, e in zip(done, ended)]
        out = torch.full_like(scores, float("-inf"))
        for i, (x, g) in enumerate(zip(scores, self.generators)):
            token = self.eos if self.eos is not None else 0
            if not done[i]:
                try:                                  # -inf is a processor's mask (allowed); NaN / +inf are not
                    if torch.isnan(x).any() or torch.isposinf(x).any():
                        raise NonFiniteLogitsError("the model's output (logits) holds NaN or inf for this row")
                    probs = filter_logits(x.cpu(), self.params).softmax(-1)   # host generator: same seed,
                    token = int(torch.multinomial(probs, 1, generator=g).item())  # same tokens on every device
                except Exception as exc:              # e.g. probabilities that overflowed
                    self.errors[i] = exc
            out[i, token] = 0.0
        return out


def generate(
    runtime: AdapterRuntime,
    tokenizer: Any,
    prompts: Sequence[str],
    adapters: Sequence[RowAdapters],
    *,
    max_new_tokens: int = 32,
    chat: bool = False,
    kernel: str = "auto",
    sampling: Optional["SamplingParams"] = None,
    **generate_kwargs: Any,
) -> list[Generation]:
    """Greedy by default; `sampling` (serve.requests.SamplingParams: temperature, top_p, top_k, seed)
    samples each row with its own generator seeded with `seed`. Prompts are tokenised as is (the
    chat template only with chat=True)."""
    if len(prompts) != len(adapters):
        raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapter entries; give one per row")
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
    else:
        texts = list(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    enc = to_device(enc, runtime.device)
    eos = tokenizer.eos_token_id
    pad = pad_id(tokenizer)
    start = enc["input_ids"].shape[1]
    sampler = None
    if sampling is not None and not sampling.greedy:
        from transformers import LogitsProcessorList

        sampler = _RowSampler(sampling, len(texts), start, eos)
        generate_kwargs["do_sample"] = False             # our sampler picks; the argmax takes its pick
        generate_kwargs["logits_processor"] = LogitsProcessorList(
            [*(generate_kwargs.get("logits_processor") or []), sampler])
    generate_kwargs.setdefault("do_sample", False)
    with torch.no_grad(), runtime.batch(list(adapters), kernel=kernel):
        out = runtime.model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad, **generate_kwargs)
    results = []
    for i, (row, entry) in enumerate(zip(out[:, start:].tolist(), adapters)):
        if sampler is not None and i in sampler.errors:
            results.append(Generation(entry, "", [], f"sampling failed: {sampler.errors[i]}"))
            continue
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        results.append(Generation(entry, tokenizer.decode(row, skip_special_tokens=True), row))
    return results
