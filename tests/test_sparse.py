"""Sparse fine-tuning (issue 13 §4): top-K selection from a dense change, per-row sparse ΔW inside mixed
batches, composition by addition, sparse merges equal to the dense merges of the same ΔW, and bad
input refused by name."""

from __future__ import annotations

import pytest
import torch
from conftest import classification_files, input_ids, save_tiny
from method_reference import reference
from safetensors.torch import load_file, save_file

from adapterkit import Adapter, AdapterRuntime, LoraConfig, create_adapter, load_base
from adapterkit.core.adapter import AdapterMeta
from adapterkit.errors import BaseMismatchError, ConfigError, CorruptAdapterError
from adapterkit.methods.sparse import SparseConfig, sparse_from_dense, to_dense

TARGETS = ("q_proj", "v_proj", "down_proj")


@pytest.fixture
def llama(tmp_path):
    return load_base(str(save_tiny("llama", tmp_path / "llama")))


def sparse(name, base, seed, density=0.1, std=0.5):
    return create_adapter(name, base.model, SparseConfig(target_modules=TARGETS, init="random", init_density=density,
                                                         init_std=std), seed=seed, fingerprint=base.fingerprint)


def test_top_k_keeps_the_largest_entries_over_all_sites_with_one_threshold():
    g = torch.Generator().manual_seed(0)
    deltas = {"a": torch.randn(4, 6, generator=g), "b": 0.1 * torch.randn(3, 5, generator=g)}   # b: all small
    tensors, threshold = sparse_from_dense(deltas, k=10)
    flat = torch.cat([d.abs().reshape(-1) for d in deltas.values()])
    assert sum(p["indices"].numel() for p in tensors.values()) == 10
    assert threshold == float(flat.topk(10).values.min())
    for site, parts in tensors.items():
        assert torch.equal(to_dense(parts["indices"], parts["values"], tuple(deltas[site].shape)),
                           deltas[site] * (deltas[site].abs() >= threshold))
        assert parts["shape"].tolist() == list(deltas[site].shape)
    assert set(tensors) == {"a"}                      # one global threshold: small sites may keep nothing
    by_share, _ = sparse_from_dense(deltas, proportion=0.5)
    assert sum(p["indices"].numel() for p in by_share.values()) == round(0.5 * 39)
    with pytest.raises(ConfigError, match="give the number of entries to keep \\(k\\) or their proportion, not both"):
        sparse_from_dense(deltas, k=3, proportion=0.1)
    with pytest.raises(ConfigError, match="between 1 and 39, got 40"):
        sparse_from_dense(deltas, k=40)


@pytest.mark.parametrize("call_cost, stacked", [(0, False), (10**12, True)])
def test_rows_of_several_sparse_adapters_lora_and_base_in_one_batch_equal_the_reference(llama, monkeypatch,
                                                                                          call_cost, stacked):
    """Both serving paths (one block-diagonal sparse product of the step's adapters, or one per adapter;
    the cost rule picks by CALL_COST) and the training kernel, with weighted and composed rows, uneven
    units per adapter (padded columns), prefill and decode; and one unit per adapter (no padding; in
    decode, the block-diagonal path's mat-vec)."""
    from adapterkit.methods.sparse import SparsePool

    monkeypatch.setattr(SparsePool, "CALL_COST", call_cost)
    used = []
    real, real_mv, mat_vecs = SparsePool.stacked, torch.mv, []
    monkeypatch.setattr(SparsePool, "stacked", lambda self, slots: used.append(slots) or real(self, slots))
    monkeypatch.setattr(torch, "mv", lambda m, v: mat_vecs.append(v.shape) or real_mv(m, v))
    a, b = sparse("a", llama, 1), sparse("b", llama, 2, density=0.3)
    lora = create_adapter("l", llama.model, LoraConfig(r=2, init="nonzero", init_std=0.3), seed=3)
    rt = AdapterRuntime.from_base(llama, capacity=2)
    for x in (a, b, lora):
        rt.add(x)
    cases = [(["a", "b", None, {"l": 1.0, "a": 1.0}, {"a": 0.5, "b": 1.5}],
              [[a], [b], [], [lora, a], [(a, 0.5), (b, 1.5)]], (6, 1)),
             (["b", None, {"a": 0.5}], [[b], [], [(a, 0.5)]], (6, 1))]
    for rows, stacks, lengths in cases:
        for length in lengths:
            ids = input_ids(len(rows), length)
            want = reference(llama.model, stacks, ids)
            for kernel in ("dense", "gather"):
                with torch.no_grad(), rt.batch(rows, kernel=kernel):
                    got = llama.model(ids).logits
                torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    # even at call cost 0 the one-unit-per-adapter decode takes the block-diagonal mat-vec (it pads nothing)
    assert used and all(s == (1, 2) for s in used) and mat_vecs
    used.clear()
    with torch.no_grad(), rt.batch(cases[0][0], kernel="gather"):
        llama.model(input_ids(5, 1))
    assert bool(used) == stacked


def test_lora_gathers_only_for_its_own_rows_in_a_batch_mixing_families_and_base_rows(llama, monkeypatch):
    """In decode with a LoRA row among base and sparse rows, the LoRA pools gather for that row only;
    with every row on a LoRA adapter they gather for all rows; outputs equal the reference either way.
    (The span kernel, which would take these steps, is turned off: test_lora_reads_close_slots_as_a_span.)"""
    from adapterkit.methods import kernels, lora_pool

    monkeypatch.setattr(kernels, "SPAN_MAX_PADDING", -1.0)
    sizes, real = [], lora_pool.gather_kernel
    monkeypatch.setattr(lora_pool, "gather_kernel", lambda x, *rest: sizes.append(x.shape[0]) or real(x, *rest))
    a = sparse("a", llama, 1)
    lora = create_adapter("l", llama.model, LoraConfig(r=2, init="nonzero", init_std=0.3), seed=3)
    lora2 = create_adapter("m", llama.model, LoraConfig(r=4, init="nonzero", init_std=0.3), seed=4)
    rt = AdapterRuntime.from_base(llama, capacity=3)
    for x in (a, lora, lora2):
        rt.add(x)
    for rows, stacks, units in ((["a", None, "l", "a"], [[a], [], [lora], [a]], 1),
                                (["m", "l", {"l": 0.5, "m": 1.0}], [[lora2], [lora], [(lora, 0.5), lora2]], 3)):
        sizes.clear()
        ids = input_ids(len(rows), 1)
        with torch.no_grad(), rt.batch(rows, kernel="gather"):
            got = llama.model(ids).logits
        torch.testing.assert_close(got.double(), reference(llama.model, stacks, ids), atol=1e-4, rtol=1e-4)
        assert sizes and set(sizes) == {units}


def test_lora_reads_close_slots_as_a_span_in_a_batch_mixing_families_and_base_rows(llama, monkeypatch):
    """Decode and prefill with LoRA rows (one stacked with weights) among base and sparse rows: the LoRA
    pools read their slots as a span of the stacks (no per-unit copy) for decode and for a prefill without
    padding; a prefill where one LoRA has most rows gathers instead; outputs equal the reference each time."""
    from adapterkit.methods import lora_pool

    taken, real_span, real_gather = [], lora_pool.span_kernel, lora_pool.gather_kernel
    monkeypatch.setattr(lora_pool, "span_kernel", lambda *a: taken.append("span") or real_span(*a))
    monkeypatch.setattr(lora_pool, "gather_kernel", lambda *a: taken.append("gather") or real_gather(*a))
    a = sparse("a", llama, 1)
    lora = create_adapter("l", llama.model, LoraConfig(r=2, init="nonzero", init_std=0.3), seed=3)
    lora2 = create_adapter("m", llama.model, LoraConfig(r=4, init="nonzero", init_std=0.3), seed=4)
    rt = AdapterRuntime.from_base(llama, capacity=4)
    for x in (lora, lora2, a):                      # slots 1, 2, 3 (gaps in a span: tests/test_kernels.py)
        rt.add(x)
    cases = ((["a", None, "l", {"l": 0.5, "m": 1.0}, "m"], [[a], [], [lora], [(lora, 0.5), lora2], [lora2]], 1, "span"),
             (["m", "l", None], [[lora2], [lora], []], 6, "span"),
             (["l", "l", "l", "l", "m"], [[lora]] * 4 + [[lora2]], 6, "gather"))
    for rows, stacks, length, kernel in cases:
        taken.clear()
        ids = input_ids(len(rows), length)
        with torch.no_grad(), rt.batch(rows, kernel="gather"):
            got = llama.model(ids).logits
        torch.testing.assert_close(got.double(), reference(llama.model, stacks, ids), atol=1e-4, rtol=1e-4)
        assert taken and set(taken) == {kernel}


def test_composition_by_addition_equals_both_changes_applied_to_the_weights(llama):
    """Composable SFT: a 'language' and a 'task' sparse adapter on one row (generate --compose)
    equal the base with both differences added to its weights."""
    lang, task = sparse("lang", llama, 1), sparse("task", llama, 2)
    rt = AdapterRuntime.from_base(llama)
    for x in (lang, task):
        rt.add(x)
    ids = input_ids(2, 6)
    with torch.no_grad():
        with rt.batch([{"lang": 1.0, "task": 1.0}] * 2):
            composed = llama.model(ids).logits
        rt.merge("lang")
        rt.merge("task")
        merged = llama.model(ids).logits
        rt.unmerge()
        bare = llama.model(ids).logits
    torch.testing.assert_close(composed, merged, atol=1e-5, rtol=1e-4)
    assert (composed - bare).abs().max() > 1e-2


@pytest.mark.parametrize("method, params", [("linear", {}), ("task_arithmetic", {"lam": 0.7}),
                                            ("ties", {"density": 0.05}), ("ties", {"density": 0.5, "mean": "weight"})])
def test_sparse_merges_stay_sparse_and_equal_the_dense_merge(llama, method, params):
    """The same inputs as LoRA-layout dense ΔW through merge/ties.py's dense functions: entry for entry."""
    from adapterkit.merge import merge
    from adapterkit.merge.ties import ties

    inputs = [sparse("a", llama, 1, density=0.1), sparse("b", llama, 2, density=0.2), sparse("c", llama, 3, 0.05)]
    weights = [1.0, 0.5, 2.0]
    out = merge(inputs, method=method, weights=weights, **params)
    assert out.config.type == "sparse"
    for site in inputs[0].tensors:
        shape = tuple(inputs[0].tensors[site]["shape"].tolist())
        dense = torch.stack([to_dense(a.tensors[site]["indices"], a.tensors[site]["values"], shape) for a in inputs])
        if method == "ties":
            want = ties(dense, torch.tensor(weights), density=params["density"], mean=params.get("mean", "count"))
        else:
            want = params.get("lam", 1.0) * (torch.tensor(weights)[:, None, None] * dense).sum(0)
        got = to_dense(out.tensors[site]["indices"], out.tensors[site]["values"], shape) if site in out.tensors \
            else torch.zeros(shape)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        support = torch.unique(torch.cat([a.tensors[site]["indices"] for a in inputs]))
        assert set(out.tensors[site]["indices"].tolist()) <= set(support.tolist())      # within the union


def test_bad_sparse_input_is_refused_by_name(llama, tmp_path):
    a = sparse("bad", llama, 1)
    site = next(iter(a.tensors))
    a.save(tmp_path / "a")
    w = tmp_path / "a" / "adapter.safetensors"
    good = load_file(str(w))

    def broken(key, value, match):
        save_file({**good, f"{site}.{key}": value}, str(w))
        with pytest.raises(CorruptAdapterError, match=match):
            Adapter.load(tmp_path / "a")

    idx = good[f"{site}.indices"]
    broken("indices", idx.float(), rf"{site}.indices is float32; a sparse adapter's indices is int64")
    broken("indices", torch.cat([idx[:1], idx[:-1]]), rf"{site}.indices repeats index {int(idx[0])}; a sparse "
                                                      "adapter's indices are sorted and unique")
    broken("indices", idx.flip(0), rf"{site}.indices is not sorted")
    broken("indices", torch.cat([idx[:-1], torch.tensor([32 * 32])]), rf"{site}.indices reach 1024, beyond the "
                                                                       r"32x32 = 1024 entries of the weight")
    broken("values", good[f"{site}.values"][:-1], rf"{site} has indices \({idx.numel()},\) and values")
    save_file(good, str(w))
    # made for another base: a 32x32 change on a 64x32 weight
    other = Adapter("other", a.config, {site: {**a.tensors[site], "shape": torch.tensor([64, 32])}}, AdapterMeta())
    with pytest.raises(BaseMismatchError, match=rf"adapter 'other' does not fit this base at {site}: its sparse "
                                                "weight change is 64x32, the base's weight 32x32"):
        AdapterRuntime.from_base(llama).add(other)


def test_lt_sft_selects_the_top_k_of_the_dense_phase_resets_and_trains_only_those(tmp_path, monkeypatch):
    """Phase 1 trains a dense ΔW; the stored adapter holds exactly the K largest |ΔW| entries (one global
    threshold), and phase 2 starts them at 0 (with lr 0 in phase 2 they stay 0: the base exactly)."""
    from typer.testing import CliRunner

    import adapterkit.train.sft as sft
    from adapterkit.cli import app
    from adapterkit.store import AdapterStore

    path, data = classification_files(tmp_path)
    seen = {}
    real = sft.sparse_from_dense

    def spy(deltas, **kw):
        out = real(deltas, **kw)
        seen["deltas"], seen["out"] = {s: d.clone() for s, d in deltas.items()}, out
        return out
    monkeypatch.setattr(sft, "sparse_from_dense", spy)
    args = ["train", "--method", "sparse", "--sparse-params", "40", "--dense-steps", "8", "--steps", "6", "--name",
            "s", "--base", str(path), "--train-file", str(data), "--store", str(tmp_path / "st"), "--no-progress"]
    res = CliRunner().invoke(app, args + ["--lr", "0.01", "--sparse-lr", "0.02"])
    assert res.exit_code == 0, res.output
    store = AdapterStore(tmp_path / "st")
    stored, row = store.get("s"), store.show("s")
    assert row["method"] == "sparse" and row["summary"].startswith("sparse 40 entries on ")
    flat = torch.cat([d.abs().reshape(-1) for d in seen["deltas"].values()])
    threshold = float(flat.topk(40).values.min())
    for site, parts in stored.tensors.items():
        want = torch.nonzero(seen["deltas"][site].abs().reshape(-1) >= threshold).flatten()
        assert torch.equal(parts["indices"], want)
    assert all(bool((p["values"] != 0).any()) for p in stored.tensors.values())         # phase 2 trained
    lineage = row["lineage"][0]["params"]
    assert (lineage["lt_sft"]["k"], lineage["lt_sft"]["dense_steps"], lineage["lt_sft"]["sparse_lr"]) == (40, 8, 0.02)
    assert not (store.root / "runs" / "s.dense").exists()                                # phase 1 left nothing


def test_lt_sft_phases_reset_to_the_base_and_pull_toward_it(llama, tmp_path):
    """fit_lt_sft around a stand-in fit: phase 1 gets a dense (full) adapter for the sparse adapter's sites
    and dense_steps at the run's lr; phase 2 gets the sparse adapter with the top-K indices and every value 0
    (θ0), the sparse lr, and a loss with λ Σ |θ − θ0| added."""
    from adapterkit.store import AdapterStore
    from adapterkit.train.sft import SftOptions, fit_lt_sft
    from adapterkit.train.trainer import TrainConfig

    adapter = create_adapter("s", llama.model, SparseConfig(target_modules=("q_proj",)), seed=0)
    calls, planted = [], {}

    def stand_in(base, a, examples, collate, loss_fn, config, **kw):
        calls.append((a.config.type, (config.steps, config.lr),
                      {s: {k: t.clone() for k, t in p.items()} for s, p in a.tensors.items()}, loss_fn))
        if a.config.type == "full":                  # "training": plant a known dense change
            g = torch.Generator().manual_seed(1)
            for site, parts in a.tensors.items():
                planted[site] = parts["delta"] = torch.randn(parts["delta"].shape, generator=g)
        return None, None

    info = {}
    fit_lt_sft(stand_in, llama, adapter, [], None, lambda model, batch: torch.tensor(1.0),
               TrainConfig(steps=4, lr=1e-4), sft=SftOptions(sparse_params=7, dense_steps=3, l1=0.5, sparse_lr=3e-3),
               run_info=info, store=AdapterStore(tmp_path / "st"))
    (kind1, run1, _, _), (kind2, run2, tensors2, loss2) = calls
    assert (kind1, run1, kind2, run2) == ("full", (3, 1e-4), "sparse", (4, 3e-3))
    assert info["lt_sft"]["sparse_lr"] == 3e-3
    flat = torch.cat([d.abs().reshape(-1) for d in planted.values()])
    thr = float(flat.topk(7).values.min())
    for site, parts in tensors2.items():
        assert torch.equal(parts["indices"], torch.nonzero(planted[site].abs().reshape(-1) >= thr).flatten())
        assert not bool(parts["values"].any())                                   # back to θ0
    assert sum(p["indices"].numel() for p in tensors2.values()) == 7 and info["lt_sft"]["k"] == 7
    for parts in adapter.tensors.values():
        parts["values"] += 2.0                                                   # |θ − θ0| = 2 per entry
    assert float(loss2(None, None)) == pytest.approx(1.0 + 0.5 * 2.0 * 7)


def test_an_interrupted_lt_sft_run_resumes_to_the_same_adapter_without_its_dense_phase(tmp_path, monkeypatch):
    """Stopped in the sparse phase (after a checkpoint) or right after the selection (before one): --resume
    gives the adapter and head of an uninterrupted run, never trains the dense phase again, refuses other
    selection settings, and leaves no state behind once stored."""
    from typer.testing import CliRunner

    import adapterkit.train.sft as sft
    from adapterkit.cli import app
    from adapterkit.store import AdapterStore
    from adapterkit.train import progress

    path, data = classification_files(tmp_path)
    store = tmp_path / "st"
    runner = CliRunner()

    def args(name, *extra):
        return ["train", "--method", "sparse", "--sparse-params", "40", "--dense-steps", "4", "--steps", "6",
                "--checkpoint-every", "2", "--lr", "0.01", "--name", name, "--base", str(path), "--train-file",
                str(data), "--store", str(store), "--no-progress", *extra]
    assert runner.invoke(app, args("straight")).exit_code == 0
    straight = AdapterStore(store).get("straight")
    real_update, real_dense = progress.TrainProgress.update, sft._dense_phase
    dense_runs = []
    monkeypatch.setattr(sft, "_dense_phase", lambda *a: dense_runs.append(1) or real_dense(*a))
    for name, stop_at, said in [("late", 3, "The last checkpoint (step 2) is in"),
                                ("early", 0, "Its finished phases are saved in")]:
        calls = []

        def killed(self, record, stop_at=stop_at):
            calls.append(record["step"])
            if len(calls) > 4 and record["step"] == stop_at:            # 4 dense steps, then the sparse phase
                raise KeyboardInterrupt
            real_update(self, record)
        monkeypatch.setattr(progress.TrainProgress, "update", killed)
        res = runner.invoke(app, args(name))
        assert res.exit_code == 130 and said in res.output, res.output
        monkeypatch.setattr(progress.TrainProgress, "update", real_update)
        res = runner.invoke(app, args(name))
        where = "a checkpoint at step 2" if stop_at else "the state of its finished phases"
        assert res.exit_code == 2 and f"an interrupted run of {name!r} left {where}" in res.output
        other = args(name, "--resume")
        other[other.index("40")] = "30"
        res = runner.invoke(app, other)
        assert res.exit_code == 2 and "the interrupted run selected its entries with other settings " \
                                      "(sparse_params: 40 vs 30)" in res.output
        before, steps = len(dense_runs), []
        monkeypatch.setattr(progress.TrainProgress, "update", lambda self, r: steps.append(r["step"]) or real_update(self, r))
        res = runner.invoke(app, args(name, "--resume"))
        assert res.exit_code == 0, res.output
        assert len(dense_runs) == before                                # the dense phase was not trained again
        assert steps == (list(range(2, 6)) if stop_at else list(range(6)))    # from the checkpoint, or from θ0
        monkeypatch.setattr(progress.TrainProgress, "update", real_update)
        got = AdapterStore(store).get(name)
        for site, parts in straight.tensors.items():
            assert torch.equal(got.tensors[site]["indices"], parts["indices"])
            torch.testing.assert_close(got.tensors[site]["values"], parts["values"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.head.weight, straight.head.weight, rtol=1e-5, atol=1e-6)
        assert got.meta.lineage[0]["params"]["lt_sft"] == straight.meta.lineage[0]["params"]["lt_sft"]
        assert not (store / "runs" / name / "phase_state.safetensors").exists()
        assert not (store / "runs" / name / "checkpoint").exists()


def test_lt_sft_flags_are_checked(tmp_path):
    from typer.testing import CliRunner

    from adapterkit.cli import app

    path, data = classification_files(tmp_path)
    base = ["--name", "s", "--base", str(path), "--train-file", str(data), "--store", str(tmp_path / "st"),
            "--no-progress"]
    res = CliRunner().invoke(app, ["train", "--method", "sparse", "--sparse-params", "5", "--sparse-proportion", "0.1",
                                   *base])
    assert res.exit_code != 0 and "give --sparse-params or --sparse-proportion, not both" in res.output
    res = CliRunner().invoke(app, ["train", "--dense-steps", "5", *base])
    assert res.exit_code != 0 and "--dense-steps set a sparse adapter; this run trains lora" in res.output
    res = CliRunner().invoke(app, ["train", "--method", "sparse", "--sparse-lr", "0", *base])
    assert res.exit_code != 0 and "--sparse-lr must be > 0, got 0.0" in res.output
    res = CliRunner().invoke(app, ["train", "--sparse-lr", "1e-3", *base])
    assert res.exit_code != 0 and "--sparse-lr set a sparse adapter; this run trains lora" in res.output


def test_merge_cli_merges_stored_sparse_adapters_from_a_recipe(llama, tmp_path):
    """The merge command over a family's own merge (sparse TIES): stored, summarised, verbose table."""
    from typer.testing import CliRunner

    from adapterkit.cli import app
    from adapterkit.store import AdapterStore

    store = AdapterStore(tmp_path / "st")
    for name, seed in (("a", 1), ("b", 2)):
        store.put(sparse(name, llama, seed))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: ties\nparameters:\n  density: 0.5\ninputs:\n  - adapter: a\n  - adapter: b\n")
    res = CliRunner().invoke(app, ["merge", str(recipe), "--name", "ab", "--store", str(store.root), "--verbose"],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert store.show("ab")["method"] == "sparse" and "ties merge of a, b" in res.output


def test_parameters_count_only_trainable_entries(llama):
    a = sparse("p", llama, 1)
    k = sum(p["values"].numel() for p in a.tensors.values())
    assert a.num_parameters() == k and k > 0


@pytest.mark.parametrize("path", ["gathers", "dense"])
def test_sparse_apply_gradients_equal_plain_autograd_and_it_saves_no_product(monkeypatch, path):
    """Training's sparse product, on either path: x and values get the gradients of x[..., cols] * values
    summed by row (float64, several chunks of rows), and what autograd keeps for backward is x and the
    entries (or the dense ΔW), never the [N, k] product (an LT-SFT run on SmolLM2 was OOM-killed holding
    one per site)."""
    import adapterkit.methods.sparse as sp

    monkeypatch.setattr(sp, "_CHUNK", 64)                      # 64 // k = 2 rows per chunk: 5 chunks
    monkeypatch.setattr(sp, "DENSE_FROM", 1.0 if path == "gathers" else 0.3)     # k = 30 of 84 entries: 0.36
    took = []
    monkeypatch.setattr(sp._SparseApply, "apply", lambda *a, real=sp._SparseApply.apply: took.append(1) or real(*a))
    gen = torch.Generator().manual_seed(0)
    d_in, d_out, k = 12, 7, 30
    idx = torch.randperm(d_in * d_out, generator=gen)[:k].sort().values
    rows, cols = idx // d_in, idx % d_in
    x = torch.randn(3, 3, d_in, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(k, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.randn(3, 3, d_out, dtype=torch.float64, generator=gen)
    plain = torch.zeros(3, 3, d_out, dtype=torch.float64).index_add(-1, rows, x[..., cols] * v)
    gx, gv = torch.autograd.grad(plain, (x, v), g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = sp.sparse_apply(x, rows, cols, v, d_out)
    ox, ov = torch.autograd.grad(out, (x, v), g)
    torch.testing.assert_close(out, plain.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(ox, gx, rtol=0, atol=1e-12)
    torch.testing.assert_close(ov, gv, rtol=0, atol=1e-12)
    assert max(saved) == x.numel() and 9 * k not in saved
    assert bool(took) == (path == "gathers")
    assert torch.autograd.gradcheck(lambda a, b: sp.sparse_apply(a, rows, cols, b, d_out), (x, v))


def test_the_sparse_phase_trains_at_ten_times_the_run_lr_on_a_causal_lm_unless_told(tmp_path):
    """The CLI's default sparse-phase lr (train/defaults.py SPARSE_PHASE_LR_BY_KIND): 10x the run's lr on a
    causal LM, named in the defaults line and recorded in the lineage; --sparse-lr replaces it."""
    from typer.testing import CliRunner

    from adapterkit.cli import app
    from adapterkit.store import AdapterStore

    path, data = classification_files(tmp_path)
    args = ["train", "--method", "sparse", "--steps", "2", "--dense-steps", "2", "--base", str(path),
            "--train-file", str(data), "--store", str(tmp_path / "st"), "--no-progress"]
    res = CliRunner().invoke(app, args + ["--name", "d"])
    assert res.exit_code == 0, res.output
    assert ("lr 0.0001, head lr 0.01, warm-up 0 steps, no validation checks, sparse-phase lr 0.001 (a flag "
            "sets") in res.output
    lineage = AdapterStore(tmp_path / "st").show("d")["lineage"][0]["params"]
    assert lineage["lt_sft"]["sparse_lr"] == pytest.approx(1e-3)
    res = CliRunner().invoke(app, args + ["--name", "g", "--lr", "1e-3", "--sparse-lr", "5e-3"])
    assert res.exit_code == 0, res.output
    assert "sparse-phase lr" not in res.output
    assert AdapterStore(tmp_path / "st").show("g")["lineage"][0]["params"]["lt_sft"]["sparse_lr"] == 5e-3
