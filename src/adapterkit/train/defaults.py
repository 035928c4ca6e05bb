"""Training defaults per objective (DESIGN.md convention 11): what `adapterkit train` uses for every
flag the user leaves out, chosen by measurement (benchmarks/train_defaults_sweep.py on the two tuning tasks; the result
of the defaults themselves: benchmarks/train_defaults.py) so that a command with
only --base, --task / --train-file and --name gives an adapter worth keeping.

    objective        lr     head lr  batch  warm-up  steps                               selection
    classification   2e-3   1e-2     16     10 %     3 epochs, clamped to [50, 200]      best of 4 checks
                                                     (an encoder base: at most 150)
    causal-lm        1e-3   -        8      10 %     3 epochs, clamped to [50, 200]      best of 4 checks
    mlm              1e-3   -        16     10 %     1 epoch, clamped to [50, 200]       best of 4 checks
    vqa              1e-3   1e-2     16     10 %     1 epoch, clamped to [50, 300]       best of 4 checks

* The head is trained from scratch, so it gets its own, larger learning rate (the adapter starts at
  the base's function and moves slowly): on MiniLM + reuters-r8 at 200 steps, head lr 1e-2 instead of
  the adapter's 2e-3 raised macro-F1 from 0.834 to 0.942.
* Steps follow the data: a few epochs of a small set, at most `max_steps` on a large one, at least
  `min_steps` so a tiny set still trains. The cap is what the larger model needs: SmolLM2 +
  election-tweets scored 0.918 at 150 steps and 0.938 at 200; MiniLM + reuters-r8 0.971 at 120 and
  0.974 at 200, so a sentence encoder (mean-pooled, fast to adapt) stops at 150.
* With a validation split (a task's, or --eval-file) the run is scored every quarter of the steps on
  up to `select_rows` validation rows and the best-scoring tensors are kept (`--eval-every`); the
  final validation metrics use every row.
Every value a flag sets wins; the resolved values are printed and stored in the adapter's lineage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .trainer import TrainConfig


@dataclass(frozen=True)
class Recipe:
    lr: float
    head_lr: float | None       # None: the objective trains no head from scratch (lr for everything)
    batch_size: int
    warmup: float               # share of the steps
    epochs: float
    min_steps: int
    max_steps: int
    max_steps_encoder: int | None = None   # the cap on an encoder base (None: max_steps)
    checks: int = 4             # validation checks for the best checkpoint (0: none)
    select_rows: int = 256      # validation rows per check


RECIPES = {
    "classification": Recipe(lr=2e-3, head_lr=1e-2, batch_size=16, warmup=0.1, epochs=3, min_steps=50, max_steps=200,
                             max_steps_encoder=150),
    "causal-lm": Recipe(lr=1e-3, head_lr=None, batch_size=8, warmup=0.1, epochs=3, min_steps=50, max_steps=200),
    "mlm": Recipe(lr=1e-3, head_lr=None, batch_size=16, warmup=0.1, epochs=1, min_steps=50, max_steps=200),
    # a vision-language adapter (train/vqa.py): the language model's LoRA at causal-lm's lr, the projector (from
    # scratch) as its head at 1e-2: on the tuning questions (easy-vqa colour, validation, 100 steps; shape and yes/no
    # held out; benchmarks/results/vision_vqa_sweep.jsonl) head lr 1e-2 gave 0.675, 1e-3 about half that (0.337 on
    # test), standardised features 0.550
    "vqa": Recipe(lr=1e-3, head_lr=1e-2, batch_size=16, warmup=0.1, epochs=1, min_steps=50, max_steps=300),
}


# The families `train` trains, and the factor on the objective's adapter lr for each (the head's lr is
# the objective's). Measured on MiniLM + reuters-r8, 150 steps, head lr 1e-2 (test accuracy / macro-F1,
# benchmarks/results/train_defaults_sweep.jsonl): LoRA at 2e-3 0.970 / 0.928; IA3 0.956 / 0.861 at 2e-3,
# 0.967 / 0.923 at 1e-2, 0.971 / 0.917 at 3e-2 (a vector near 1 moves slowly at LoRA's lr); bottleneck
# (Pfeiffer, rf 16) 0.963 / 0.913 at 2e-3, 0.973 / 0.940 at 1e-2 (its up-projection starts at zero).
# sparse (LT-SFT: a dense phase over whole matrices, then K entries): see the same file.
# scalearn and fusion over the other five example tasks' MiniLM LoRAs (+ the cell's own few-shot LoRA), on the
# transfer benchmark's tuning task, rt-sentiment (256 rows, seed 0; validation accuracy of 486 rows;
# benchmarks/transfer.py --part sweep, results/transfer_sweep.jsonl): ScaLearn-vector is flat in its lr,
# 0.710 / 0.712 / 0.720 / 0.712 at 3e-3 / 1e-2 / 3e-2 / 1e-1 (kept: IA3's 5x, 1e-2); fusion 0.728 at 1e-4
# and at 5e-4, 0.603 at 2e-3 (its old default, LoRA's 1x), 0.504 at 5e-3 (diverged) -> 0.25x (5e-4), the
# larger of the two best (its d x d projections start at the identity and move far per step).
METHOD_LR = {"lora": 1.0, "ia3": 5.0, "bottleneck": 5.0, "sparse": 0.05, "scalearn": 5.0, "fusion": 0.25,
             "mora": 1.0}   # MoRA: LoRA's (rank-1 experts of the same scale; provisional, untuned)
TRAINABLE = tuple(METHOD_LR)
# Where a family's factor differs by base kind. Bottleneck on a causal LM: the MiniLM factor (5x, lr 1e-2)
# diverged on SmolLM2 (held-out rt-sentiment, benchmarks/methods.py: loss above chance, test 0.562 vs
# LoRA 0.842); re-chosen on SmolLM2's tuning task, election-tweets (150 steps of 16, head lr 1e-2, 300
# test rows, train_defaults_sweep.jsonl): 0.900 at 1e-2, 0.910 at 2e-3, 0.933 at 5e-4 -> 0.25x.
# A parallel bottleneck on an encoder: 1x (2e-3), chosen on MiniLM's tuning task chat-topics (validation
# 187 rows, benchmarks/methods_tune.py, results/methods_tune.jsonl; LoRA 0.781 / 0.651, Pfeiffer 0.781 /
# 0.651): at the bottleneck's 5x (1e-2) it collapsed to the majority class at scale 1 (0.273) and reached
# 0.583 at scale 4; at 1x, 0.765 / 0.633 at scale 4 and 0.797 / 0.708 at scale 1 (its scale there: 1,
# PARALLEL_SCALING_BY_KIND). Keys "method:placement" are looked up before the method's own.
METHOD_LR_BY_KIND = {("bottleneck", "causal-lm"): 0.25, ("bottleneck:parallel", "encoder"): 1.0}


# A parallel bottleneck's output scale s (y + s·f(x)) when --scaling is not given. On a causal LM, He et
# al.'s (2022) scaled parallel adapter, s = 4, chosen on SmolLM2's tuning task chat-topics (CLI defaults
# otherwise, validation 187 rows, benchmarks/methods_tune.py, results/methods_tune.jsonl): s = 1 0.701 /
# 0.510, s = 4 0.754 / 0.582 (accuracy / macro-F1; LoRA r=8 0.770 / 0.604). On an encoder 1 (see
# METHOD_LR_BY_KIND); on an image base 1 (not tuned). The library's BottleneckConfig keeps 1 (what it is
# given is what it computes).
PARALLEL_SCALING_BY_KIND = {"causal-lm": 4.0}


def parallel_scaling(base_kind: str) -> float:
    return PARALLEL_SCALING_BY_KIND.get(base_kind, 1.0)


# LT-SFT's sparse phase (train/sft.py) trains its K entries at this factor on the run's lr (the dense phase's)
# when --sparse-lr is not given. The dense phase is a full fine-tune and wants sparse's small lr (0.05x, 1e-4);
# the sparse phase trains 1 % of the entries from θ0 in as many steps. On SmolLM2's tuning task chat-topics
# (CLI defaults otherwise, validation 187 rows, benchmarks/methods_tune.py, results/methods_tune.jsonl): 1x
# (1e-4) 0.722 / 0.570, 10x (1e-3) 0.765 / 0.582 (accuracy / macro-F1; LoRA r=8 0.770 / 0.604). On
# an encoder 1x (MiniLM + reuters-r8 met the comparison's target at 1e-4 for both phases; not re-tuned).
SPARSE_PHASE_LR_BY_KIND = {"causal-lm": 10.0}


def sparse_phase_lr(run_lr: float, base_kind: str) -> float:
    return run_lr * SPARSE_PHASE_LR_BY_KIND.get(base_kind, 1.0)


# A further factor on LoRA's lr for a CorDA start (--init). IPM's A and B start as the weight's largest
# components (B = U·√S, not 0), so each step of A moves W by far more than from LoRA's B = 0 start: at
# LoRA's lr IPM fell 8 points under the default start on rt-sentiment at 50 steps. Chosen on a tuning task,
# SmolLM2 + election-tweets (50 steps, validation 643 rows; benchmarks/lowbit.py --part corda-tune,
# results/lowbit_corda_tune.jsonl): default start 0.868; IPM 0.843 at 2e-3, 0.879 at 5e-4, 0.841 at 1e-4
# -> 0.25x.
# KPM keeps the smallest components (a near-zero start, like LoRA's) and LoRA's lr.
INIT_LR = {"corda-ipm": 0.25}


def method_lr(method: str, base_kind: str, placement: str | None = None) -> float:
    """The factor on the objective's adapter lr for a family (a bottleneck: of its placement) on a base of
    `base_kind`."""
    if placement is not None and (f"{method}:{placement}", base_kind) in METHOD_LR_BY_KIND:
        return METHOD_LR_BY_KIND[f"{method}:{placement}", base_kind]
    return METHOD_LR_BY_KIND.get((method, base_kind), METHOD_LR[method])


@dataclass(frozen=True)
class Resolved:
    config: TrainConfig
    select_rows: int | None      # validation rows per check (None: all)
    chosen: dict[str, Any]       # flag -> value, for the flags the recipe filled in

    def describe(self) -> str:
        """One line for the console: the values the defaults chose."""
        c = self.config
        parts = []
        for key, text in (("steps", f"{c.steps} steps"), ("batch_size", f"batch {c.batch_size}"),
                          ("lr", f"lr {c.lr:g}"), ("head_lr", f"head lr {c.head_lr:g}" if c.head_lr else ""),
                          ("warmup", f"warm-up {c.warmup_steps} steps"),
                          ("eval_every", f"best of the checks every {c.eval_every} steps on "
                                         f"{self.select_rows or 'all'} validation rows" if c.eval_every else
                                         "no validation checks")):
            if key in self.chosen and text:
                parts.append(text)
        return ", ".join(parts)


def recipe(objective: str) -> Recipe:
    if objective not in RECIPES:
        raise ConfigError(f"unknown objective {objective!r}; use one of {', '.join(RECIPES)}")
    return RECIPES[objective]


def resolve(objective: str, n_train: int, has_eval: bool, *, base_kind: str = "causal-lm", method: str = "lora",
            placement: str | None = None, steps: int | None = None,
            batch_size: int | None = None, lr: float | None = None, head_lr: float | None = None,
            warmup: int | None = None, eval_every: int | None = None, **fixed: Any) -> Resolved:
    """A TrainConfig from the flags given (not None) and the objective's recipe for the rest, for a
    base of `base_kind` ("causal-lm" or "encoder"); `fixed` passes the other TrainConfig fields
    through (seed, schedule, grad_accum, ...)."""
    r = recipe(objective)
    cap = r.max_steps_encoder if base_kind == "encoder" and r.max_steps_encoder else r.max_steps
    chosen: dict[str, Any] = {}

    def pick(name: str, given: Any, default: Any) -> Any:
        if given is not None:
            return given
        chosen[name] = default
        return default

    batch_size = pick("batch_size", batch_size, r.batch_size)
    per_epoch = math.ceil(max(n_train, 1) / max(batch_size * int(fixed.get("grad_accum", 1)), 1))
    steps = pick("steps", steps, min(cap, max(r.min_steps, math.ceil(r.epochs * per_epoch))))
    if method not in METHOD_LR:
        raise ConfigError(f"`train` trains {', '.join(TRAINABLE)} adapters; {method!r} is not one of them")
    lr = pick("lr", lr, r.lr * method_lr(method, base_kind, placement) * INIT_LR.get(fixed.get("init", "default"), 1.0))
    head_lr = pick("head_lr", head_lr, r.head_lr)
    if isinstance(steps, int) and steps >= 1:
        warmup = pick("warmup", warmup, min(steps, round(r.warmup * steps)))
        eval_every = pick("eval_every", eval_every, max(1, steps // r.checks) if has_eval and r.checks else 0)
    select = r.select_rows if "eval_every" in chosen and eval_every else None
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, head_lr=head_lr, warmup_steps=warmup or 0,
                         eval_every=eval_every or 0, **fixed)
    return Resolved(config, select, chosen)


def selection_rows(rows: list[Any], n: int | None, seed: int = 0) -> list[Any]:
    """The validation rows of the best-checkpoint checks: all of them, or a seeded sample of n (not
    the first n: a file may be sorted by label)."""
    if n is None or len(rows) <= n:
        return list(rows)
    import random

    return [rows[i] for i in sorted(random.Random(f"adapterkit:select:{seed}").sample(range(len(rows)), n))]
