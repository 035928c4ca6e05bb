"""Classification with an adapter + a small head, for encoders, decoders and image bases alike.

The frozen base (with the adapter active) gives hidden states [B, T, H] from its transformer body
(`model.base_model`); the head pools them (mean for encoders, last token for decoders) and maps to
labels. Text batches are right-padded: {"input_ids", "attention_mask", "labels"}. An image base gives its
pooled features as one position, [B, 1, H]: {"pixel_values" [B, 3, S, S], "attention_mask" ones [B, 1],
"labels"}, so the same head (mean over one position) and the same loss serve both.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..core.base import to_device
from ..errors import ConfigError
from ..core.heads import ClassificationHead
from ..core.runtime import AdapterRuntime


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask [B, T]; texts longer than max_length are cut."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def collate_fn(tokenizer: Any, head: ClassificationHead, max_length: int) -> Callable[[list[Any]], dict]:
    """examples with .text and .label -> a padded batch with the head's label ids."""
    def collate(examples: list[Any]) -> dict[str, torch.Tensor]:
        return {**encode_texts(tokenizer, [e.text for e in examples], max_length),
                "labels": head.label_ids([e.label for e in examples])}
    return collate


def image_collate_fn(spec: Any, head: ClassificationHead) -> Callable[[list[Any]], dict]:
    """examples with .image (a path, bytes or PIL image) and .label -> pixels in the base's preprocessing."""
    from ..vision.images import pixels

    def collate(examples: list[Any]) -> dict[str, torch.Tensor]:
        return {"pixel_values": pixels([e.image for e in examples], spec),
                "attention_mask": torch.ones(len(examples), 1, dtype=torch.long),
                "labels": head.label_ids([e.label for e in examples])}
    return collate


def classifier_collate(owner: Any, head: ClassificationHead, max_length: int) -> Callable[[list[Any]], dict]:
    """The collate of a base or runtime: images through its processor (an image base), else texts through its
    tokenizer."""
    if getattr(owner, "processor", None) is not None:
        return image_collate_fn(owner.processor, head)
    if owner.tokenizer is None:
        raise ConfigError("the runtime has no tokenizer; build it with AdapterRuntime.from_base(base)")
    return collate_fn(owner.tokenizer, head, max_length)


def check_modality(base_kind: str, examples: Sequence[Any], what: str) -> None:
    """Refuse images for a text base and texts for an image base (ConfigError naming the fix)."""
    if not examples:
        return
    has_image = hasattr(examples[0], "image")
    if base_kind == "image" and not has_image:
        raise ConfigError(f"{what} are texts but the base is an image model; train an image task (textile-defects, "
                          "mnist-5k) on it, or texts on a text base (smollm2-135m, minilm-l6)")
    if base_kind != "image" and has_image:
        raise ConfigError(f"{what} are images but the base is a text model; use an image base (--base mobilenet-v2)")


def token_lengths(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Untruncated token count of every text (special tokens included): bucketing keys, and the
    count of texts longer than max_length that collate cuts."""
    return [len(ids) for ids in tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]]


def hidden_states(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T, H] from the transformer body (`model.base_model`: no LM head is computed); an image base's
    pooled features as one position, [B, 1, H]."""
    if "pixel_values" in batch:
        from ..vision.hf import image_features

        return image_features(model, batch["pixel_values"])[:, None, :]
    body = getattr(model, "base_model", model)
    return body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def logits(model: torch.nn.Module, head: ClassificationHead, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return head.logits(hidden_states(model, batch), batch["attention_mask"])


def loss_fn(head: ClassificationHead) -> Callable[[torch.nn.Module, dict], torch.Tensor]:
    return lambda model, batch: torch.nn.functional.cross_entropy(logits(model, head, batch), batch["labels"])


@torch.no_grad()
def predict_proba(runtime: AdapterRuntime, adapter_name: str | None, head: ClassificationHead,
                  examples: Sequence[Any], collate: Callable[[list[Any]], dict], batch_size: int = 32,
                  on_batch: Callable[[int], None] | None = None) -> tuple[list[str], torch.Tensor]:
    """(the head's label, the softmax over head.labels [N, L]) for every example, with the adapter
    (None: no adapter) active on every row; `on_batch(rows)` after each batch (a progress bar)."""
    out: list[str] = []
    probs: list[torch.Tensor] = []
    for start in range(0, len(examples), batch_size):
        batch = to_device(collate(list(examples[start:start + batch_size])), runtime.device)
        with runtime.batch([adapter_name] * batch["attention_mask"].shape[0]):
            z = logits(runtime.model, head, batch).float()                       # [B, L]
        out.extend(head.labels[i] for i in z.argmax(-1).tolist())
        probs.append(z.softmax(-1).cpu())
        if on_batch is not None:
            on_batch(z.shape[0])
    return out, torch.cat(probs) if probs else torch.zeros(0, len(head.labels))


def predict(runtime: AdapterRuntime, adapter_name: str | None, head: ClassificationHead, examples: Sequence[Any],
            collate: Callable[[list[Any]], dict], batch_size: int = 32) -> list[str]:
    """The head's label for every example, with the adapter (None: no adapter) active on every row."""
    return predict_proba(runtime, adapter_name, head, examples, collate, batch_size)[0]
