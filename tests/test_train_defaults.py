"""Training defaults per objective (train/defaults.py), the head's own learning rate, and the notes
printed after training."""

import pytest
import torch
from conftest import tiny_llama

from adapterkit import LoraConfig, create_adapter
from adapterkit.errors import ConfigError
from adapterkit.core.runtime import AdapterRuntime
from adapterkit.train.defaults import RECIPES, resolve, selection_rows
from adapterkit.train.report import training_notes
from adapterkit.train.trainer import TrainConfig, train


@pytest.mark.parametrize("objective, n, has_eval, want", [
    # steps = 3 epochs (mlm: 1), clamped to [50, 200]; warm-up 10 %; checks every quarter with validation data
    ("classification", 4874, True, dict(steps=200, batch_size=16, lr=2e-3, head_lr=1e-2, warmup_steps=20,
                                       eval_every=50)),
    ("classification-encoder", 4874, True, dict(steps=150, warmup_steps=15, eval_every=37)),
    ("classification", 800, False, dict(steps=150, batch_size=16, warmup_steps=15, eval_every=0)),
    ("classification", 10, True, dict(steps=50, warmup_steps=5, eval_every=12)),
    ("causal-lm", 400, True, dict(steps=150, batch_size=8, lr=1e-3, head_lr=None, eval_every=37)),
    ("mlm-encoder", 1600, False, dict(steps=100, batch_size=16, lr=1e-3, head_lr=None)),
    ("mlm-encoder", 9000, False, dict(steps=200)),
])
def test_the_recipe_fills_in_what_the_flags_leave_out(objective, n, has_eval, want):
    objective, on_encoder, _ = objective.partition("-encoder")         # "x-encoder": on an encoder base
    plan = resolve(objective, n, has_eval, base_kind="encoder" if on_encoder else "causal-lm")
    assert {k: getattr(plan.config, k) for k in want} == want
    assert plan.select_rows == (256 if has_eval else None)
    assert set(plan.chosen) == {"steps", "batch_size", "lr", "head_lr", "warmup", "eval_every"}


def test_a_given_flag_wins_and_is_not_reported_as_a_default():
    plan = resolve("classification", 4874, True, steps=40, lr=1e-4, eval_every=0, grad_accum=2, seed=3)
    c = plan.config
    assert (c.steps, c.lr, c.eval_every, c.grad_accum, c.seed, c.warmup_steps) == (40, 1e-4, 0, 2, 3, 4)
    assert "steps" not in plan.chosen and "lr" not in plan.chosen and plan.select_rows is None
    assert plan.describe() == "batch 16, head lr 0.01, warm-up 4 steps"
    assert resolve("classification", 4874, True, batch_size=64, grad_accum=2).config.steps == 117   # 3 x 39 steps
    with pytest.raises(ConfigError, match="unknown objective 'seq2seq'"):
        resolve("seq2seq", 10, False)
    with pytest.raises(ConfigError, match="head_lr must be a positive number, got -1"):
        resolve("classification", 10, False, head_lr=-1)


def test_selection_rows_are_a_seeded_sample_not_the_first_rows():
    rows = [("a", i) for i in range(300)] + [("b", i) for i in range(300)]       # sorted by label
    picked = selection_rows(rows, 256, seed=0)
    assert len(picked) == 256 and picked == selection_rows(rows, 256, seed=0)
    assert 100 < sum(r[0] == "a" for r in picked) < 156 and selection_rows(rows[:10], 256) == rows[:10]


def test_the_head_trains_at_its_own_learning_rate():
    """head_lr applies to extra_params only: with lr tiny and head_lr large, the head moves and the
    adapter barely does; without head_lr the head moves as little as the adapter."""
    moved = {}
    model = tiny_llama()
    for head_lr in (None, 0.5):
        ad = create_adapter("a", model, LoraConfig(r=2, init="nonzero"), seed=0)
        rt = AdapterRuntime(model)
        rt.add(ad)
        head = torch.zeros(4, model.config.hidden_size)
        before = {k: t.clone() for k, t in ad.tensors[next(iter(ad.tensors))].items()}
        examples = [torch.randint(0, 50, (6,)) for _ in range(8)]

        def loss_fn(model, batch):
            h = model.base_model(input_ids=batch["input_ids"]).last_hidden_state[:, -1]     # [B, H]
            return torch.nn.functional.cross_entropy(h @ head.t(), batch["labels"])

        collate = lambda xs: {"input_ids": torch.stack(xs), "labels": torch.arange(len(xs)) % 4}
        train(rt, "a", examples, collate, loss_fn,
              TrainConfig(steps=3, batch_size=4, lr=1e-6, head_lr=head_lr, schedule="constant"), extra_params=[head])
        after = ad.tensors[next(iter(ad.tensors))]
        moved[head_lr] = (float(head.abs().max()), max(float((after[k] - before[k]).abs().max()) for k in before))
    assert moved[0.5][0] > 0.5 and moved[None][0] < 1e-5          # Adam: ~lr per step, 3 steps
    assert moved[0.5][1] < 1e-5 and moved[None][1] < 1e-5


@pytest.mark.parametrize("metrics, gold, want", [
    ({"accuracy": 0.51, "macro_f1": 0.34}, ["x"] * 50 + ["y"] * 50, "is no better than always answering the "
                                                                    "majority class 'y' (0.500)"),
    ({"accuracy": 0.80, "macro_f1": 0.30}, ["x"] * 40 + ["y"] * 60, "validation macro-F1 0.300 is far below accuracy "
                                                                    "0.800: small classes are mostly missed; "
                                                                    "`adapterkit eval n --report` shows which"),
    ({"accuracy": 0.95, "macro_f1": 0.90}, ["x"] * 50 + ["y"] * 50, None),
    # a causal LM answering labels (measured: tweet-sentiment chat records, 0.417 vs 'negative' 0.467)
    ({"exact_match": 0.417, "loss": 0.35}, ["negative"] * 28 + ["neutral"] * 22 + ["positive"] * 10,
     "validation exact match 0.417 is no better than always answering the majority answer 'negative' (0.467)"),
    ({"exact_match": 0.0, "loss": 2.0}, [f"answer {i}" for i in range(30)], None),     # free text: no majority
])
def test_notes_warn_when_the_result_is_near_the_majority_class_or_misses_small_classes(metrics, gold, want):
    notes = training_notes("n", {"truncated_examples": 0, "train_examples": 10}, metrics, gold)
    assert (notes == []) if want is None else any(want in line for line in notes)


def test_recipes_keep_a_head_lr_only_where_a_head_trains_from_scratch():
    assert RECIPES["classification"].head_lr > RECIPES["classification"].lr
    assert RECIPES["causal-lm"].head_lr is None and RECIPES["mlm"].head_lr is None


def test_each_family_trains_at_its_factor_of_the_objective_lr_per_base_kind():
    from adapterkit.train.defaults import resolve

    lr = {(m, kind): resolve("classification", 1000, False, base_kind=kind, method=m).config.lr
          for m in ("lora", "ia3", "bottleneck", "sparse") for kind in ("causal-lm", "encoder")}
    assert lr["lora", "encoder"] == lr["lora", "causal-lm"] == pytest.approx(2e-3)
    assert lr["ia3", "causal-lm"] == pytest.approx(1e-2) and lr["sparse", "encoder"] == pytest.approx(1e-4)
    assert lr["bottleneck", "encoder"] == pytest.approx(1e-2)           # chosen on MiniLM
    assert lr["bottleneck", "causal-lm"] == pytest.approx(5e-4)         # 1e-2 diverged on SmolLM2
    assert resolve("classification", 1000, False, base_kind="causal-lm", method="bottleneck", lr=3e-3).config.lr == 3e-3


def test_a_corda_ipm_start_trains_at_a_quarter_of_loras_lr_unless_told():
    """IPM starts from the weight's largest components (chosen on election-tweets, lowbit_corda_tune.jsonl);
    KPM and the default start keep LoRA's lr; --lr still wins."""
    from adapterkit.train.defaults import resolve

    def lr(init, **kw):
        return resolve("classification", 1000, False, base_kind="causal-lm", method="lora", init=init, **kw).config.lr
    assert lr("corda-ipm") == pytest.approx(5e-4)
    assert lr("corda-kpm") == lr("default") == pytest.approx(2e-3)
    assert lr("corda-ipm", lr=2e-3) == 2e-3
    got = resolve("classification", 1000, False, base_kind="causal-lm", method="lora", init="corda-ipm")
    assert got.config.init == "corda-ipm" and "lr 0.0005" in got.describe()


def test_a_parallel_bottleneck_has_its_own_lr_and_scale_per_base_kind():
    """Chosen on chat-topics (methods_tune.jsonl): on an encoder 1x the objective's lr (the bottleneck's 5x
    collapsed) at scale 1; on a causal LM the bottleneck's 0.25x at He et al.'s scale 4."""
    from adapterkit.train.defaults import parallel_scaling, resolve

    def lr(kind, placement):
        return resolve("classification", 1000, False, base_kind=kind, method="bottleneck",
                       placement=placement).config.lr
    assert lr("encoder", "parallel") == pytest.approx(2e-3) and lr("encoder", "pfeiffer") == pytest.approx(1e-2)
    assert lr("causal-lm", "parallel") == lr("causal-lm", "pfeiffer") == pytest.approx(5e-4)
    assert lr("encoder", None) == pytest.approx(1e-2)
    assert parallel_scaling("causal-lm") == 4.0 and parallel_scaling("encoder") == parallel_scaling("image") == 1.0
