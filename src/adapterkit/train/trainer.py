"""One method-agnostic training loop: only the adapter's tensors train, whatever the method.

The loop never looks at the method: it asks the adapter for its tensors, makes them trainable,
activates the adapter on every row and minimises `loss_fn(model, batch)`. Data order is a pure
function of (seed, step), and so is every random draw (the global RNG is seeded per micro-batch),
so a run resumed from a checkpoint replays the same batches, masks and dropout, and the same loss
curve as an uninterrupted one.

Devices and dtypes: the adapter's tensors train on the base's device in float32 (master weights, also
on a bf16 or fp16 base: the LoRA kernel runs them in fp32 and casts its output to the base dtype) and
go back to where they were when training ends; batches are moved to that device. `bf16` is autocast:
fp32 weights, bf16 matmuls on the base's device; a `--dtype bfloat16` base instead stores the frozen
weights in bf16 (half the memory). They combine; with a bf16 base, autocast changes little.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .._atomic import atomic_write_dir, atomic_write_text
from ..core.base import to_device
from ..errors import ConfigError
from ..core.runtime import AdapterRuntime
from ..formats.safetensors_io import read_tensors, write_tensors
from .schedule import SCHEDULES, lr_factor

STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    head_lr: float | None = None       # lr of extra_params (a task head trained from scratch); None: lr
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    max_grad_norm: float | None = 1.0
    seed: int = 0
    checkpoint_every: int = 0          # 0 = only at the end
    eval_every: int = 0                # 0 = no evaluation during training
    bf16: bool = False                 # autocast the forward to bfloat16 on the base's device
    # stored adapters applied (frozen, weight 1) under the one that trains: a task adapter learns relative
    # to base + a domain or language adapter (MAD-X); at inference stack them again (a row {d: 1, t: 1})
    stack_on: tuple[str, ...] = ()
    # quantization-aware training (qat.py): the adapter's float matrices train at this many bits (1, 2, 4,
    # 8; one scale per group_size values) and are stored packed; None: float
    bits: int | None = None
    group_size: int = 64
    # LoRA's initialisation: "default" (the family's), or CorDA's (corda.py: "corda-ipm", "corda-kpm") from the
    # input covariance of `calibration_rows` training rows
    init: str = "default"
    calibration_rows: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "stack_on", tuple(self.stack_on))     # JSON (a checkpoint) gives a list
        if self.bits is not None:
            from ..codecs import LowBit

            LowBit(self.bits, self.group_size)                          # ConfigError naming a bad value
        if self.init not in ("default", "corda-ipm", "corda-kpm"):
            raise ConfigError(f"unknown init {self.init!r}; use default, corda-ipm or corda-kpm")
        if self.init != "default" and self.bits is not None:
            raise ConfigError(f"--init {self.init} and --bits do not combine: CorDA's adapter is stored as a float "
                              "rank-2r LoRA; quantize it afterwards with `adapter quantize`")
        if self.calibration_rows < 1:
            raise ConfigError(f"calibration_rows must be >= 1, got {self.calibration_rows}")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise ConfigError("eval_every and checkpoint_every must be >= 0")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if (value is not None or name == "lr") and not (isinstance(value, (int, float)) and value > 0
                                                            and math.isfinite(value)):
                raise ConfigError(f"{name} must be a positive number, got {value}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; use one of {SCHEDULES}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)     # one per optimizer step, from step 0
    steps_done: int = 0
    evals: list[tuple[int, float]] = field(default_factory=list)   # (steps done, metric)
    best_step: int | None = None      # the tensors left in the adapter are from this step


class BatchPlan:
    """Example indices of every micro-batch, a pure function of (seed, micro_step).

    Each epoch is a seeded permutation, laid end to end with the next. With `lengths`, the
    permutation is cut into windows of `window` batches, each window sorted by length and cut
    into batches, and the batches shuffled (seeded): rows of a batch have similar lengths, so
    little compute goes to padding, while the order stays random at batch granularity.
    """

    def __init__(self, n_examples: int, batch_size: int, seed: int, lengths: Sequence[int] | None = None,
                 window: int = 50) -> None:
        if lengths is not None and len(lengths) != n_examples:
            raise ConfigError(f"{len(lengths)} lengths for {n_examples} examples")
        self.n, self.batch_size, self.seed, self.window = n_examples, batch_size, seed, window
        self.lengths = list(lengths) if lengths is not None else None
        self._epochs: dict[int, list[int]] = {}

    def epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.n, generator=gen).tolist()
            if self.lengths is not None:
                span = self.batch_size * self.window
                batches = []
                for w in range(0, self.n, span):
                    chunk = sorted(order[w:w + span], key=lambda i: self.lengths[i])
                    batches += [chunk[b:b + self.batch_size] for b in range(0, len(chunk), self.batch_size)]
                shuffled = torch.randperm(len(batches), generator=gen).tolist()
                order = [i for k in shuffled for i in batches[k]]
            self._epochs = {epoch: order}          # keep one epoch: steps walk forward
        return self._epochs[epoch]

    def indices(self, micro_step: int) -> list[int]:
        out: list[int] = []
        start = micro_step * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = divmod(start + len(out), self.n)
            out.extend(self.epoch_order(epoch)[offset: offset + self.batch_size - len(out)])
        return out


def train(
    runtime: AdapterRuntime,
    adapter_name: str,
    examples: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    log_path: str | Path | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,   # gets each step's log record
    extra_params: Sequence[torch.Tensor] = (),
    evaluate: Callable[[], float] | None = None,
    lengths: Sequence[int] | None = None,
    run_info: dict[str, Any] | None = None,
    freeze_adapter: bool = False,
) -> TrainResult:
    """Minimise loss_fn over `examples` with only the adapter's tensors (and `extra_params`, e.g.
    a task head's) trainable; `freeze_adapter`: only the extra_params (a vision-language adapter's projector
    alone: its language-model LoRA stays at its init, B = 0, so the language model is the base's).
    Checkpoints hold both; resume continues from the last one.
    `lengths` (one per example, any unit) turns on length-bucketed batches (BatchPlan).

    With `evaluate` (higher is better) and config.eval_every, the model is scored every N steps and
    at the end; the best-scoring tensors are kept and left in the adapter when training ends.
    `run_info` (JSON: data size, rank, targets...) is saved in checkpoints; resume refuses a
    checkpoint whose run_info or config differ, naming the fields.
    """
    if not examples:
        raise ConfigError("no training examples")
    runtime.slot(adapter_name)                       # a clear error for an unknown name
    device = runtime.device
    away = [tuple(t.shape) for t in extra_params if t.device != device]
    if away:
        raise ConfigError(f"extra_params of shapes {away} are not on the base's device {device}; move them there")
    adapter = runtime.remove(adapter_name)
    home = next((t.device for parts in adapter.tensors.values() for t in parts.values()), device)
    _place(adapter, device, torch.float32)           # fp32 master weights on the base's device
    kinds = adapter.method.tensor_kinds(adapter.config)   # only trainable tensors learn (an index never does)
    _tie(adapter)                                    # shared tensors (ScaLearn++): one parameter each
    params = [] if freeze_adapter else list({id(t): t.requires_grad_(True) for parts in adapter.tensors.values()
                                             for k, t in parts.items() if kinds[k].trainable}.values())
    if freeze_adapter and not extra_params:
        raise ConfigError("freeze_adapter leaves nothing to train: pass extra_params")
    qat = None
    if config.bits is not None:                      # the forward reads q(w); the optimizer updates w
        from ..codecs import LowBit
        from .qat import QuantAware

        qat = QuantAware(LowBit(config.bits, config.group_size), adapter, params)
        params = qat.optimized(params)
    runtime.add(adapter)                             # re-attached trainable: the forward reads these tensors
    head = [t.requires_grad_(True) for t in extra_params]
    # Two groups: the adapter at lr, the extra tensors (a head trained from scratch) at head_lr.
    groups = ([(params, config.lr)] if params else []) + ([(head, config.head_lr or config.lr)] if head else [])
    peaks = [peak for _, peak in groups]
    optimizer = torch.optim.AdamW([{"params": g} for g, _ in groups], lr=config.lr, weight_decay=config.weight_decay)
    params += head
    result, start = TrainResult(), 0
    run_info = {**(run_info or {}), "examples": len(examples), "shapes": [list(p.shape) for p in params]}
    best: tuple[float, int, list[torch.Tensor]] | None = None
    if resume:
        if checkpoint_dir is None or not (Path(checkpoint_dir) / STATE_JSON).is_file():
            raise ConfigError(f"cannot resume: no checkpoint in {checkpoint_dir}")
        start, best = _load_state(Path(checkpoint_dir), params, optimizer, config, run_info, result)
        if qat is not None:
            qat.requantize()
    runtime.activate(adapter_name)
    model = runtime.model
    was_training = model.training
    train_mode(model)
    rank, world = dist_rank_world()
    writer = rank == 0                               # under torchrun only rank 0 writes the log and checkpoints
    if log_path and resume and writer:
        _truncate_log(Path(log_path), start)         # steps after the checkpoint are logged again
    log = None
    if log_path and writer:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "a", encoding="utf-8")
    plan = BatchPlan(len(examples), config.batch_size, config.seed, lengths)
    if config.batch_size % world:
        raise ConfigError(f"batch_size {config.batch_size} must be a multiple of the {world} processes")
    try:
        for step in range(start, config.steps):
            t0, tokens = time.perf_counter(), 0
            factor = lr_factor(step, config.steps, config.warmup_steps, config.schedule)
            for group, peak in zip(optimizer.param_groups, peaks):
                group["lr"] = peak * factor
            total = 0.0
            for micro in range(config.grad_accum):
                idx = plan.indices(step * config.grad_accum + micro)
                idx = idx[rank::world]                # multi-process: this rank's share of the global batch
                # Random draws in collate (MLM masks) and the forward (dropout) are a pure function of
                # (seed, micro step, rank): a resumed run replays them exactly.
                torch.manual_seed((config.seed * 1_000_003 + step * config.grad_accum + micro) * 64 + rank)
                batch = to_device(collate([examples[i] for i in idx]), device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    loss = loss_fn(model, batch) / config.grad_accum
                loss.backward()
                total += float(loss.detach())
                tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
            if qat is not None:
                qat.move_grads()
            if world > 1:
                _all_reduce_mean(params, world)
                total = _mean_across(total, world)
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if qat is not None:
                qat.requantize()
            result.losses.append(total)
            dt = time.perf_counter() - t0
            record = {"step": step, "loss": total, "lr": optimizer.param_groups[0]["lr"],
                      "tokens_per_s": tokens / dt if dt > 0 else None, "seconds": dt}
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if on_step is not None:
                on_step(record)
            done = step + 1
            if evaluate is not None and config.eval_every and (done % config.eval_every == 0 or done == config.steps):
                model.eval()
                with torch.no_grad():
                    metric = float(evaluate())
                train_mode(model)
                result.evals.append((done, metric))
                if best is None or metric > best[0]:
                    best = (metric, done, [p.detach().clone() for p in params])
            if checkpoint_dir is not None and writer and (done == config.steps or
                                               (config.checkpoint_every and done % config.checkpoint_every == 0)):
                _save_state(Path(checkpoint_dir), done, result, best, params, optimizer, config, run_info)
        result.steps_done = config.steps
        if best is not None:
            with torch.no_grad():
                for p, kept in zip(params, best[2]):
                    p.copy_(kept)
            result.best_step = best[1]
        if qat is not None:
            qat.finish(adapter)                      # packed; its tensors the values the codes read back
        else:
            adapter.packed = None                    # trained as floats: any earlier packing is stale
    finally:
        if log is not None:
            log.close()
        runtime.deactivate()
        model.train(was_training)
        for p in params:
            p.requires_grad_(False)
        for parts in adapter.tensors.values():        # with --bits the forward's tensors are not in params
            for t in parts.values():
                t.requires_grad_(False)
        runtime.remove(adapter_name)
        _place(adapter, home)
        runtime.add(adapter)                         # frozen again, fast-kernel stacks re-copied
    return result


def _place(adapter: Any, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Put the adapter's tensors on `device`, its floats in `dtype` (integers keep theirs), in place in its
    tensor dict."""
    for parts in adapter.tensors.values():
        for key, t in parts.items():
            parts[key] = t.to(device=device, dtype=dtype or t.dtype) if t.is_floating_point() else t.to(device)


def _tie(adapter: Any) -> None:
    """Make each group of tensors the family trains as one (Method.tied) one tensor object: the first
    site's, started from the group's mean (equal at creation; a loaded adapter may have drifted)."""
    for key, sites in adapter.method.tied(adapter.config, list(adapter.tensors)):
        first = adapter.tensors[sites[0]][key]
        with torch.no_grad():
            first.copy_(torch.stack([adapter.tensors[s][key] for s in sites]).mean(0))
        for site in sites[1:]:
            adapter.tensors[site][key] = first


def init_distributed_from_env() -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1 in the environment) join the gloo process group once."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist_rank_world()


def finish_distributed() -> None:
    """Leave the process group together: a barrier first, so no rank tears gloo down while another
    still talks to it (that race aborts a process with "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) under torchrun / torch.distributed, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_mean(params: Sequence[torch.Tensor], world: int) -> None:
    """Average the gradients of the trainable (adapter) tensors only, in one flat all-reduce: the
    frozen base has no gradients and is never communicated (what DDP would do for these tensors)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def _mean_across(value: float, world: int) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world


def train_mode(model: torch.nn.Module) -> None:
    """Training mode (dropout on) with the base's normalisation statistics frozen: a BatchNorm in train mode
    would normalise by the batch and overwrite its running mean and variance, i.e. change the frozen base
    (an image base's; transformers use LayerNorm, which has none)."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _truncate_log(path: Path, start: int) -> None:
    """Keep the JSONL records of steps before `start` (the resumed run rewrites the rest)."""
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) < start]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _save_state(folder: Path, step: int, result: TrainResult, best, params, optimizer, config: TrainConfig,
                run_info: dict[str, Any]) -> None:
    """Trainable tensors, AdamW moments, the step, the loss/eval history and the best-so-far tensors,
    written atomically as one folder (a failed write, e.g. a full disk, keeps the previous one)."""
    tensors: dict[str, torch.Tensor] = {}
    steps: dict[str, float] = {}
    for i, p in enumerate(params):
        tensors[f"param.{i}"] = p.detach()
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"{key}.{i}"] = state[key]
        if "step" in state:
            steps[str(i)] = float(state["step"])
    if best is not None:
        tensors.update({f"best.{i}": t for i, t in enumerate(best[2])})

    def write(tmp: Path) -> None:
        write_tensors(tmp / STATE_TENSORS, tensors)
        (tmp / STATE_JSON).write_text(json.dumps({
            "type": "adapterkit.trainer_state", "format_version": 1, "step": step, "losses": result.losses,
            "evals": result.evals, "best": None if best is None else {"metric": best[0], "step": best[1]},
            "adam_steps": steps, "config": asdict(config), "run_info": run_info}), encoding="utf-8")
    atomic_write_dir(folder, write)


def _load_state(folder: Path, params, optimizer, config: TrainConfig, run_info: dict[str, Any],
                result: TrainResult):
    """Restore a checkpoint into params/optimizer/result; returns (step, best)."""
    meta = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    saved = TrainConfig(**meta["config"])
    if saved != config:
        changed = sorted(k for k, v in asdict(config).items() if asdict(saved)[k] != v)
        raise ConfigError(f"the checkpoint in {folder} was made with other settings ({', '.join(changed)}: "
                          f"{', '.join(f'{getattr(saved, k)!r} vs {getattr(config, k)!r}' for k in changed)}); "
                          "resume with the same settings, or start over without resume")
    saved_info = json.loads(json.dumps(meta.get("run_info", {})))
    now = json.loads(json.dumps(run_info))            # tuples -> lists, as saved
    changed = sorted(k for k in set(saved_info) | set(now) if saved_info.get(k) != now.get(k))
    if changed:
        raise ConfigError(f"the checkpoint in {folder} belongs to another run (different {', '.join(changed)}); "
                          "resume with the same data and adapter settings, or start over without resume")
    tensors = read_tensors(folder / STATE_TENSORS)
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])
            if f"exp_avg.{i}" in tensors:
                optimizer.state[p] = {"step": torch.tensor(meta["adam_steps"][str(i)]),
                                      "exp_avg": tensors[f"exp_avg.{i}"].to(p.device, copy=True),
                                      "exp_avg_sq": tensors[f"exp_avg_sq.{i}"].to(p.device, copy=True)}
    result.losses = list(meta["losses"])
    result.evals = [tuple(e) for e in meta.get("evals", [])]
    best = None
    if meta.get("best") is not None:
        best = (meta["best"]["metric"], meta["best"]["step"],
                [tensors[f"best.{i}"].to(p.device, copy=True) for i, p in enumerate(params)])
    return int(meta["step"]), best
