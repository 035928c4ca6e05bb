"""LT-SFT (Ansell et al. 2022, "Composable Sparse Fine-Tuning"): the two phases that make a sparse adapter.

  1. dense: a `full` adapter (a dense ΔW per selected matrix, methods/full.py) trains `dense_steps`;
  2. select: the K entries with the largest |θ − θ0| = |ΔW| over all matrices (one global threshold;
     K = `sparse_params`, or `sparse_proportion` of the selected matrices' entries, default 1 %);
  3. sparse: back to θ0 (the values start at 0) and only those K entries train, for the run's steps.
     They are the only parameters, so neither the gradient nor AdamW's weight decay can move any other
     entry; `l1` adds λ Σ |θ − θ0| to the loss (the pull toward θ0 of the paper's regularised variant).

A task head (classification, MLM) trains through both phases and is kept. The selection is recorded
in the lineage (K, threshold, dense steps). Resume is not offered for these runs yet.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

from ..core.adapter import Adapter, create_adapter
from ..core.base import Base
from ..errors import ConfigError
from ..methods.full import FullConfig
from ..methods.sparse import sparse_from_dense

DEFAULT_PROPORTION = 0.01


@dataclass(frozen=True)
class SftOptions:
    sparse_params: int | None = None          # K; or
    sparse_proportion: float | None = None    # K as a share of the selected matrices' entries (default 1 %)
    dense_steps: int | None = None            # phase 1 (default: the run's steps)
    l1: float = 0.0                           # λ of the L1 pull toward θ0 in phase 2

    def __post_init__(self) -> None:
        if self.sparse_params is not None and self.sparse_proportion is not None:
            raise ConfigError("give --sparse-params or --sparse-proportion, not both")
        if self.dense_steps is not None and self.dense_steps < 1:
            raise ConfigError(f"--dense-steps must be >= 1, got {self.dense_steps}")
        if self.l1 < 0:
            raise ConfigError(f"--l1 must be >= 0, got {self.l1}")

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> "SftOptions":
        return cls(**{k: v for k, v in (options or {}).items() if v is not None})


def fit_lt_sft(fit: Callable, base: Base, adapter: Adapter, examples: Sequence[Any], collate: Callable,
               loss_fn: Callable, config: Any, *, sft: SftOptions, run_info: dict[str, Any] | None = None,
               **kwargs: Any) -> tuple[Any, Any]:
    """The two phases around `fit` (train/fit.fit); `adapter` is the (empty) sparse adapter, filled here.
    `run_info` (the caller's dict, recorded in the lineage) gets the selection: K, threshold, dense steps."""
    if kwargs.get("resume"):
        raise ConfigError("--resume is not offered for sparse (LT-SFT) runs yet: run again without it")
    sites = tuple(adapter.tensors)
    dense = create_adapter(f"{adapter.name}.dense", base.model, FullConfig(target_modules=sites),
                           seed=config.seed, fingerprint=base.fingerprint)
    dense_kwargs = {**kwargs, "evaluate": None, "log_path": None}        # its own run folder and log
    dense_steps = sft.dense_steps or config.steps
    phase1 = replace(config, steps=dense_steps, warmup_steps=min(config.warmup_steps, dense_steps), eval_every=0,
                     checkpoint_every=0)
    fit(base, dense, examples, collate, loss_fn, phase1, run_info={**(run_info or {}), "phase": "dense"},
        **dense_kwargs)
    from .fit import run_dir

    shutil.rmtree(run_dir(kwargs["store"], dense.name), ignore_errors=True)     # its checkpoint is not kept
    deltas = {site: dense.tensors[site]["delta"].detach().float().cpu() for site in sites}
    proportion = None if sft.sparse_params is not None else (sft.sparse_proportion or DEFAULT_PROPORTION)
    chosen, threshold = sparse_from_dense(deltas, k=sft.sparse_params, proportion=proportion)
    del dense, deltas
    device = next(iter(next(iter(adapter.tensors.values())).values())).device
    adapter.tensors = {site: {"indices": t["indices"].to(device), "values": torch.zeros_like(t["values"]).to(device),
                              "shape": t["shape"]} for site, t in chosen.items()}         # back to θ0
    k = sum(int(t["indices"].numel()) for t in chosen.values())
    if run_info is not None:                      # the caller's dict: its lineage records the selection
        run_info["lt_sft"] = {"dense_steps": dense_steps, "k": k, "threshold": threshold, "l1": sft.l1}

    def sparse_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        loss = loss_fn(model, batch)
        if sft.l1:                                  # the adapter's current tensors (training re-places them)
            loss = loss + sft.l1 * sum(p["values"].abs().sum() for p in adapter.tensors.values())
        return loss
    return fit(base, adapter, examples, collate, sparse_loss, config, run_info=run_info, **kwargs)
