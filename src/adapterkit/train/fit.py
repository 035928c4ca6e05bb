"""What every `train_*` entry point shares: a fresh LoRA adapter, the run folder in the store
(checkpoint + JSONL log + loss-curve PNG), the progress bar, and storing the result.

The run folder is `<store>/runs/<name>/`: `checkpoint/` holds the last good trainer state (written
atomically every `checkpoint_every` steps), `train_log.jsonl` one record per step (or the --log
path) and `train_log.png` the loss curve, beside the log. Log and plot stay after the run; the
checkpoint lives until the adapter is safely in the store, so an interrupted run (Ctrl-C, a crash,
a full disk) continues with resume=True (`--resume`). A new run over a leftover checkpoint is
refused unless overwrite, so a checkpoint is never thrown away silently.

One run per name at a time: `run_lock` holds `<store>/runs/.locks/<name>.lock` (an OS lock, freed
when the process ends however it ends) around everything that reads or writes the run folder. A
second trainer of the name fails at once, before it deletes (--overwrite), resumes or writes anything.
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..core.adapter import Adapter, create_adapter, validate_name
from ..core.base import Base
from ..errors import AdapterkitError, ConfigError
from ..methods import get_method
from ..methods.bottleneck import BottleneckConfig
from ..methods.ia3 import Ia3Config
from ..methods.lora import LoraConfig
from ..methods.sparse import SparseConfig
from ..core.runtime import AdapterRuntime
from ..store import AdapterStore
from .defaults import parallel_scaling
from .filelock import LockHeld, file_lock
from .progress import TrainProgress
from .report import loss_plot_path, plot_unavailable, save_loss_plot
from .trainer import STATE_JSON, TrainConfig, TrainResult, dist_rank_world, train

from ..methods.ia3 import DEFAULT_TARGETS as _IA3_DEFAULTS
from ..vision.mobilenet import POINTWISE

IA3_TYPES = set(_IA3_DEFAULTS)
# LT-SFT's selection runs over every weight matrix of the layers (attention and MLP)
SPARSE_TARGETS = {"causal-lm": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                  "encoder": ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                              "output.dense")}
DEFAULT_TARGETS = {"causal-lm": ("q_proj", "k_proj", "v_proj", "o_proj"), "encoder": ("query", "key", "value"),
                   "image": POINTWISE}       # MobileNetV2's 1x1 convolutions (a full-name regex)
CHECKPOINT, LOG = "checkpoint", "train_log.jsonl"
# a run of several phases keeps what one phase hands the next here, until the adapter is stored
# (LT-SFT: the entries its dense phase selected, train/sft.py), so --resume can skip finished phases
PHASE_STATE = "phase_state.safetensors"


class RunInProgressError(AdapterkitError, RuntimeError):
    """Another process is training an adapter of the same name into the same store."""


def run_dir(store: AdapterStore, name: str) -> Path:
    return store.root / "runs" / validate_name(name)


def lock_path(store: AdapterStore, name: str) -> Path:
    return store.root / "runs" / ".locks" / f"{validate_name(name)}.lock"   # names never start with "."


@contextmanager
def run_lock(store: AdapterStore, name: str) -> Iterator[None]:
    """Hold the run lock of `name` for the block, or raise RunInProgressError at once. Re-entrant in
    one thread. Under torch.distributed it is a collective: rank 0 alone takes the lock and every rank
    gets its outcome, so all ranks fail together (none waits forever for a rank that stopped)."""
    path = lock_path(store, name)
    rank, world = dist_rank_world()
    with ExitStack() as stack:
        error = None
        if rank == 0:
            try:
                stack.enter_context(file_lock(path))
            except LockHeld as exc:
                error = (f"another run is training {name!r} into the store at {store.root}: it holds the lock "
                         f"{path}" + (f" ({exc.holder})" if exc.holder else "") + "; wait for it to end (the lock "
                         "is freed when that process exits, however it ends) or choose another --name")
        if world > 1:
            import torch.distributed as dist

            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            error = shared[0]
        if error is not None:
            raise RunInProgressError(error)
        yield


def check_run(store: AdapterStore, name: str, *, overwrite: bool, resume: bool) -> None:
    """Refuse a stored name (unless overwrite), a resume with no checkpoint, and a fresh run over a
    leftover checkpoint (unless overwrite, which deletes it). Cheap: callers run it before loading."""
    store.check_free(name, overwrite)
    run = run_dir(store, name)
    ckpt = run / CHECKPOINT
    saved = (ckpt / STATE_JSON).is_file() or (run / PHASE_STATE).is_file()
    if resume and not saved:
        raise ConfigError(f"nothing to resume: no checkpoint of a run named {name!r} in {run}")
    if not resume and saved:
        if not overwrite:
            step = checkpoint_step(ckpt)
            where = f"a checkpoint at step {step}" if step is not None else "the state of its finished phases"
            raise ConfigError(f"an interrupted run of {name!r} left {where} in {run}; pass --resume to continue "
                              "it, or --overwrite to start over")
        if dist_rank_world()[0] == 0:
            shutil.rmtree(run)


def checkpoint_step(folder: Path) -> int | None:
    state = folder / STATE_JSON
    return json.loads(state.read_text(encoding="utf-8"))["step"] if state.is_file() else None


def start_run(base: Base, name: str, *, task: str | None, store: AdapterStore, config: TrainConfig, r: int,
              alpha: float, targets: Sequence[str] | None, overwrite: bool, resume: bool,
              method: str = "lora", options: dict[str, Any] | None = None) -> Adapter:
    """Check the name and the run folder before any work; return the fresh (seeded) adapter.
    Call it, and everything up to `finish`, inside `run_lock(store, name)`."""
    check_run(store, name, overwrite=overwrite, resume=resume)
    if getattr(get_method(method), "composes", False):      # scalearn, fusion: over stored sources
        return _composition(base, name, store, method=method, seed=config.seed, task=task, **(options or {}))
    if (options or {}).get("continue_from"):     # a task after others: sequential LoRA, MoRA's new experts
        return _continued(base, name, store, method=method, seed=config.seed, task=task, **(options or {}))
    family = adapter_config(method, base, r=r, alpha=alpha, targets=targets, **(options or {}))
    return create_adapter(name, base.model, family, seed=config.seed, fingerprint=base.fingerprint, base_name=base.name, task=task)


def _continued(base: Base, name: str, store: AdapterStore, *, method: str, seed: int, task: str | None,
               continue_from: str, top_k: int | None = None, threshold: float | None = None) -> Adapter:
    """The next task's adapter. MoRA: the stored adapter's experts frozen (and selectable), r fresh ones
    appended. LoRA: the stored adapter's own tensors, trained further (sequential fine-tuning, which
    forgets: the baseline continual learning is measured against). Its head is the new task's."""
    from ..methods.mora import carried_tensors, continue_from as next_config
    from ..merge.common import content_fingerprint

    previous = store.get(continue_from)
    if method == "lora":
        if previous.config.type != "lora":
            raise ConfigError(f"--continue-from {continue_from!r}: it is {previous.method.an_adapter}; a LoRA run "
                              "continues a LoRA adapter")
        fresh = create_adapter(name, base.model, previous.config, seed=seed, fingerprint=base.fingerprint,
                               base_name=base.name, task=task)
        fresh.tensors = {s: {k: t.detach().clone() for k, t in p.items()} for s, p in previous.tensors.items()}
    elif method == "mora":
        changes = {k: v for k, v in (("top_k", top_k), ("threshold", threshold)) if v is not None}
        fresh = create_adapter(name, base.model, next_config(previous, changes), seed=seed,
                               fingerprint=base.fingerprint, base_name=base.name, task=task)
        fresh.tensors = carried_tensors(previous, fresh.tensors)
    else:
        raise ConfigError(f"--continue-from continues a LoRA or MoRA adapter; this run trains {method}")
    fresh.meta.lineage = [{"op": "continue", "inputs": [{"name": continue_from,
                                                         "fingerprint": content_fingerprint(previous)}]}]
    return fresh


def _composition(base: Base, name: str, store: AdapterStore, *, method: str, seed: int, task: str | None,
                 sources: str | Sequence[str] | None = None, variant: str | None = None,
                 omega_init: str | None = None) -> Adapter:
    """The composition a run trains over the stored `sources` (names, or one comma-separated string).
    omega_init "source" is applied by the classifier run, which knows the source (train/run.py)."""
    from .compose import compose

    names = [n.strip() for n in sources.split(",")] if isinstance(sources, str) else list(sources or [])
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"--method {method} composes stored adapters: name them with --sources a,b,c")
    if name in names:
        raise ConfigError(f"the composition {name!r} cannot be one of its own --sources; give it another --name")
    if variant is not None and method != "scalearn":
        raise ConfigError(f"--variant chooses a ScaLearn variant; {method} has none: leave it out")
    return compose(name, base, [store.get(n) for n in names], method=method, seed=seed, task=task, variant=variant)


def adapter_config(method: str, base: Base, *, r: int = 8, alpha: float = 16.0,
                   targets: Sequence[str] | None = None, **options: Any) -> Any:
    """The config of the adapter a run trains. lora: r, alpha, the targets (default: attention
    projections). ia3: PEFT's targets for the base's architecture (keys, values and the MLP's down
    projection, whose input it scales); given targets keep PEFT's feedforward choice among them.
    bottleneck: `options` placement (pfeiffer), reduction_factor (16), nonlinearity (relu) at the
    placement's modules for the base's architecture, or at the given targets. sparse: every weight
    matrix of the layers (LT-SFT selects among them), or the given targets."""
    if method == "sparse":                     # the LT-SFT options are the run's (train/sft.py), not the config's
        if not targets and base.kind not in SPARSE_TARGETS:
            raise ConfigError(f"sparse fine-tuning adapts linear layers; {base.name} is an image base of convolutions: "
                              "train lora, ia3 or bottleneck on it")
        return SparseConfig(target_modules=tuple(targets or SPARSE_TARGETS[base.kind]))
    if method == "bottleneck":
        model_type = getattr(base.model.config, "model_type", "?")
        given = {k: v for k, v in options.items() if v is not None}
        if given.get("placement") == "parallel":
            given.setdefault("scaling", parallel_scaling(base.kind))
        if targets is not None:
            return BottleneckConfig(target_modules=tuple(targets), **given)
        return BottleneckConfig.for_model(model_type, **given)
    if method == "lora":
        return LoraConfig(r=r, alpha=alpha, target_modules=_targets(targets, base))
    if method == "mora":
        from ..methods.mora import MoraConfig

        if not targets and base.kind == "image":
            raise ConfigError(f"MoRA's rank-1 experts adapt linear layers; {base.name} is an image base: give "
                              "--targets of its linear layers, or train lora, ia3 or bottleneck on it")

        given = {k: v for k, v in options.items() if v is not None and k in ("top_k", "threshold")}
        return MoraConfig(r=r, alpha=alpha, target_modules=_targets(targets, base), **given)
    if method == "ia3":
        model_type = getattr(base.model.config, "model_type", "?")
        if targets is None:
            return Ia3Config.for_model(model_type)
        known = Ia3Config.for_model(model_type).feedforward_modules if model_type in IA3_TYPES else ()
        return Ia3Config(target_modules=tuple(targets), feedforward_modules=tuple(t for t in targets if t in known))
    raise ConfigError(f"no adapter family {method!r} to make here; use lora, ia3, bottleneck, sparse or mora")


def _targets(targets: Sequence[str] | None, base: Base) -> tuple[str, ...] | str:
    """The given targets, else the base kind's defaults (a tuple of names, or one full-name regex)."""
    if not targets and base.kind == "image" and not hasattr(base.model, "pooled"):   # a transformers vision folder
        from ..vision.hf import default_lora_targets

        return default_lora_targets(base.model)
    chosen = targets or DEFAULT_TARGETS[base.kind]
    return chosen if isinstance(chosen, str) else tuple(chosen)


def _stack(rt: AdapterRuntime, adapter: Adapter, store: AdapterStore, names: Sequence[str],
           run_info: dict[str, Any] | None) -> None:
    """Attach the stored adapters `names` (frozen) under `adapter` on every row; the run's info (its
    lineage) pins each by content fingerprint."""
    from ..merge.common import content_fingerprint

    if adapter.name in names:
        raise ConfigError(f"--stack-on names {adapter.name!r}, the adapter this run trains; stack it on others")
    pinned = []
    for name in names:
        under = store.get(name)
        rt.add(under)                          # refuses an adapter of another base (BaseMismatchError)
        pinned.append({"name": name, "fingerprint": content_fingerprint(under)})
    rt.underlay(adapter.name, list(names))
    if run_info is not None:                   # the caller's dict: its lineage records the stack
        run_info["stack_on"] = pinned


def method_info(adapter: Adapter) -> dict[str, Any]:
    """What a run records of its adapter's family (LoRA: r and alpha, as runs always did)."""
    c = adapter.config
    extra = {"r": c.r, "alpha": c.alpha} if c.type == "lora" else {"adapter": adapter.summary()}
    return {"method": c.type, **extra}


def fit(base: Base, adapter: Adapter, examples: Sequence[Any], collate: Callable, loss_fn: Callable,
        config: TrainConfig, *, store: AdapterStore, resume: bool = False, log_path: str | Path | None = None,
        progress: bool = True, extra_params: Sequence[torch.Tensor] = (),
        evaluate: Callable[[AdapterRuntime], float] | None = None, lengths: Sequence[int] | None = None,
        run_info: dict[str, Any] | None = None, eval_name: str = "eval score",
        eval_negated: bool = False, sft: dict[str, Any] | None = None,
        teachers: Sequence[Adapter] = (), freeze_adapter: bool = False) -> tuple[AdapterRuntime, TrainResult]:
    """Train `adapter` on a fresh runtime over `base`, checkpointing into the run folder; `evaluate`
    (higher is better) gets the runtime. The log (default <run folder>/train_log.jsonl) gets a
    loss-curve PNG beside it (report.loss_plot_path), with `evaluate`'s scores named `eval_name`
    (negated back first when `eval_negated`: a score that is minus a loss). A sparse adapter with
    `sft` options trains by LT-SFT's two phases (train/sft.py). `teachers`: frozen adapters attached beside it
    for a loss that reads them (a loss with `bind` gets the runtime)."""
    if sft is not None and adapter.config.type == "sparse":
        from .sft import SftOptions, fit_lt_sft

        if teachers:
            raise ConfigError("--compatible-with does not combine with a sparse (LT-SFT) run yet: train the update "
                              "with another family, or leave --compatible-with out")

        return fit_lt_sft(fit, base, adapter, examples, collate, loss_fn, config, sft=SftOptions.from_options(sft),
                          run_info=run_info, store=store, resume=resume, log_path=log_path, progress=progress,
                          extra_params=extra_params, evaluate=evaluate, lengths=lengths, eval_name=eval_name,
                          eval_negated=eval_negated)
    rt = AdapterRuntime.from_base(base)
    residual = None
    if config.init != "default":               # CorDA: A0, B0 from the bare base; the residual stacked under
        from .corda import calibration_rows, init_corda

        if base.kind == "image":
            raise ConfigError(f"--init {config.init} decomposes Linear weights by their token inputs' covariance; "
                              f"{base.name} is an image base: train it with --init default")

        rows = calibration_rows(examples, config.calibration_rows, config.seed)
        residual = init_corda(rt, adapter, rows, collate, config.init)
    rt.add(adapter)
    if config.stack_on:
        _stack(rt, adapter, store, config.stack_on, run_info)
    if residual is not None:
        rt.add(residual)
        rt.underlay(adapter.name, [*config.stack_on, residual.name])
    for teacher in teachers:                     # frozen adapters a loss reads (a compatible update's old version)
        rt.add(teacher)
    if hasattr(loss_fn, "bind"):
        loss_fn.bind(rt)
    folder = run_dir(store, adapter.name)
    log = Path(log_path) if log_path else folder / LOG
    writer = dist_rank_world()[0] == 0
    if writer:                                   # (regular files only: --log may name /dev/stdout)
        if not resume and log.is_file():
            log.unlink()                         # a fresh run starts a fresh log, not appended to an old run's
        if loss_plot_path(log).is_file():
            loss_plot_path(log).unlink()         # the plot beside a log always shows that log's run
    with TrainProgress(config.steps, progress and writer, unit="img" if base.kind == "image" else "tok") as bar:
        result = train(rt, adapter.name, examples, collate, loss_fn, config, checkpoint_dir=folder / CHECKPOINT,
                       resume=resume, log_path=log, on_step=bar.update,
                       extra_params=extra_params, evaluate=(lambda: evaluate(rt)) if evaluate else None,
                       lengths=lengths, run_info={"base": base.fingerprint, **(run_info or {})},
                       freeze_adapter=freeze_adapter)
    if residual is not None:                     # stored as one plain LoRA over the unmodified base
        from .corda import fold_residual

        rt.remove(adapter.name)
        rt.remove(residual.name)
        fold_residual(adapter, residual)
        rt.add(adapter)
        if config.stack_on:
            rt.underlay(adapter.name, list(config.stack_on))
    if writer:
        evals = [(s, -v if eval_negated else v) for s, v in result.evals]
        _plot_losses(loss_plot_path(log), result.losses, evals, eval_name, adapter.name)
    return rt, result


def _plot_losses(png: Path, losses: list[float], evals: list[tuple[int, float]], eval_name: str, title: str) -> None:
    """The loss-curve PNG beside the log; skipped without matplotlib (the CLI says so). A plot never
    fails a training run: an error is logged as a warning."""
    if plot_unavailable() is not None:
        return
    try:
        save_loss_plot(png, losses, evals, eval_name, title=title)
    except Exception as exc:                      # noqa: BLE001 - the adapter matters more than its plot
        logging.getLogger(__name__).warning("loss curve not written to %s: %s", png, exc)


def finish(store: AdapterStore, adapter: Adapter, metrics: dict[str, Any], params: dict[str, Any],
           overwrite: bool) -> None:
    """Record metrics and lineage, store the adapter (rank 0 only), then drop the checkpoint."""
    adapter.meta.metrics = {f"validation_{k}": v for k, v in metrics.items()}
    # a composition's inputs are its sources, pinned by content fingerprint (train/compose.py)
    inputs = next((e["sources"] if e.get("op") == "compose" else e["inputs"] for e in adapter.meta.lineage
                   if e.get("op") in ("compose", "continue")), [])   # MoRA: the adapter it continues
    adapter.meta.lineage = [{"op": "train", "inputs": inputs, "params": params}]
    if dist_rank_world()[0] == 0:
        store.put(adapter, overwrite=overwrite)
        shutil.rmtree(run_dir(store, adapter.name) / CHECKPOINT, ignore_errors=True)
