"""`adapterkit train` and `adapterkit eval`: thin maps onto train/ (registered in cli.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from .common import DEVICE_OPT, DTYPE_OPT, STORE_OPT, device_dtype, fail, open_store, out
from ..errors import AdapterkitError


def _examples(task: Optional[str], split: str, file: Optional[Path], text_field: str, label_field: str):
    from ..data import load_task, read_examples

    if file is not None:
        return list(read_examples(file, text_field, label_field).examples)
    if task is None:
        raise AdapterkitError("give --task NAME (see `adapterkit data list`) or a data file")
    return load_task(task).split(split)


def train_cmd(
    name: str = typer.Option(..., "--name", help="Name of the adapter in the store."),
    base: str = typer.Option("smollm2-135m", help="Built-in base name or local folder."),
    task: Optional[str] = typer.Option(None, help="Example task (adapterkit data list)."),
    train_file: Optional[Path] = typer.Option(None, "--train-file", help="JSONL/CSV with text and label "
                                              "(mlm: .txt, one document per line, or JSONL)."),
    eval_file: Optional[Path] = typer.Option(None, "--eval-file", help="JSONL/CSV scored after training."),
    text_field: str = typer.Option("text", "--text-field"),
    label_field: str = typer.Option("label", "--label-field"),
    method: str = typer.Option("lora", help="Adapter family: lora, ia3 (PEFT's targets for the base: keys, values "
                               "and the MLP down projection's input) or bottleneck (--placement, --reduction-factor, "
                               "--nonlinearity); --r/--alpha are LoRA's."),
    placement: Optional[str] = typer.Option(None, help="Bottleneck: pfeiffer (after the MLP; default), houlsby "
                                            "(after attention and MLP) or parallel (beside the MLP)."),
    reduction_factor: Optional[int] = typer.Option(None, "--reduction-factor", help="Bottleneck: d -> d/rf "
                                                   "(default 16)."),
    nonlinearity: Optional[str] = typer.Option(None, help="Bottleneck: relu (default), gelu or silu."),
    scaling: Optional[float] = typer.Option(None, "--scaling", help="Bottleneck, parallel placement: the output "
                                            "scale s of y + s·f(x) (default: 4 on a causal LM, He et al.'s scaled "
                                            "parallel adapter; 1 on an encoder or image base)."),
    sparse_params: Optional[int] = typer.Option(None, "--sparse-params", help="Sparse (LT-SFT): entries kept "
                                                "after the dense phase (default: 1 % of the selected matrices)."),
    sparse_proportion: Optional[float] = typer.Option(None, "--sparse-proportion", help="Sparse: the share of "
                                                      "entries kept instead (default 0.01)."),
    dense_steps: Optional[int] = typer.Option(None, "--dense-steps", help="Sparse: steps of the dense phase "
                                              "(default: the run's steps)."),
    l1: Optional[float] = typer.Option(None, "--l1", help="Sparse: λ of an L1 pull of the entries toward the base "
                                       "in the sparse phase (default 0)."),
    sparse_lr: Optional[float] = typer.Option(None, "--sparse-lr", help="Sparse: the entries' learning rate in "
                                              "the sparse phase (default: 10x the run's lr on a causal LM, the run's "
                                              "lr on an encoder)."),
    train_rows: Optional[int] = typer.Option(None, "--train-rows", min=1, help="Train on a seeded sample of this "
                                             "many training rows (few-shot runs; --seed picks the sample)."),
    stack_on: Optional[str] = typer.Option(None, "--stack-on", help="Stored adapters (comma-separated: a domain "
                                           "or language adapter) applied frozen under the one this run trains, "
                                           "as MAD-X stacks them; at inference stack them again (generate "
                                           "--compose DOMAIN=1,NAME=1; eval --compose)."),
    sources: Optional[str] = typer.Option(None, "--sources", help="ScaLearn or AdapterFusion (--method scalearn "
                                          "| fusion): the stored adapters to compose, comma-separated; only the "
                                          "composition's weights (and the head) train."),
    variant: Optional[str] = typer.Option(None, "--variant", help="ScaLearn: vector (default: ω a vector per "
                                          "source and site), uniform (a scalar), shared / shared-uniform (one ω "
                                          "for all layers: ScaLearn++ / Uniform++)."),
    omega_init: Optional[str] = typer.Option(None, "--omega-init", help="ScaLearn's start: scaled (default: ω ~ "
                                             "N(2/N, 0.001), the paper's) or source (ω = 1 for the source whose "
                                             "head starts the run, 0 for the others: the composition starts as "
                                             "that source alone; needs --head-init source)."),
    continue_from: Optional[str] = typer.Option(None, "--continue-from", help="A task after others: the stored "
                                                "adapter of the earlier tasks. MoRA: its experts stay frozen (and "
                                                "selectable) and --r new ones learn this task; LoRA: its tensors "
                                                "train further (sequential fine-tuning)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="MoRA: experts a token activates (default 4)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="MoRA: |normalised score| below which an "
                                              "expert stays off (default 0)."),
    bits: Optional[int] = typer.Option(None, "--bits", help="Quantization-aware training: the adapter's float "
                                       "matrices train at 1, 2, 4 or 8 bits (straight-through estimator) and are "
                                       "stored packed (`adapter quantize` packs a trained one instead)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="With --bits: values per scale (a multiple "
                                             "of 8; default 64)."),
    compatible_with: Optional[str] = typer.Option(None, "--compatible-with", help="A compatible update (MUSCLE): "
                                                  "the version users have now (NAME or NAME@vN); the new one "
                                                  "also learns to keep its correct predictions (classifiers; "
                                                  "instruction adapters: its right next tokens)."),
    compat_weight: float = typer.Option(1.0, "--compat-weight", min=0.0, help="With --compatible-with: weight of "
                                        "the distillation from the old version on the rows it got right."),
    init: str = typer.Option("default", "--init", help="LoRA's start: default (B = 0), corda-ipm (CorDA: the "
                             "weight's components the task's inputs use most, to learn faster; trains at 1/4 of "
                             "LoRA's lr) or corda-kpm (those they use least; keeps the base's knowledge). CorDA "
                             "stores a rank-2r LoRA."),
    calibration_rows: int = typer.Option(256, "--calibration-rows", min=1, help="CorDA: training rows (a seeded "
                                         "sample) whose inputs give each layer's covariance."),
    objective: str = typer.Option("classification", help="classification (text, label), causal-lm "
                                  "(JSONL prompt/completion or messages), mlm (plain text, encoder bases) or vqa "
                                  "(a vision-language adapter; the default for a visual question answering task "
                                  "such as easy-vqa-colour)."),
    image_base: str = typer.Option("mobilenet-v2", "--image-base", help="vqa: the frozen image base whose pooled "
                                   "feature map the adapter's projector reads (a built-in or a ViT / CLIP folder)."),
    grid: int = typer.Option(2, "--grid", min=1, help="vqa: the feature map is pooled to grid x grid image tokens."),
    projector_only: bool = typer.Option(False, "--projector-only", help="vqa: train the image projector alone "
                                        "(the language model's adapter stays at zero: the bare base)."),
    image_adapter: bool = typer.Option(False, "--image-adapter", help="vqa: a LoRA (rank --r) on the image base's "
                                       "default sites trains too (VL-Adapter's option); saved inside the adapter."),
    projector_from: Optional[str] = typer.Option(None, "--projector-from", help="vqa: a stored vision-language "
                                                 "adapter whose trained projector this one starts from (LLaVA's "
                                                 "two stages: align a projector with --projector-only, then train "
                                                 "each task from it)."),
    r: int = typer.Option(8, help="LoRA rank."),
    alpha: float = typer.Option(16.0, help="LoRA alpha."),
    targets: Optional[str] = typer.Option(None, help="Comma-separated target modules (default per base)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (default: 3 epochs of the training data, 1 for "
                                        "mlm, at least 50 and at most 200; classification on an encoder base: at "
                                        "most 150)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Default: 16 (causal-lm: 8)."),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    lr: Optional[float] = typer.Option(None, help="Adapter learning rate (default: 2e-3 classification, 1e-3 "
                                       "causal-lm and mlm)."),
    head_lr: Optional[float] = typer.Option(None, "--head-lr", help="Learning rate of the classification head, "
                                            "trained from scratch (default: 1e-2)."),
    head_init: str = typer.Option("random", "--head-init", help="Classification: the head starts random, or as "
                                  "the linear probe on the frozen base's features (probe: LP-FT; one feature pass "
                                  "over the training data first), or as --continue-from's head (previous: an "
                                  "update of the same task that starts where the old version stands), or as "
                                  "the head of the first --sources adapter with the run's labels (source: "
                                  "scalearn / fusion over the task's own few-shot adapter)."),
    warmup: Optional[int] = typer.Option(None, help="Warm-up steps (default: 10 % of the steps)."),
    schedule: str = typer.Option("cosine", help="Learning-rate decay after warm-up: cosine, linear or constant."),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    max_length: int = typer.Option(128, "--max-length", help="Longer texts are truncated."),
    seed: int = typer.Option(0),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Score the validation data every N steps "
                                             "and keep the best tensors (default with validation data: every quarter "
                                             "of the steps, on up to 256 rows; 0: never)."),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast on --device: fp32 base weights, bf16 "
                              "matmuls (--dtype bfloat16 instead stores the base in bf16, half the memory; "
                              "the adapter always trains in fp32)."),
    device: Optional[str] = DEVICE_OPT,
    dtype: Optional[str] = DTYPE_OPT,
    checkpoint_every: int = typer.Option(50, "--checkpoint-every",
                                         help="Save the trainer state every N steps (0: only at the end)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run of --name from its last "
                                "checkpoint (same data and settings; the loss curve continues exactly)."),
    log: Optional[Path] = typer.Option(None, "--log", help="JSONL log, one record per step "
                                       "(default <store>/runs/NAME/train_log.jsonl); the loss-curve PNG "
                                       "goes beside it (train_log.png)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a stored adapter (or a leftover "
                                   "checkpoint) of the same name."),
    store: Optional[Path] = STORE_OPT,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train a classification adapter (+ head) on a task or a file and store it with its metrics; the
    JSONL log and a loss-curve PNG (with matplotlib) stay beside each other. Flags left out take the
    objective's measured defaults (train/defaults.py), printed before training."""
    from ..core.base import load_base
    from ..methods import get_method
    from ..train.fit import CHECKPOINT, LOG, PHASE_STATE, check_run, checkpoint_step, run_dir, run_lock
    from ..train.run import HEAD_INITS, train_classifier
    from ..train.defaults import TRAINABLE, resolve, sparse_phase_lr
    from ..train.trainer import finish_distributed, init_distributed_from_env

    st = open_store(store)
    try:
        rank, _ = init_distributed_from_env()       # torchrun --nproc_per_node=N -m adapterkit.cli.main train ...
        if get_method(method).name not in TRAINABLE:
            raise AdapterkitError(f"`train` trains {', '.join(TRAINABLE)} adapters; {method!r} is not one of them")
        from ..data.vqa_tasks import VQA_TASKS

        if task in VQA_TASKS and objective == "classification":     # the task decides: images with questions
            objective = "vqa"
        if objective not in ("classification", "causal-lm", "mlm", "vqa"):
            raise AdapterkitError(f"unknown objective {objective!r}; use classification, causal-lm, mlm or vqa")
        if objective == "vqa" and task not in VQA_TASKS:
            raise AdapterkitError(f"vqa training reads a visual question answering task: --task one of "
                                  f"{', '.join(VQA_TASKS)}")
        if objective != "vqa" and (projector_only or image_adapter or projector_from or grid != 2
                                   or image_base != "mobilenet-v2"):
            raise AdapterkitError("--image-base, --grid, --projector-only, --image-adapter and --projector-from set a "
                                  f"vision-language (vqa) run; this run trains {objective}: train a visual question "
                                  "answering task or leave them out")
        dev, dt = device_dtype(device, dtype)
        flags = dict(steps=steps, batch_size=batch_size, lr=lr, head_lr=head_lr, warmup=warmup, eval_every=eval_every,
                     grad_accum=grad_accum, schedule=schedule, weight_decay=weight_decay, seed=seed, bf16=bf16,
                     checkpoint_every=checkpoint_every, bits=bits, group_size=group_size or 64,
                     init=init, calibration_rows=calibration_rows,
                     stack_on=tuple(n.strip() for n in stack_on.split(",") if n.strip()) if stack_on else ())
        old_version = None
        if compatible_with is not None:
            if objective == "mlm":
                raise AdapterkitError("--compatible-with updates classifiers and instruction adapters (distilling "
                                      "the old version's right predictions); a masked-LM adapter has none to keep")
            old_version = st.get(compatible_with)           # before the base: a clear error for a bad name
        if group_size is not None and bits is None:
            raise AdapterkitError("--group-size sets the scale groups of --bits: add --bits (1, 2, 4 or 8) or leave "
                                  "it out")
        if head_init not in HEAD_INITS:
            raise AdapterkitError(f"--head-init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}")
        if head_init == "previous" and not continue_from:
            raise AdapterkitError("--head-init previous starts the head as the head of the adapter the run "
                                  "continues: add --continue-from NAME (the version being updated), or leave "
                                  "--head-init out")
        if head_init == "source" and method not in ("scalearn", "fusion"):
            raise AdapterkitError(f"--head-init source starts the head as a composition source's head; --method "
                                  f"{method} has no sources: add --method scalearn or fusion, or leave --head-init "
                                  "out")
        if omega_init not in (None, "scaled", "source"):
            raise AdapterkitError(f"--omega-init must be scaled or source, got {omega_init!r}")
        if omega_init == "source" and head_init != "source":
            raise AdapterkitError("--omega-init source starts ScaLearn at the source whose head starts the run: add "
                                  "--head-init source, or leave --omega-init out")
        if objective != "classification" and head_init != "random":
            raise AdapterkitError(f"--head-init sets a classification head's start; {objective} training has no "
                                  "classification head: leave it out")
        if objective not in ("classification", "vqa") and head_lr is not None:
            raise AdapterkitError(f"--head-lr is the learning rate of a classification head (vqa: the image "
                                  f"projector); {objective} training has no head trained from scratch: leave it out")
        # One run per name: a second trainer of it fails here, before it deletes (--overwrite), resumes
        # or writes anything, and before loading the base or the data. Freed when the process ends.
        with run_lock(st, name):
            check_run(st, name, overwrite=overwrite, resume=resume)      # before loading the base or the data
            target_list = tuple(t.strip() for t in targets.split(",")) if targets else None
            options = {"bottleneck": dict(placement=placement, reduction_factor=reduction_factor,
                                          nonlinearity=nonlinearity, scaling=scaling),
                       "sparse": dict(sparse_params=sparse_params, sparse_proportion=sparse_proportion,
                                      dense_steps=dense_steps, l1=l1, sparse_lr=sparse_lr),
                       "scalearn": dict(sources=sources, variant=variant, omega_init=omega_init), "fusion": dict(sources=sources),
                       "mora": dict(continue_from=continue_from, top_k=top_k, threshold=threshold),
                       "lora": dict(continue_from=continue_from)}
            own = options.get(method, {})
            for family, given in options.items():
                stray = {k: v for k, v in given.items() if v is not None and k not in own}
                if method != family and stray:
                    flags_given = ", ".join("--" + k.replace("_", "-") for k in stray)
                    raise AdapterkitError(f"{flags_given} set a {family} adapter; this run trains {method}: add "
                                          f"--method {family} or leave them out")
            common = dict(task=task or (str(train_file) if train_file else None), store=st, r=r, method=method,
                          method_options=options.get(method),
                          alpha=alpha, targets=target_list, max_length=max_length, overwrite=overwrite,
                          progress=progress, resume=resume, log_path=str(log) if log else None)
            image = None
            if objective == "vqa":
                from functools import partial

                from ..data import load_task
                from ..train.vqa import train_vqa

                data = load_task(task)
                train_data, eval_data = data.train, data.validation
                image = load_base(image_base, dt, dev)
                trainer = partial(train_vqa, image_base=image, grid=grid, freeze_lm=projector_only,
                                  image_adapter=image_adapter, image_r=r,
                                  projector_from=None if projector_from is None else st.get(projector_from))
            elif objective == "causal-lm":
                from ..data.readers import read_records
                from ..train.instruct import train_instructions

                if train_file is None:
                    raise AdapterkitError("causal-lm training reads --train-file (JSONL prompt/completion or messages)")
                train_data = read_records(train_file)[0]
                eval_data = read_records(eval_file)[0] if eval_file else []
                trainer = train_instructions
            elif objective == "mlm":
                from ..train.mlm import read_texts, train_mlm

                if train_file is None:
                    raise AdapterkitError("mlm training reads --train-file (.txt, one document per line, or JSONL "
                                          "with --text-field)")
                train_data = read_texts(train_file, text_field)
                eval_data = read_texts(eval_file, text_field) if eval_file else []
                trainer = train_mlm
            else:
                train_data = _examples(task, "train", train_file, text_field, label_field)
                eval_data = _examples(task, "validation", eval_file, text_field, label_field) \
                    if (task or eval_file) else []
                trainer = train_classifier
            if train_rows is not None:
                train_data = _sample_rows(train_data, train_rows, seed)
            loaded = load_base(base, dt, dev)
            plan = resolve(objective, len(train_data), bool(eval_data), base_kind=loaded.kind, method=method,
                           placement=placement if method == "bottleneck" else None, **flags)
            chosen = plan.describe()
            if method == "sparse" and sparse_lr is None:          # the sparse phase's lr: a factor on the run's
                options["sparse"]["sparse_lr"] = sparse_phase_lr(plan.config.lr, loaded.kind)
                chosen += (", " if chosen else "") + f"sparse-phase lr {options['sparse']['sparse_lr']:g}"
            if chosen and rank == 0:
                family = "" if method == "lora" else f" with {method}" + (f" {placement}" if placement else "")
                out.print(f"defaults for {objective}{family} on {len(train_data)} examples: {chosen} (a flag "
                          "sets any of them)", markup=False, highlight=False, soft_wrap=True)
            extra = {"compatible_with": old_version, "compat_weight": compat_weight} if old_version else {}
            if head_init != "random":
                extra["head_init"] = head_init
            adapter, metrics = trainer(loaded, name, train_data, eval_data, config=plan.config,
                                       select_rows=plan.select_rows, **common, **extra)
    except AdapterkitError as exc:
        fail(exc)
    except KeyboardInterrupt:
        ckpt = run_dir(st, name) / CHECKPOINT
        step = checkpoint_step(ckpt)
        phases = (run_dir(st, name) / PHASE_STATE).is_file()
        fail(AdapterkitError(f"interrupted; nothing was stored as {name!r}. " + (
            f"The last checkpoint (step {step}) is in {ckpt}: run the same command with --resume to continue."
            if step is not None else
            f"Its finished phases are saved in {ckpt.parent}: run the same command with --resume to continue."
            if phases else "No checkpoint was written yet (see --checkpoint-every).")), code=130)
    finish_distributed()
    if rank != 0:
        return
    from .versions import stored_line

    out.print(f"stored [bold]{escape(stored_line(st, name))}[/] in {st.root}; validation: " +
              (", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
               or "none"), highlight=False, soft_wrap=True)   # one line, however long the store path: grep-able
    from ..train.causal_lm import answer_text
    from ..train.report import training_notes

    params = (adapter.meta.lineage or [{}])[0].get("params", {})
    gold = ([e.label for e in eval_data] if objective == "classification" else
            [answer_text(r) for r in eval_data] if objective == "causal-lm" else [])
    for line in training_notes(name, params, metrics, gold):
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    _print_log_and_plot(log if log is not None else run_dir(st, name) / LOG)


def _print_log_and_plot(log: Path) -> None:
    """Where the run's log and loss curve are (fit deletes a stale plot before training, so a plot
    beside the log is this run's), or why there is no plot."""
    from ..train.report import loss_plot_path, plot_unavailable

    png = loss_plot_path(log)
    why = plot_unavailable() or "it could not be written: see the warning above"
    out.print(f"log: {log}; " + (f"loss curve: {png}" if png.is_file() else f"no loss curve ({why})"),
              markup=False, highlight=False, soft_wrap=True)


def eval_cmd(
    name: str,
    task: Optional[str] = typer.Option(None, help="Example task to score on."),
    split: str = typer.Option("test", help="train, validation or test."),
    file: Optional[Path] = typer.Option(None, "--file", help="JSONL/CSV with text and label instead of a task "
                                        "(masked-LM adapters: .txt or JSONL text)."),
    text_field: str = typer.Option("text", "--text-field"),
    label_field: str = typer.Option("label", "--label-field"),
    base: Optional[str] = typer.Option(None, help="Base (default: the one the adapter was trained on)."),
    max_length: int = typer.Option(128, "--max-length"),
    store: Optional[Path] = STORE_OPT,
    as_json: bool = typer.Option(False, "--json"),
    report: bool = typer.Option(False, "--report", help="Classification adapters: per-class precision, recall, "
                                "F1 and support, and the confusion matrix (in --json too)."),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="Classification adapters: write one "
                                               "JSON line per row (text, label, predicted, probabilities)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress on stderr while scoring."),
    stack_on: Optional[str] = typer.Option(None, "--stack-on", help="Stored adapters applied under this one "
                                           "(comma-separated; default: those it was trained on, from its lineage; "
                                           "'none': the adapter alone). Swap in another domain or language "
                                           "adapter for zero-shot transfer (MAD-X)."),
    device: Optional[str] = DEVICE_OPT,
    dtype: Optional[str] = DTYPE_OPT,
) -> None:
    """Accuracy and macro-F1 of a classification adapter on a task split or a file; loss, perplexity
    and exact match of an instruction adapter on a JSONL file; masked-token loss, perplexity and
    accuracy of a masked-LM adapter on a text file."""
    from ..core.base import load_base
    from ..core.heads import ClassificationHead, MLMHead
    from ..route.common import check_output_path
    from ..core.runtime import AdapterRuntime
    from ..train.report import class_report, write_predictions
    from ..train.run import score

    rep = written = None
    try:
        dev, dt = device_dtype(device, dtype)
        adapter = open_store(store).get(name)
        if (report or predictions is not None) and not isinstance(adapter.head, ClassificationHead):
            kind = "a masked-LM" if isinstance(adapter.head, MLMHead) else "an instruction"
            raise AdapterkitError(f"--report and --predictions need a classification adapter; {name!r} is {kind} "
                                  "adapter")
        if predictions is not None:                    # before the (long) scoring, not after it
            check_output_path(predictions, "predictions file", "pass --predictions PATH in a folder you can write to")
        b = load_base(base or adapter.meta.base_name or "smollm2-135m", dt, dev)
        rt = AdapterRuntime.from_base(b)
        rt.add(adapter)
        under = _stack_names(adapter, stack_on)
        for n in under:
            rt.add(open_store(store).get(n))
        if under:
            rt.underlay(name, under)
            if not as_json:
                out.print(f"stacked on {', '.join(under)}", highlight=False)
        from ..vision.projector import ImageProjector

        if isinstance(adapter.head, ImageProjector):   # a vision-language adapter: exact-match answers
            from ..train.vqa import evaluate_vqa, feature_table

            if task is None:
                raise AdapterkitError(f"{name!r} is a vision-language adapter: give --task with a visual question "
                                      "answering task (easy-vqa, easy-vqa-colour, ...)")
            examples = _examples(task, split, None, text_field, label_field)
            if not examples or not hasattr(examples[0], "question"):
                raise AdapterkitError(f"{name!r} is a vision-language adapter; {task!r} is not a visual question "
                                      "answering task (easy-vqa, easy-vqa-colour, ...)")
            image = load_base(adapter.head.image_base, dt, dev)
            adapter.head.check_image_base(image.name, image.fingerprint)
            side = None
            if adapter.head.image_adapter is not None:           # trained with an adapter on the image base
                from ..train.vqa import ImageSide

                side = ImageSide(image, adapter.head.image_adapter, adapter.head.grid)
                side.freeze()
            features = feature_table(image, [e.image for e in examples], adapter.head.grid, progress=progress,
                                     side=side)
            if side is not None:
                side.close()
            metrics = evaluate_vqa(rt, adapter, examples, features, progress=progress)
        elif isinstance(adapter.head, MLMHead):          # a language / domain adapter: masked-token loss
            from ..train.mlm import evaluate_mlm, read_texts

            if file is None:
                raise AdapterkitError(f"{name!r} is a masked-LM adapter: give --file with plain text (.txt, one "
                                      "document per line, or JSONL with --text-field)")
            metrics = evaluate_mlm(rt, adapter, read_texts(file, text_field), max_length, progress=progress)
        elif adapter.head is None:                     # an instruction adapter: loss, perplexity, exact match
            from ..data.readers import read_records
            from ..train.instruct import evaluate_instructions

            if file is None:
                merged = any(step.get("op") == "merge" for step in adapter.meta.lineage)
                raise AdapterkitError(
                    f"{name!r} has no classification head" + (
                        " (a merge keeps no head): merge again with --head-from ADAPTER to give it one, or "
                        if merged else ": ") + "give --file with JSONL prompt/completion or messages records to "
                    "score it as an instruction adapter")
            metrics = evaluate_instructions(rt, name, read_records(file)[0], max_length, progress=progress)
        else:
            examples = _examples(task, split, file, text_field, label_field)
            scored = score(rt, adapter, examples, max_length, progress=progress)
            metrics = scored.metrics()
            rep = class_report(scored.predicted, scored.gold, scored.labels) if report else None
            if predictions is not None:
                try:
                    written = write_predictions(predictions, [getattr(e, "text", None) or e.id for e in examples],
                                                scored.gold,
                                                scored.predicted, scored.labels, scored.probs.tolist())
                except OSError as exc:                 # print the scores first, then the error
                    written = AdapterkitError(f"cannot write the predictions file {predictions} "
                                              f"({exc.strerror or exc}); pass --predictions PATH in a folder you "
                                              "can write to")
    except AdapterkitError as exc:
        fail(exc)
    saved = written if isinstance(written, Path) else None
    if as_json:
        print(json.dumps({"adapter": name, "task": task, "split": split if task else None, **metrics,
                          **(rep.to_dict() if rep else {}), **({"predictions": str(saved)} if saved else {})}))
    else:
        out.print(f"{name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in metrics.items()))
        if rep is not None:
            from ..train.report import report_tables

            for table in report_tables(rep):
                out.print(table)
        if saved is not None:
            out.print(f"predictions: {saved} ({metrics['n']} rows)", markup=False, highlight=False, soft_wrap=True)
    if isinstance(written, AdapterkitError):
        fail(written)


def _stack_names(adapter: Any, given: Optional[str]) -> list[str]:
    """The adapters `eval` stacks under `adapter`: --stack-on's, or the ones its training run stacked."""
    if given is not None:
        return [] if given.strip().lower() == "none" else [n.strip() for n in given.split(",") if n.strip()]
    params = next((e.get("params", {}) for e in adapter.meta.lineage if e.get("op") == "train"), {})
    return [u["name"] if isinstance(u, dict) else str(u) for u in params.get("stack_on") or []]


def _sample_rows(rows: list[Any], n: int, seed: int) -> list[Any]:
    """A seeded sample of n training rows, in their file order (--train-rows)."""
    import random

    if n > len(rows):
        raise AdapterkitError(f"--train-rows {n} is more than the {len(rows)} training rows; give at most {len(rows)} "
                              "or leave it out")
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]
