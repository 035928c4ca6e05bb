#!/usr/bin/env python
"""Vision-language adapters on easy-vqa (issue 18's VQA part; `benchmarks/vision.py --part vqa` runs this).

The VL model: SmolLM2-135M-Instruct (frozen) reads 4 image tokens (MobileNetV2's last feature map pooled to
2x2, projected by a trained MLP) before the question; the answer is generated greedily and must match
exactly. Systems, each trained in process with train/vqa.train_vqa on the train split (the vqa recipe's lr,
head lr and batch):
  per-task    one adapter (projector + LoRA r=8 on every Linear of the LM) per question type (colour, shape,
              yes/no), --steps steps each (default: the recipe's, 1 epoch capped at 300), scored on its own type
  shared      one adapter trained on all three types, the per-task steps summed (the same compute as the three)
  projector   the projector alone (the LM bare), as many steps: VL-Adapter's lower bound
  align       LLaVA's first stage: the projector alone (the LM bare) on the describing questions (colour and
              shape), the recipe's steps for those rows
  per-task-aligned  per-task adapters whose projector starts from align's (LLaVA's second stage): the
              per-task yes/no adapter alone answers from the question's wording only (0.813 = the prior of
              "not" -> yes, else no), so its image tokens get no signal a yes/no bit can shape
  per-task-paired:yesno  the yes/no adapter trained on easy-vqa-yesno-paired (each training question also
              asked of an image with the opposite answer: the wording alone is worth 0.5), the same steps;
              the summary's per-task-paired is it with per-task colour and shape
  per-task-paired-aligned:yesno  the same from align's projector (both remedies)
  per-task-paired-aligned-headlr1e-5:yesno  and the projector kept almost where align left it (lr 1e-5,
              not the recipe's 1e-2), so the yes/no gradient cannot unlearn the image tokens' meaning
The recipe was tuned on colour questions' validation split (--part vqa-sweep); shape and yes/no are held out.
Test: a seeded sample of --test-rows questions per type from the package's test images (the same rows for
every system). The image base runs once per image for all systems (features cached in process).
Rows append to results/vision_vqa_runs.jsonl; a system already there is skipped (--redo).
Target: per-task adapters >= 0.90 overall.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

QTYPES = ("colour", "shape", "yesno")
TASK_OF = {"colour": "easy-vqa-colour", "shape": "easy-vqa-shape", "yesno": "easy-vqa-yesno"}
TARGET = 0.90


def _sample(rows: list[Any], n: int, seed: str) -> list[Any]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:n]


def cached_features(image_base: Any, images: list[str], grid: int, log: Any) -> dict:
    """feature_table of `images`, cached under the temp folder (lanes running other systems share one pass)."""
    import hashlib

    import torch

    from adapterkit.train.vqa import feature_table

    key = hashlib.sha256("\n".join(sorted(images)).encode()).hexdigest()[:12]
    cache = Path(tempfile.gettempdir()) / f"vqa-features-g{grid}-{key}.pt"
    if cache.is_file():
        return torch.load(cache)
    t0 = time.perf_counter()
    features = feature_table(image_base, sorted(images), grid)
    tmp = cache.with_suffix(".tmp")
    torch.save(features, tmp)
    tmp.replace(cache)
    log(f"image features of {len(images)} images in {time.perf_counter() - t0:.0f} s")
    return features


def run(results: Path, *, steps: int | None, test_rows: int, val_rows: int, redo: bool, smoke: bool, log: Any,
        only: list[str] | None = None) -> None:
    import torch

    from adapterkit.core.base import load_base
    from adapterkit.data.tasks import load_task
    from adapterkit.store import AdapterStore
    from adapterkit.train.defaults import resolve
    from adapterkit.train.vqa import DEFAULT_GRID, train_vqa

    runs_path = results / "vision_vqa_runs.jsonl"
    done = {} if redo or not runs_path.is_file() else {
        json.loads(line)["system"]: json.loads(line) for line in runs_path.read_text().splitlines() if line.strip()}
    lm, image_base = load_base("smollm2-135m"), load_base("mobilenet-v2")
    tasks = {q: load_task(TASK_OF[q]) for q in QTYPES}
    paired = load_task("easy-vqa-yesno-paired").train
    test = {q: _sample(tasks[q].test, test_rows, f"vqa-test:{q}") for q in QTYPES}
    val = {q: _sample(tasks[q].validation, val_rows, f"vqa-val:{q}") for q in QTYPES}
    train = {q: tasks[q].train for q in QTYPES}
    every_train = [e for q in QTYPES for e in train[q]]
    images = {e.image for e in every_train + paired} | {e.image for q in QTYPES for e in test[q] + val[q]}
    features = cached_features(image_base, sorted(images), DEFAULT_GRID, log)
    # a lasting store (a smoke run's is temporary): the aligned projector is read by later processes too
    store = AdapterStore(Path(tempfile.mkdtemp(prefix="vqa-")) / "vqa-store" if smoke else store_root())
    # per-task: `steps` each, or the vqa recipe's default for its data; shared / projector: their sum
    per = {q: steps or resolve("vqa", len(train[q]), True).config.steps for q in QTYPES}
    describe = ["colour", "shape"]
    align_steps = steps or resolve("vqa", sum(len(train[q]) for q in describe), True).config.steps
    systems: list[tuple[str, list[str], int, bool, str | None]] = [
        (f"per-task:{q}", [q], per[q], False, None) for q in QTYPES]
    systems += [("shared", list(QTYPES), sum(per.values()), False, None),
                ("projector", list(QTYPES), sum(per.values()), True, None),
                ("align", describe, align_steps, True, None)]
    systems += [(f"per-task-aligned:{q}", [q], per[q], False, "align") for q in QTYPES]
    systems += [("per-task-paired:yesno", ["yesno"], per["yesno"], False, None),
                ("per-task-paired-aligned:yesno", ["yesno"], per["yesno"], False, "align"),
                ("per-task-paired-aligned-headlr1e-5:yesno", ["yesno"], per["yesno"], False, "align")]
    # a system's own training rows (else its types') and projector lr (else the recipe's)
    train_rows = {s: paired for s, *_ in systems if s.startswith("per-task-paired")}
    head_lr = {"per-task-paired-aligned-headlr1e-5:yesno": 1e-5}
    for system, types, n_steps, freeze, start in systems:
        if only and system not in only:
            continue
        if system in done:
            log(f"{system}: done before ({done[system]['test']}); --redo runs it again")
            continue
        rows = list(train_rows.get(system) or [e for q in types for e in train[q]])
        random.Random(f"vqa-train:{system}").shuffle(rows)
        plan = resolve("vqa", len(rows), True, steps=n_steps, eval_every=max(1, n_steps // 4),
                       head_lr=head_lr.get(system))
        name = system.replace(":", "-")
        log(f"{system}: {n_steps} steps on {len(rows)} rows ({plan.config.lr:g} / head {plan.config.head_lr:g})")
        t = time.perf_counter()
        if start is not None and start not in store:
            raise SystemExit(f"{system} starts from {start}'s projector, which is not in {store.root}: run "
                             f"--vqa-systems {start} first")
        adapter, _ = train_vqa(lm, name, rows, [e for q in types for e in val[q]], image_base=image_base, task=None,
                               store=store, config=plan.config, select_rows=None, freeze_lm=freeze,
                               progress=False, features=features, overwrite=True,
                               projector_from=None if start is None else store.get(start))
        secs = time.perf_counter() - t
        from adapterkit import AdapterRuntime
        from adapterkit.train.vqa import evaluate_vqa

        rt = AdapterRuntime.from_base(lm)
        rt.add(adapter)
        got = evaluate_vqa(rt, adapter, [e for q in types for e in test[q]], features)
        rt.remove(adapter.name)
        log_rows = train_log(store.root, name)
        step_s = sorted(r["seconds"] for r in log_rows)[len(log_rows) // 2] if log_rows else None
        row = {"system": system, "types": types, "steps": n_steps, "train_rows": len(rows), "test": got,
               "projector_from": start,
               "lm_adapter_params": 0 if freeze else adapter.num_parameters(),
               "projector_params": adapter.head.num_parameters(), "wall_s": round(secs, 1), "step_s": step_s,
               "best_step": adapter.meta.lineage[0]["params"].get("best_step"),
               "loss_per_50_steps": loss_curve(log_rows),
               "config": {k: getattr(plan.config, k) for k in ("lr", "head_lr", "batch_size", "warmup_steps")},
               "threads": torch.get_num_threads(), "smoke": smoke, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                         time.gmtime())}
        with runs_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        log(f"{system}: {got}")


def store_root() -> Path:
    return Path(os.environ.get("ADAPTERKIT_HOME", Path.home() / ".adapterkit")) / "bench" / "vqa-store"


def train_log(root: Path, name: str) -> list[dict]:
    path = root / "runs" / name / "train_log.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def loss_curve(log_rows: list[dict], every: int = 50) -> list[dict]:
    """The training loss's mean over each `every` steps: [{"from_step": 0, "loss": ...}, ...]."""
    return [{"from_step": log_rows[i]["step"], "loss": round(sum(r["loss"] for r in log_rows[i:i + every])
                                                             / len(log_rows[i:i + every]), 4)}
            for i in range(0, len(log_rows), every)]


def wording_loss(rows: list[Any], tokens_per_answer: int = 2) -> float:
    """The mean loss per answer token of the best answer read off a yes/no question's wording alone (its
    attribute kind and negation), the other question types taken as answered perfectly: the entropy of the
    answer within each wording group, spread over the answer's tokens (the word and the end token)."""
    import math
    from collections import Counter

    from adapterkit.data.vqa_tasks import asked

    groups = Counter((asked(e.question)[0], asked(e.question)[2], e.answer) for e in rows if e.qtype == "yesno")
    nats = 0.0
    for kind, negated in {(k, n) for k, n, _ in groups}:
        counts = [groups[(kind, negated, a)] for a in ("yes", "no")]
        nats -= sum(c * math.log(c / sum(counts)) for c in counts if c)
    return nats / len(rows) / tokens_per_answer


def wording_rule(train: list[Any]) -> Any:
    """The best yes/no answer from the wording alone, learnt from `train`: the majority answer of each
    (attribute kind, negated) group ("not" -> yes, else no on easy-vqa)."""
    from collections import Counter

    from adapterkit.data.vqa_tasks import asked

    votes = Counter((asked(e.question)[0], asked(e.question)[2], e.answer) for e in train)
    return lambda question: max(("yes", "no"), key=lambda a: votes[(*[asked(question)[i] for i in (0, 2)], a)])


def write_losses(results: Path, log: Any) -> None:
    """results/vision_vqa_losses.json: the 50-step loss means of every system whose training log is still in the
    bench store (runs before the rows carried them), the loss the wording alone would give, and the yes/no
    accuracy of answering from the wording alone (the 300 test questions are the benchmark's --test-rows
    default sample)."""
    from adapterkit.data.tasks import load_task

    root = store_root()
    out: dict[str, Any] = {"curves": {}}
    for line in (results / "vision_vqa_runs.jsonl").read_text().splitlines():
        system = json.loads(line)["system"]
        rows = train_log(root, system.replace(":", "-"))
        if rows:
            out["curves"][system] = loss_curve(rows)
    train = {q: load_task(TASK_OF[q]).train for q in QTYPES}
    out["wording_loss"] = {"yesno": wording_loss(train["yesno"]), "yesno_paired": wording_loss(
        load_task("easy-vqa-yesno-paired").train), "shared": wording_loss([e for q in QTYPES for e in train[q]])}
    # what the wording alone answers: on the training split, on the whole test split, on the benchmark's sample
    rule, task = wording_rule(train["yesno"]), load_task(TASK_OF["yesno"])
    out["wording_rule_accuracy"] = {
        split: sum(rule(e.question) == e.answer for e in rows) / len(rows)
        for split, rows in (("train", task.train), ("test", task.test),
                            ("test_sample", _sample(task.test, 300, "vqa-test:yesno")))}
    (results / "vision_vqa_losses.json").write_text(json.dumps(out, indent=1) + "\n")
    log(f"loss curves of {', '.join(out['curves'])}; wording alone: {out['wording_loss']}, "
        f"{out['wording_rule_accuracy']}")


def summary(results: Path) -> dict[str, Any]:
    """Accuracy per question type and overall for per-task adapters (each on its type), shared, projector."""
    path = results / "vision_vqa_runs.jsonl"
    rows = {json.loads(x)["system"]: json.loads(x) for x in path.read_text().splitlines() if x.strip()} \
        if path.is_file() else {}
    out: dict[str, Any] = {}
    # per-task adapters, from a fresh / the aligned projector; per-task-paired: yes/no from complementary pairs
    paired_systems = ("per-task-paired", "per-task-paired-aligned", "per-task-paired-aligned-headlr1e-5")
    for prefix in paired_systems:
        if f"{prefix}:yesno" in rows:
            rows.update({f"{prefix}:{q}": rows[f"per-task:{q}"] for q in ("colour", "shape")
                         if f"per-task:{q}" in rows})
    for prefix in ("per-task", "per-task-aligned", *paired_systems):
        per = [(q, rows[f"{prefix}:{q}"]) for q in QTYPES if f"{prefix}:{q}" in rows]
        if not per:
            continue
        n = sum(r["test"]["n"] for _, r in per)
        out[prefix] = {"accuracy": sum(r["test"]["accuracy"] * r["test"]["n"] for _, r in per) / n,
                       **{f"accuracy_{q}": r["test"][f"accuracy_{q}"] for q, r in per}, "n": n,
                       "lm_adapter_params": sum(r["lm_adapter_params"] for _, r in per),
                       "projector_params": sum(r["projector_params"] for _, r in per),
                       "steps": sum(r["steps"] for _, r in per), "step_s": per[0][1]["step_s"],
                       "types": [q for q, _ in per]}
    for system in ("per-task-aligned", *paired_systems[1:]):           # the aligned start is part of the cost
        if system in out and "align" in rows:
            out[system]["steps_with_align"] = out[system]["steps"] + rows["align"]["steps"]
    for system in ("shared", "projector", "align"):
        if system in rows:
            r = rows[system]
            out[system] = {**r["test"], "lm_adapter_params": r["lm_adapter_params"],
                           "projector_params": r["projector_params"], "steps": r["steps"], "step_s": r["step_s"]}
    # "overall" on easy-vqa's test set as it comes: each type's accuracy weighted by its share of the test
    # questions (yes/no is 74 % of them); the sampled rows above weigh the three types equally
    from adapterkit.data.tasks import load_task

    mix = load_task("easy-vqa").card["type_counts"]["test"]
    for r in out.values():
        if all(f"accuracy_{q}" in r for q in QTYPES):
            r["accuracy_test_mix"] = sum(r[f"accuracy_{q}"] * mix[q] for q in QTYPES) / sum(mix.values())
    for system in ("per-task", "per-task-aligned", *paired_systems):
        if "accuracy_test_mix" in out.get(system, {}):
            got = out[system]["accuracy_test_mix"]
            out.setdefault("target", {"per_task_overall": TARGET, "test_type_counts": mix})[system] = {
                "measured_on_the_test_mix": got, "met": got >= TARGET, "equal_type_sample": out[system]["accuracy"]}
    return out


def sweep(results: Path, *, variant: str, steps: int, val_rows: int, log: Any) -> None:
    """Tune the vqa recipe on the tuning question type, colour (its validation split; shape and yes/no are held
    out): one variant "lr,head_lr,norm" per call, a row in results/vision_vqa_sweep.jsonl. Features are cached
    under the temp folder (one image-base pass for every variant)."""
    import torch

    from adapterkit.core.base import load_base
    from adapterkit.data.tasks import load_task
    from adapterkit.store import AdapterStore
    from adapterkit.train.defaults import resolve
    from adapterkit.train.vqa import DEFAULT_GRID, feature_table, train_vqa

    lr, head_lr, norm = variant.split(",")
    lm, image_base = load_base("smollm2-135m"), load_base("mobilenet-v2")
    task = load_task(TASK_OF["colour"])
    val = _sample(task.validation, val_rows, "vqa-val:colour")
    cache = Path(tempfile.gettempdir()) / f"vqa-colour-features-g{DEFAULT_GRID}.pt"
    if cache.is_file():
        features = torch.load(cache)
    else:
        features = feature_table(image_base, [e.image for e in task.train + val], DEFAULT_GRID)
        torch.save(features, cache)
    rows = list(task.train)
    random.Random("vqa-train:sweep").shuffle(rows)
    plan = resolve("vqa", len(rows), True, steps=steps, lr=float(lr), head_lr=float(head_lr),
                   eval_every=max(1, steps // 4))
    store = AdapterStore(Path(tempfile.mkdtemp(prefix="vqa-sweep-")) / "store")
    t = time.perf_counter()
    adapter, got = train_vqa(lm, "sweep", rows, val, image_base=image_base, task=None, store=store,
                             config=plan.config, select_rows=None, progress=False, features=features,
                             norm=norm == "norm")
    row = {"task": "easy-vqa-colour", "split": "validation", "variant": {"lr": float(lr), "head_lr": float(head_lr),
                                                                         "norm": norm == "norm"},
           "steps": steps, "validation": got, "best_step": adapter.meta.lineage[0]["params"].get("best_step"),
           "wall_s": round(time.perf_counter() - t, 1), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with (results / "vision_vqa_sweep.jsonl").open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    log(f"sweep {variant}: {got}")
