"""LT-SFT (Ansell et al. 2022, "Composable Sparse Fine-Tuning"): the two phases that make a sparse adapter.

  1. dense: a `full` adapter (a dense ΔW per selected matrix, methods/full.py) trains `dense_steps`;
  2. select: the K entries with the largest |θ − θ0| = |ΔW| over all matrices (one global threshold;
     K = `sparse_params`, or `sparse_proportion` of the selected matrices' entries, default 1 %);
  3. sparse: back to θ0 (the values start at 0) and only those K entries train, for the run's steps, at
     `sparse_lr` when given (else the run's lr: both phases at one lr, as the paper trains them).
     They are the only parameters, so neither the gradient nor AdamW's weight decay can move any other
     entry; `l1` adds λ Σ |θ − θ0| to the loss (the pull toward θ0 of the paper's regularised variant).

A task head (classification, MLM) trains through both phases and is kept. The selection is recorded
in the lineage (K, threshold, dense steps). The selection is saved in the run folder (fit.PHASE_STATE)
before phase 3 starts, so `--resume` continues phase 3 from its checkpoint (or from θ0 when it had
none yet) without training the dense phase again; a run stopped inside the dense phase starts over.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

import torch

from ..core.adapter import Adapter, create_adapter
from ..core.base import Base
from ..errors import ConfigError
from ..formats.safetensors_io import read_tensors, write_tensors
from ..methods.full import FullConfig
from ..methods.sparse import sparse_from_dense

DEFAULT_PROPORTION = 0.01


@dataclass(frozen=True)
class SftOptions:
    sparse_params: int | None = None          # K; or
    sparse_proportion: float | None = None    # K as a share of the selected matrices' entries (default 1 %)
    dense_steps: int | None = None            # phase 1 (default: the run's steps)
    l1: float = 0.0                           # λ of the L1 pull toward θ0 in phase 2
    sparse_lr: float | None = None            # phase 3's adapter lr (default: the run's; the head keeps its own)

    def __post_init__(self) -> None:
        if self.sparse_params is not None and self.sparse_proportion is not None:
            raise ConfigError("give --sparse-params or --sparse-proportion, not both")
        if self.dense_steps is not None and self.dense_steps < 1:
            raise ConfigError(f"--dense-steps must be >= 1, got {self.dense_steps}")
        if self.l1 < 0:
            raise ConfigError(f"--l1 must be >= 0, got {self.l1}")
        if self.sparse_lr is not None and not self.sparse_lr > 0:
            raise ConfigError(f"--sparse-lr must be > 0, got {self.sparse_lr}")

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> "SftOptions":
        return cls(**{k: v for k, v in (options or {}).items() if v is not None})


def fit_lt_sft(fit: Callable, base: Base, adapter: Adapter, examples: Sequence[Any], collate: Callable,
               loss_fn: Callable, config: Any, *, sft: SftOptions, run_info: dict[str, Any] | None = None,
               **kwargs: Any) -> tuple[Any, Any]:
    """The two phases around `fit` (train/fit.fit); `adapter` is the (empty) sparse adapter, filled here.
    `run_info` (the caller's dict, recorded in the lineage) gets the selection: K, threshold, dense steps."""
    from .fit import CHECKPOINT, PHASE_STATE, run_dir
    from .trainer import STATE_JSON, dist_rank_world

    sites = tuple(adapter.tensors)
    run = run_dir(kwargs["store"], adapter.name)
    if kwargs.get("resume") and (run / PHASE_STATE).is_file():
        chosen, selection = _read_selection(run / PHASE_STATE, sft, sites, kwargs.get("extra_params"))
    else:
        chosen, selection = _dense_phase(fit, base, adapter, examples, collate, loss_fn, config, sft, run_info,
                                         sites, kwargs)
        if dist_rank_world()[0] == 0:
            _write_selection(run / PHASE_STATE, chosen, selection, sft, kwargs.get("extra_params"))
    kwargs["resume"] = bool(kwargs.get("resume")) and (run / CHECKPOINT / STATE_JSON).is_file()
    device = next(iter(next(iter(adapter.tensors.values())).values())).device
    adapter.tensors = {site: {"indices": t["indices"].to(device),
                              "values": torch.zeros(t["indices"].shape, device=device), "shape": t["shape"]}
                       for site, t in chosen.items()}         # back to θ0
    if sft.sparse_lr is not None:
        selection = {**selection, "sparse_lr": sft.sparse_lr}
        config = replace(config, lr=sft.sparse_lr)
    if run_info is not None:                      # the caller's dict: its lineage records the selection
        run_info["lt_sft"] = selection

    def sparse_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        loss = loss_fn(model, batch)
        if sft.l1:                                  # the adapter's current tensors (training re-places them)
            loss = loss + sft.l1 * sum(p["values"].abs().sum() for p in adapter.tensors.values())
        return loss
    result = fit(base, adapter, examples, collate, sparse_loss, config, run_info=run_info, **kwargs)
    (run / PHASE_STATE).unlink(missing_ok=True)          # stored: nothing left to resume
    return result


def _dense_phase(fit: Callable, base: Base, adapter: Adapter, examples: Sequence[Any], collate: Callable,
                 loss_fn: Callable, config: Any, sft: SftOptions, run_info: dict[str, Any] | None,
                 sites: tuple[str, ...], kwargs: dict[str, Any]) -> tuple[dict, dict[str, Any]]:
    """Phases 1 and 2: train a dense ΔW per site, keep its K largest entries. Returns (the sparse
    tensors per site, the selection as the lineage records it)."""
    from .fit import run_dir

    dense = create_adapter(f"{adapter.name}.dense", base.model, FullConfig(target_modules=sites),
                           seed=config.seed, fingerprint=base.fingerprint)
    dense_kwargs = {**kwargs, "evaluate": None, "log_path": None, "resume": False}   # its own run folder and log
    dense_steps = sft.dense_steps or config.steps
    phase1 = replace(config, steps=dense_steps, warmup_steps=min(config.warmup_steps, dense_steps), eval_every=0,
                     checkpoint_every=0)
    fit(base, dense, examples, collate, loss_fn, phase1, run_info={**(run_info or {}), "phase": "dense"},
        **dense_kwargs)
    shutil.rmtree(run_dir(kwargs["store"], dense.name), ignore_errors=True)     # its checkpoint is not kept
    deltas = {site: dense.tensors[site]["delta"].detach().float().cpu() for site in sites}
    proportion = None if sft.sparse_params is not None else (sft.sparse_proportion or DEFAULT_PROPORTION)
    chosen, threshold = sparse_from_dense(deltas, k=sft.sparse_params, proportion=proportion)
    k = sum(int(t["indices"].numel()) for t in chosen.values())
    return chosen, {"dense_steps": dense_steps, "k": k, "threshold": threshold, "l1": sft.l1}


def _write_selection(path: Any, chosen: dict, selection: dict[str, Any], sft: SftOptions,
                     head: Sequence[torch.Tensor] | None) -> None:
    """The selected entries (indices and shapes per site), the head as the dense phase left it and how
    the entries were chosen, atomically."""
    tensors = {f"{site}.{part}": t[part] for site, t in chosen.items() for part in ("indices", "shape")}
    tensors.update({f"head.{i}": p for i, p in enumerate(head or ())})
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(tmp, tensors, {"selection": json.dumps(selection), "options": json.dumps(asdict(sft))})
    os.replace(tmp, path)


def _read_selection(path: Any, sft: SftOptions, sites: tuple[str, ...],
                    head: Sequence[torch.Tensor] | None) -> tuple[dict, dict[str, Any]]:
    """The interrupted run's selection (and its head, copied into `head`), refused when this run asks
    for another one."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    saved = json.loads(meta["options"])
    if saved != json.loads(json.dumps(asdict(sft))):
        changed = sorted(k for k in saved if saved[k] != asdict(sft)[k])
        raise ConfigError(f"the interrupted run selected its entries with other settings ({', '.join(changed)}: "
                          f"{', '.join(f'{saved[k]!r} vs {asdict(sft)[k]!r}' for k in changed)}); resume with the "
                          "same settings, or start over with --overwrite")
    tensors = read_tensors(path)
    chosen = {site: {"indices": tensors[f"{site}.indices"], "shape": tensors[f"{site}.shape"]}
              for site in sites if f"{site}.indices" in tensors}
    with torch.no_grad():
        for i, p in enumerate(head or ()):
            p.copy_(tensors[f"head.{i}"])
    return chosen, json.loads(meta["selection"])
