"""Causal-LM instruction examples -> token ids with the loss on the completion only.

An example is {"prompt", "completion"} (tokenised as is, concatenated) or {"messages": [...]}
(rendered with the base's chat template; the loss covers the last assistant message). Labels are
-100 on prompt tokens and padding, the ids elsewhere (transformers shifts them inside the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..errors import ConfigError

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]          # IGNORE on prompt tokens
    truncated: bool            # True when the example was cut to max_length


def split_ids(tokenizer: Any, example: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) for one example."""
    if "messages" in example:
        messages = list(example["messages"])
        if not messages or messages[-1].get("role") != "assistant":
            raise ConfigError("a chat example must end with an assistant message (the completion to learn)")
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ConfigError("the chat template renders the prompt differently inside the full chat; "
                              "use {prompt, completion} examples for this tokenizer")
        prompt_text, completion_text = prompt, full[len(prompt):]
    elif "prompt" in example and "completion" in example:
        prompt_text, completion_text = str(example["prompt"]), str(example["completion"])
    else:
        raise ConfigError(f"an instruction example needs 'prompt' and 'completion' or 'messages'; "
                          f"got fields {sorted(example)}")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    # learn to stop: end with eos, unless the chat template's turn end ("<|im_end|>\n") already holds it
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in completion_ids:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids


def answer_text(example: Mapping[str, Any]) -> str:
    """The answer an instruction example teaches: its last assistant message, or its completion."""
    if "messages" in example and example["messages"]:
        return str(example["messages"][-1].get("content", "")).strip()
    return str(example.get("completion", "")).strip()


def generation_target(tokenizer: Any, example: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """(prompt ids, the ids greedy generation must give before it stops): the completion up to its first
    end-of-sequence token. A chat template renders the turn's end after the answer ("Positive<|im_end|>\n"),
    and generation stops at that token, so what follows it is not part of the answer."""
    prompt, completion = split_ids(tokenizer, example)
    eos = tokenizer.eos_token_id
    return prompt, completion[: completion.index(eos)] if eos in completion else completion


def encode(tokenizer: Any, example: Mapping[str, Any], max_length: int) -> Encoded:
    """Tokenise one example; too long -> keep the prompt's end and the completion's start."""
    prompt, completion = split_ids(tokenizer, example)
    truncated = len(prompt) + len(completion) > max_length
    if truncated:
        keep_completion = min(len(completion), max(1, max_length // 2))
        keep_prompt = max_length - keep_completion
        prompt, completion = prompt[len(prompt) - keep_prompt:] if keep_prompt else [], completion[:keep_completion]
    return Encoded(prompt + completion, [IGNORE] * len(prompt) + completion, truncated)


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels [B, T]."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
