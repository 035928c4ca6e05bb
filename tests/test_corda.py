"""CorDA (`train --init corda-ipm | corda-kpm`, train/corda.py): the same A, B and residual as PEFT's CorDA
initialisation on the same calibration rows, a stored rank-2r plain LoRA that reproduces the trained
stack on the unmodified base, and clear errors for empty calibration data and non-LoRA families."""

from __future__ import annotations

import pytest
import torch
from conftest import ATTN, classification_files, save_tiny_tokenizer, tiny_gpt2, tiny_llama
from typer.testing import CliRunner

from adapterkit import AdapterRuntime, ConfigError, Ia3Config, LoraConfig, create_adapter, load_base
from adapterkit.cli import app
from adapterkit.train.causal_lm import collate, encode
from adapterkit.train.corda import corda_factors, covariances, init_corda
from adapterkit.train.trainer import TrainConfig

peft = pytest.importorskip("peft")

ROWS = [torch.randint(3, 90, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 7, 12, 6, 11)]
TARGETS = {"llama": ATTN, "gpt2": ["c_attn", "attn.c_proj"]}


def _peft_corda(kind: str, mode: str, r: int, alpha: float):
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    model = (tiny_llama if kind == "llama" else tiny_gpt2)(seed=3)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS[kind], init_lora_weights="corda",
                          corda_config=CordaConfig(corda_method=mode.removeprefix("corda-")),
                          fan_in_fan_out=kind == "gpt2")

    def run_model():
        for ids in ROWS:
            model(input_ids=ids)
    preprocess_corda(model, cfg, run_model=run_model)
    return peft.get_peft_model(model, cfg)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["corda-ipm", "corda-kpm"])
def test_the_same_a_b_and_residual_as_peft(kind, mode):
    r, alpha = 4, 8.0
    pm = _peft_corda(kind, mode, r, alpha)
    model = (tiny_llama if kind == "llama" else tiny_gpt2)(seed=3)
    modules = {n: m for n, m in model.named_modules() if any(n.endswith("." + t) for t in TARGETS[kind])}
    covs = covariances(model, modules, lambda: [model(input_ids=ids) for ids in ROWS])
    inner = dict(pm.base_model.model.named_modules())
    assert set(modules) == {n for n, m in inner.items() if hasattr(m, "lora_A")}
    scale = alpha / r
    for site, module in modules.items():
        weight = module.weight.t() if kind == "gpt2" else module.weight      # Conv1D stores [in, out]
        a, b = corda_factors(weight, covs[site], r, mode, scale)
        theirs = inner[site]
        torch.testing.assert_close(a, theirs.lora_A["default"].weight, rtol=0, atol=1e-5)
        torch.testing.assert_close(b, theirs.lora_B["default"].weight, rtol=0, atol=1e-5)
        residual = weight - scale * b @ a
        theirs_w = theirs.base_layer.weight.t() if kind == "gpt2" else theirs.base_layer.weight
        torch.testing.assert_close(residual, theirs_w, rtol=0, atol=1e-5)
        assert float((residual - weight).detach().abs().max()) > 1e-3        # the init is not trivially empty


def test_ipm_keeps_the_largest_components_and_kpm_the_smallest():
    torch.manual_seed(0)
    w, x = torch.randn(16, 12), torch.randn(40, 12)
    cov = x.t() @ x / 40
    big = corda_factors(w, cov, 3, "corda-ipm", 1.0)
    small = corda_factors(w, cov, 3, "corda-kpm", 1.0)
    energy = lambda ab: float((x @ (ab[1] @ ab[0]).t()).norm())     # noqa: E731  (on the inputs C weighs)
    assert energy(big) > 3 * energy(small)
    full = corda_factors(w, cov, 12, "corda-ipm", 1.0)          # all components: W itself
    torch.testing.assert_close(full[1] @ full[0], w, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match=r"CorDA: rank 13 exceeds the \(16, 12\) weight's 12 components"):
        corda_factors(w, cov, 13, "corda-ipm", 1.0)


def test_the_stored_rank_2r_lora_reproduces_the_trained_stack_on_the_bare_base(tmp_path):
    """fit(): train a CorDA-initialised LoRA (residual stacked under it), then the stored plain LoRA, scored on
    the unmodified base, gives what the last in-training evaluation of the stack gave."""
    from adapterkit.store import AdapterStore
    from adapterkit.train.fit import fit

    path = tmp_path / "m"
    tiny_llama(initializer_range=0.3).save_pretrained(str(path))
    save_tiny_tokenizer(path)
    base = load_base(str(path))
    tok = base.tokenizer
    pairs = [("hello world", "the cat runs"), ("give me one tip", "write clear code"), ("the dog", "is on the mat")]
    examples = [encode(tok, {"prompt": p, "completion": c}, 32) for p, c in pairs]
    coll = (lambda b: collate(b, tok.pad_token_id))
    probe = coll(examples)

    def evaluate(rt):
        with torch.no_grad(), rt.batch(["t"] * len(examples)):
            return float(base.model(**probe).loss)
    bare = float(base.model(**probe).loss)
    adapter = create_adapter("t", base.model, LoraConfig(r=4, alpha=8, target_modules=ATTN))
    cfg = TrainConfig(steps=6, batch_size=3, lr=3e-2, eval_every=6, init="corda-ipm")
    rt, result = fit(base, adapter, examples, coll, lambda m, b: m(**b).loss, cfg, store=AdapterStore(tmp_path / "s"),
                     progress=False, evaluate=evaluate)
    assert adapter.config.r == 8 and adapter.config.alpha == 16 and adapter.config.scale("x") == 2.0
    assert sorted(rt.adapters) == ["t"]                         # the residual is folded in, not attached
    assert evaluate(rt) == pytest.approx(result.evals[-1][1], rel=1e-5)
    assert abs(evaluate(rt) - bare) > 1e-3
    fresh = AdapterRuntime.from_base(base)                      # saved and loaded as a plain LoRA
    adapter.save(tmp_path / "t")
    from adapterkit import Adapter
    fresh.add(Adapter.load(tmp_path / "t"))
    assert evaluate(fresh) == pytest.approx(result.evals[-1][1], rel=1e-5)


def test_cli_init_corda_starts_as_the_base_and_bad_inputs_are_refused(tmp_path):
    from adapterkit.store import AdapterStore

    path, data = classification_files(tmp_path)
    common = ["--base", str(path), "--train-file", str(data), "--store", str(tmp_path / "s"), "--no-progress"]
    res = CliRunner().invoke(app, ["train", "--name", "c", "--init", "corda-kpm", "--steps", "1", "--lr", "1e-12",
                                   "--r", "4", *common])
    assert res.exit_code == 0, res.output
    stored = AdapterStore(tmp_path / "s").get("c")
    assert stored.config.r == 8 and stored.meta.lineage[0]["params"]["init"] == "corda-kpm"
    for parts in stored.tensors.values():                       # ΔW = B A - B0 A0 = 0 before any real step
        a, b = parts["lora_A"], parts["lora_B"]
        assert float(b[:, :4].abs().max()) > 1e-3
        torch.testing.assert_close(b @ a, torch.zeros_like(b @ a), rtol=0, atol=1e-5)
    res = CliRunner().invoke(app, ["train", "--name", "x", "--init", "corda-ipm", "--method", "ia3", *common])
    assert res.exit_code == 2 and "--init corda-ipm initialises LoRA; this run trains an IA3 adapter" in res.output
    res = CliRunner().invoke(app, ["train", "--name", "x", "--init", "corda", *common])
    assert res.exit_code == 2 and "unknown init 'corda'; use default, corda-ipm or corda-kpm" in res.output
    res = CliRunner().invoke(app, ["train", "--name", "x", "--init", "corda-ipm", "--bits", "1", *common])
    assert res.exit_code == 2 and "--init corda-ipm and --bits do not combine" in res.output


def test_empty_calibration_data_and_other_families_are_refused(tmp_path):
    from adapterkit.train.corda import calibration_rows

    with pytest.raises(ConfigError, match="CorDA calibration data is empty: it reads the training rows"):
        calibration_rows([], 256, 0)
    model = tiny_llama()
    rt = AdapterRuntime(model)
    ia3 = create_adapter("i", model, Ia3Config(target_modules=("k_proj", "v_proj"), feedforward_modules=()))
    with pytest.raises(ConfigError, match="--init corda-ipm initialises LoRA; this run trains an IA3 adapter"):
        init_corda(rt, ia3, [{"input_ids": [1, 2]}], lambda rows: {}, "corda-ipm")
    lora = create_adapter("l", model, LoraConfig(r=2, target_modules=ATTN))
    with pytest.raises(ConfigError, match="no calibration row reached model.layers.0.self_attn.q_proj: the "
                       "calibration data is empty"):
        init_corda(rt, lora, [], lambda rows: {}, "corda-ipm")
