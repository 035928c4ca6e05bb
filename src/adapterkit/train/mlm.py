"""Masked-LM training on plain text: language / domain adapters for encoders (BERT-style).

Text -> token ids (cut to max_length, cuts counted) -> BERT's masking in collate (15% of the real,
non-special tokens; of those 80% [MASK], 10% a random token, 10% unchanged; at least one per row)
-> the base's hidden states -> MLMHead (heads.py: a fresh head whose decoder is tied to the base's
frozen word embeddings) -> cross-entropy on the masked tokens only.

Training masks are drawn from the global torch RNG, which the trainer seeds per micro-batch, so a
resumed run replays them; evaluation masks come from a fixed seeded generator, so the same adapter
always gets the same score.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from ..core.adapter import Adapter
from ..core.base import Base, to_device
from ..data.readers import DataFormatError, jsonl_objects, text_value
from ..errors import ConfigError
from ..core.generate import pad_id
from ..core.heads import MLMHead
from ..core.runtime import AdapterRuntime
from ..store import AdapterStore
from .causal_lm import IGNORE
from .fit import finish, fit, method_info, run_lock, start_run
from .progress import RowProgress
from .defaults import selection_rows
from .trainer import TrainConfig, dist_rank_world

MASK_PROB = 0.15
TEXT_SUFFIXES, JSONL_SUFFIXES = (".txt", ".text"), (".jsonl", ".ndjson", ".json")


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents of a .txt file (one per non-empty line) or a JSONL file (objects with `text_field`).
    A bad line raises DataFormatError whose message starts with path:line:."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
        raise DataFormatError(f"{p}: cannot tell the format from the extension {p.suffix!r}; use .txt (one "
                              "document per line) or .jsonl (one object per line with a text field)")
    if not p.is_file():
        raise DataFormatError(f"{p}: no such file")
    texts: list[str] = []
    if suffix in TEXT_SUFFIXES:
        with open(p, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
                except UnicodeDecodeError as e:
                    raise DataFormatError(f"{p}:{lineno}: not valid UTF-8 (byte {e.start + 1})") from None
                if line:
                    texts.append(line)
    else:
        for lineno, obj in jsonl_objects(p):
            try:
                if isinstance(obj, str):
                    raise ValueError(obj)
                if text_field not in obj:
                    raise ValueError(f"missing field {text_field!r} (fields present: "
                                     f"{', '.join(repr(k) for k in obj) or 'none'}); pick it with --text-field")
                texts.append(text_value(obj[text_field], text_field))
            except ValueError as e:
                raise DataFormatError(f"{p}:{lineno}: {e}") from None
    if not texts:
        raise DataFormatError(f"{p}: no documents read (the file is empty)")
    return texts


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int, int]:
    """(token ids per document, documents cut to max_length, documents dropped). A document is
    dropped when it has no token that could be masked (only special / unknown tokens)."""
    if max_length < tokenizer.num_special_tokens_to_add() + 1:
        raise ConfigError(f"max_length {max_length} leaves no room for text next to the special tokens; "
                          "use a larger one")
    special = set(tokenizer.all_special_ids)
    # One token past the limit tells whether a document was cut, without holding huge documents.
    ids = tokenizer(list(texts), truncation=True, max_length=max_length + 1)["input_ids"]
    long = [i for i, row in enumerate(ids) if len(row) > max_length]
    if long:
        cut = tokenizer([texts[i] for i in long], truncation=True, max_length=max_length)["input_ids"]
        for i, row in zip(long, cut):
            ids[i] = row
    kept = [row for row in ids if any(t not in special for t in row)]
    return kept, len(long), len(ids) - len(kept)


class MaskCollator:
    """Token id lists -> {"input_ids", "attention_mask", "labels"} [B, T], right-padded, BERT-masked.

    Draws come from `generator` (None: the global RNG, which the trainer seeds per micro-batch)."""

    def __init__(self, tokenizer: Any, vocab_size: int, mask_prob: float = MASK_PROB) -> None:
        if tokenizer.mask_token_id is None:
            raise ConfigError("the tokenizer has no mask token; masked-LM training needs a BERT-style tokenizer")
        self.pad, self.mask, self.mask_prob = pad_id(tokenizer), tokenizer.mask_token_id, mask_prob
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)))      # [S]
        allowed = torch.ones(vocab_size, dtype=torch.bool)
        allowed[self.special[self.special < vocab_size]] = False
        self.random_ids = allowed.nonzero().squeeze(1)       # [V'] ids a random replacement may take

    def __call__(self, docs: Sequence[Sequence[int]],
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        b, t = len(docs), max(len(d) for d in docs)
        ids = torch.full((b, t), self.pad, dtype=torch.long)                    # [B, T]
        attention = torch.zeros((b, t), dtype=torch.long)                       # [B, T]
        for i, d in enumerate(docs):
            ids[i, :len(d)] = torch.tensor(d)
            attention[i, :len(d)] = 1
        maskable = attention.bool() & ~torch.isin(ids, self.special)            # [B, T]
        chosen = (torch.rand(b, t, generator=generator) < self.mask_prob) & maskable
        # A row left without a masked token gets one, chosen uniformly among its maskable tokens.
        pick = torch.rand(b, t, generator=generator).masked_fill(~maskable, -1.0).argmax(1)   # [B]
        empty = ~chosen.any(1) & maskable.any(1)
        chosen[empty, pick[empty]] = True
        how = torch.rand(b, t, generator=generator)                             # < .8 mask, < .9 random, else keep
        random = self.random_ids[torch.randint(len(self.random_ids), (b, t), generator=generator)]
        inputs = torch.where(chosen & (how < 0.8), torch.full_like(ids, self.mask), ids)
        inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), random, inputs)
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
        return {"input_ids": inputs, "attention_mask": attention, "labels": labels}


def masked_logits(model: torch.nn.Module, head: MLMHead, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [N, V] at the N masked positions only (the vocab projection is the costly part)."""
    body = getattr(model, "base_model", model)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return head.logits(hidden[batch["labels"] != IGNORE], model.get_input_embeddings().weight)


def mlm_loss(head: MLMHead):
    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        target = batch["labels"][batch["labels"] != IGNORE]
        return torch.nn.functional.cross_entropy(masked_logits(model, head, batch).float(), target)
    return loss


@torch.no_grad()
def evaluate_mlm(rt: AdapterRuntime, adapter: Adapter, texts: Sequence[str], max_length: int = 128,
                 batch_size: int = 16, seed: int = 0, progress: bool = False) -> dict[str, float]:
    """Masked-token loss (token-weighted), perplexity and top-1 accuracy, with masks from a fixed
    seeded generator: deterministic and independent of the global RNG. A progress bar over the
    documents when `progress`."""
    head = adapter.head
    if not isinstance(head, MLMHead):
        raise ConfigError(f"adapter {adapter.name!r} has no masked-LM head; train it with --objective mlm")
    if rt.tokenizer is None or not texts:
        raise ConfigError("evaluation needs a runtime built from a base with a tokenizer, and texts")
    docs, _, _ = encode_texts(rt.tokenizer, texts, max_length)
    if not docs:
        raise ConfigError("no evaluation text has a token that can be masked")
    collate, gen = MaskCollator(rt.tokenizer, head.bias.shape[0]), torch.Generator().manual_seed(seed)
    model, total, right, count = rt.model, 0.0, 0, 0
    was_training = model.training
    model.eval()                                      # no dropout: the same adapter, the same score
    try:
        with RowProgress(len(docs), progress) as bar:
            for start in range(0, len(docs), batch_size):
                batch = to_device(collate(docs[start:start + batch_size], generator=gen), rt.device)
                target = batch["labels"][batch["labels"] != IGNORE]                 # [N]
                with rt.batch([adapter.name] * batch["input_ids"].shape[0]):
                    logits = masked_logits(model, head, batch).float()              # [N, V]
                total += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
                right, count = right + int((logits.argmax(-1) == target).sum()), count + len(target)
                bar.advance(batch["input_ids"].shape[0])
    finally:
        model.train(was_training)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": right / count, "n": len(docs)}


def train_mlm(base: Base, name: str, train_texts: Sequence[str], eval_texts: Sequence[str], *, task: str | None,
              store: AdapterStore, config: TrainConfig, r: int = 8, alpha: float = 16.0,
              targets: Sequence[str] | None = None, max_length: int = 128, overwrite: bool = False,
              progress: bool = True, resume: bool = False, log_path: str | None = None,
              select_rows: int | None = None, method: str = "lora", method_options: dict[str, Any] | None = None
              ) -> tuple[Adapter, dict[str, float]]:
    """Train an adapter (`method`: lora or ia3) + a fresh MLM head on plain text and store both with metrics
    and lineage."""
    if base.kind != "encoder":
        fix = ("train an image task (--task textile-defects) on it" if base.kind == "image" else
               "use --objective causal-lm for it")
        raise ConfigError(f"masked-LM training needs an encoder base (BERT-style, e.g. minilm-l6); {base.name} is "
                          f"a {base.kind} model: {fix}")
    tok = base.tokenizer
    if tok is None or tok.mask_token_id is None:
        raise ConfigError(f"masked-LM training needs a tokenizer with a mask token; {base.name} has "
                          f"{'no tokenizer' if tok is None else 'none'}")
    positions = getattr(base.model.config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise ConfigError(f"max_length {max_length} is longer than the {positions} positions of {base.name}; "
                          f"use --max-length {positions} or less")
    with run_lock(store, name):      # one run per name: a second trainer fails here
        adapter = start_run(base, name, task=task, store=store, config=config, r=r, alpha=alpha, targets=targets,
                            overwrite=overwrite, resume=resume, method=method,
                            options=method_options)
        docs, truncated, dropped = encode_texts(tok, train_texts, max_length)
        if not docs:
            raise ConfigError("no training text has a token that can be masked")
        adapter.head = MLMHead.create(base.model.config, config.seed).to(base.device)   # trains beside the base
        info = {"objective": "mlm", **method_info(adapter),
                "targets": list(adapter.config.target_modules), "max_length": max_length, "mask_prob": MASK_PROB}
        checks = selection_rows(list(eval_texts), select_rows, config.seed)      # best-checkpoint rows
        score = (lambda rt: -evaluate_mlm(rt, adapter, checks, max_length)["loss"]) if eval_texts else None
        rt, result = fit(base, adapter, docs, MaskCollator(tok, adapter.head.bias.shape[0]), mlm_loss(adapter.head),
                         config, store=store, resume=resume, log_path=log_path, progress=progress,
                         extra_params=adapter.head.params(), evaluate=score, lengths=[len(d) for d in docs],
                         run_info=info,
                         sft=(method_options or {}) if method == "sparse" else None, eval_name="validation loss", eval_negated=True)
        shown = progress and dist_rank_world()[0] == 0           # the final scoring: a bar on rank 0
        metrics = evaluate_mlm(rt, adapter, eval_texts, max_length, progress=shown) if eval_texts else {}
        finish(store, adapter, metrics, {**asdict(config), **info, "train_examples": len(docs),
                                         "truncated_examples": truncated, "dropped_examples": dropped,
                                         "best_step": result.best_step}, overwrite)
        return adapter, metrics
