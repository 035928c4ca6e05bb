"""Instruction tuning end to end: JSONL records -> trainer -> loss / perplexity / exact match -> store."""

from __future__ import annotations

import math
from dataclasses import asdict
from functools import partial
from typing import Any, Mapping, Sequence

import torch

from ..core.adapter import Adapter
from ..core.base import Base, to_device
from ..core.generate import pad_id
from ..errors import ConfigError
from ..core.runtime import AdapterRuntime
from ..store import AdapterStore
from .causal_lm import IGNORE, collate, encode, generation_target
from .fit import finish, fit, method_info, run_lock, start_run
from .progress import RowProgress
from .defaults import selection_rows
from .trainer import TrainConfig, dist_rank_world


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


@torch.no_grad()
def evaluate_instructions(rt: AdapterRuntime, name: str, records: Sequence[Mapping[str, Any]], max_length: int,
                          batch_size: int = 8, progress: bool = False, exact: bool = True) -> dict[str, float]:
    """Completion-token loss and perplexity (token-weighted), and greedy exact match unless not
    `exact` (generation is the slow part; a progress bar over the records when `progress`)."""
    rows = score_records(rt, name, records, max_length, batch_size, progress, exact)
    total, count = sum(r["loss_sum"] for r in rows), sum(r["tokens"] for r in rows)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            **({"exact_match": sum(r["exact"] for r in rows) / len(records)} if exact else {}), "n": len(records)}


def score_records(rt: AdapterRuntime, name: str, records: Sequence[Mapping[str, Any]], max_length: int,
                  batch_size: int = 8, progress: bool = False, exact: bool = True) -> list[dict[str, Any]]:
    """Per record: loss_sum and tokens of its completion, and (unless not `exact`) whether greedy decoding
    reproduces the completion exactly."""
    tok = rt.tokenizer
    if tok is None or not records:
        raise ConfigError("evaluation needs a runtime built from a base with a tokenizer, and records")
    pad = pad_id(tok)
    out: list[dict[str, Any]] = []
    with RowProgress(len(records), progress) as bar:
        for start in range(0, len(records), batch_size):
            chunk = list(records[start:start + batch_size])
            batch = to_device(collate([encode(tok, r, max_length) for r in chunk], pad), rt.device)
            with rt.batch([name] * len(chunk)):
                logits = rt.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels,
                                                       ignore_index=IGNORE, reduction="none").sum(1)   # [B]
            counts = (labels != IGNORE).sum(1)
            rows = [{"loss_sum": float(s), "tokens": int(c), "exact": None} for s, c in zip(losses, counts)]
            for row, record in zip(rows, chunk if exact else ()):   # greedy exact match, one record at a time
                prompt, want = generation_target(tok, record)
                with rt.batch([name]):
                    gen = rt.model.generate(torch.tensor([prompt], device=rt.device),
                                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long,
                                                                      device=rt.device),
                                            max_new_tokens=len(want) + 1, do_sample=False, pad_token_id=pad)
                got = gen[0, len(prompt):].tolist()
                got = got[: got.index(tok.eos_token_id)] if tok.eos_token_id in got else got
                row["exact"] = got == want
            out.extend(rows)
            bar.advance(len(chunk))
    return out


def train_instructions(base: Base, name: str, train_records: Sequence[Mapping[str, Any]],
                       eval_records: Sequence[Mapping[str, Any]], *, task: str | None, store: AdapterStore,
                       config: TrainConfig, r: int = 8, alpha: float = 16.0, targets: Sequence[str] | None = None,
                       max_length: int = 512, overwrite: bool = False, progress: bool = True, resume: bool = False,
                       log_path: str | None = None, select_rows: int | None = None,
                       method: str = "lora", method_options: dict[str, Any] | None = None,
                       compatible_with: Adapter | None = None,
                       compat_weight: float = 1.0) -> tuple[Adapter, dict[str, float]]:
    """select_rows: eval records (a seeded sample) of the best-checkpoint checks, scored by loss only;
    method: the adapter family (fit.adapter_config); compatible_with: the version users have now, whose
    right next-token predictions the update keeps (compatible.CompatLMLoss)."""
    if base.kind != "causal-lm" or base.tokenizer is None:
        raise ConfigError(f"instruction tuning needs a causal LM with a tokenizer; {base.name} is a {base.kind}")
    with run_lock(store, name):      # one run per name: a second trainer fails here
        adapter = start_run(base, name, task=task, store=store, config=config, r=r, alpha=alpha, targets=targets,
                            overwrite=overwrite, resume=resume, method=method,
                            options=method_options)
        tok = base.tokenizer
        encoded = [encode(tok, rec, max_length) for rec in train_records]
        truncated = sum(e.truncated for e in encoded)
        info = {"objective": "causal-lm", **method_info(adapter),
                "targets": list(adapter.config.target_modules), "max_length": max_length}
        checks = selection_rows(eval_records, select_rows, config.seed)         # best-checkpoint rows
        score = ((lambda rt: -evaluate_instructions(rt, name, checks, max_length, exact=False)["loss"])
                 if eval_records else None)
        loss, teachers = lm_loss, []
        if compatible_with is not None:              # MUSCLE for an LM: keep the old version's right tokens
            import copy

            from ..merge.common import content_fingerprint
            from .compatible import CompatLMLoss

            if compatible_with.head is not None:
                raise ConfigError(f"--compatible-with {compatible_with.name!r}: it is a classifier; an instruction "
                                  "adapter updates an instruction adapter")
            old = copy.copy(compatible_with)
            old.name = f"{name}.old"
            teachers, loss = [old], CompatLMLoss(old.name, compat_weight)
            info["compatible_with"] = {"name": compatible_with.name,
                                       "fingerprint": content_fingerprint(compatible_with), "weight": compat_weight}
        rt, result = fit(base, adapter, encoded, partial(collate, pad_id=pad_id(tok)), loss, config, store=store,
                         resume=resume, log_path=log_path, progress=progress, evaluate=score,
                         lengths=[len(e.input_ids) for e in encoded], run_info=info,
                         sft=(method_options or {}) if method == "sparse" else None, eval_name="validation loss",
                         eval_negated=True, teachers=teachers)
        shown = progress and dist_rank_world()[0] == 0           # the final scoring: a bar on rank 0
        metrics = evaluate_instructions(rt, name, eval_records, max_length, progress=shown) if eval_records else {}
        finish(store, adapter, metrics, {**asdict(config), **info, "train_examples": len(encoded),
                                         "truncated_examples": truncated, "best_step": result.best_step}, overwrite)
        return adapter, metrics
