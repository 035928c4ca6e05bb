"""Generation over a mixed batch: one row per (prompt, adapters) pair, in one batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .runtime import AdapterRuntime, RowAdapters


@dataclass
class Generation:
    adapter: Any              # the row's adapters as given (name, None or {name: weight})
    text: str
    token_ids: list[int]      # generated tokens only, up to (not including) EOS


def pad_id(tokenizer: Any) -> int:
    """The pad token id, or EOS for tokenizers without one (Llama-style)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def generate(
    runtime: AdapterRuntime,
    tokenizer: Any,
    prompts: Sequence[str],
    adapters: Sequence[RowAdapters],
    *,
    max_new_tokens: int = 32,
    chat: bool = False,
    kernel: str = "auto",
    **generate_kwargs: Any,
) -> list[Generation]:
    """Greedy by default. Prompts are tokenised as is (the chat template only with chat=True)."""
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
    eos = tokenizer.eos_token_id
    pad = pad_id(tokenizer)
    generate_kwargs.setdefault("do_sample", False)
    with torch.no_grad(), runtime.batch(list(adapters), kernel=kernel):
        out = runtime.model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad, **generate_kwargs)
    results = []
    for row, entry in zip(out[:, enc["input_ids"].shape[1]:].tolist(), adapters):
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        results.append(Generation(entry, tokenizer.decode(row, skip_special_tokens=True), row))
    return results
