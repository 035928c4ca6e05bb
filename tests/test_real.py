"""The real SmolLM2-135M-Instruct and all-MiniLM-L6-v2 from the pip-packaged assets."""

import time

import pytest
import torch

from adapterkit import AdapterRuntime, LoraConfig, create_adapter, generate, load_base

pytestmark = pytest.mark.real
peft = pytest.importorskip("peft")
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def smol():
    return load_base("smollm2-135m")            # converts once per machine into the cache


def test_builtin_loads_fast_after_conversion(smol):
    t = time.perf_counter()
    again = load_base("smollm2-135m")
    assert time.perf_counter() - t < 2.0
    assert again.fingerprint == smol.fingerprint and again.kind == "causal-lm"
    assert smol.tokenizer.chat_template and smol.model.config.num_hidden_layers == 30


@torch.no_grad()
def test_mixed_batch_greedy_tokens_equal_peft_single_adapter(smol, tmp_path):
    rt = AdapterRuntime.from_base(smol)
    names = ["r8", "r16", "r4-mlp"]
    configs = [LoraConfig(r=8, alpha=16, target_modules=ATTN, init="nonzero", init_std=0.02),
               LoraConfig(r=16, alpha=16, target_modules=ATTN, init="nonzero", init_std=0.02, use_rslora=True),
               LoraConfig(r=4, alpha=8, target_modules=ATTN + ["gate_proj", "up_proj", "down_proj"],
                          init="nonzero", init_std=0.02)]
    for i, (name, cfg) in enumerate(zip(names, configs)):
        a = create_adapter(name, smol.model, cfg, seed=i, fingerprint=smol.fingerprint, base_name=smol.name)
        a.save(tmp_path / name)
        rt.add(a)
    rows = [*names, None]
    mixed = generate(rt, smol.tokenizer, [PROMPT] * 4, rows, max_new_tokens=12, chat=True)

    other = load_base("smollm2-135m").model
    pm = peft.PeftModel.from_pretrained(other, str(tmp_path / names[0]), adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(str(tmp_path / name), adapter_name=name)
    pm.eval()
    text = smol.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                              add_generation_prompt=True)
    enc = smol.tokenizer(text, return_tensors="pt")
    eos = smol.tokenizer.eos_token_id
    for res, name in zip(mixed, names):
        pm.set_adapter(name)
        ids = pm.generate(**enc, max_new_tokens=12, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
        ids = ids[: ids.index(eos)] if eos in ids else ids
        assert res.token_ids == ids, name
    with pm.disable_adapter():
        base_ids = pm.generate(**enc, max_new_tokens=12, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
    base_ids = base_ids[: base_ids.index(eos)] if eos in base_ids else base_ids
    assert mixed[3].token_ids == base_ids
    assert any(r.token_ids != base_ids for r in mixed[:3])      # the adapters change the greedy path


@torch.no_grad()
def test_minilm_lora_matches_peft(tmp_path):
    enc_base = load_base("minilm-l6")
    assert enc_base.kind == "encoder"
    a = create_adapter("mini", enc_base.model, LoraConfig(r=8, alpha=16, target_modules=["query", "value"],
                                                          init="nonzero", init_std=0.05), seed=3,
                       fingerprint=enc_base.fingerprint)
    a.save(tmp_path / "mini")
    rt = AdapterRuntime.from_base(enc_base)
    rt.add(a)
    batch = enc_base.tokenizer(["adapters over a frozen encoder", "a second sentence"], return_tensors="pt",
                               padding=True)
    with rt.batch(["mini", None]):
        ours = enc_base.model(**batch).last_hidden_state
    pm = peft.PeftModel.from_pretrained(load_base("minilm-l6").model, str(tmp_path / "mini")).eval()
    theirs = pm(**batch).last_hidden_state
    assert (ours[0] - theirs[0]).abs().max() < 1e-4
    with pm.disable_adapter():
        plain = pm(**batch).last_hidden_state
    assert (theirs[0] - plain[0]).abs().max() > 1e-2
    torch.testing.assert_close(ours[1], plain[1], rtol=1e-5, atol=1e-5)
