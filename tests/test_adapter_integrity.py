"""Adapters are checked at every way in: NaN / inf tensors, values or a ΔW that overflow the dtype
they run in, and a folder whose PEFT config (adapter_config.json) and our side file (adapterkit.json)
disagree are refused with an error naming the tensor / site / keys. A damaged task head does not
stop generation (which never reads it)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ATTN, input_ids, tiny_llama

from adapterkit import Adapter, AdapterRuntime, LoraConfig, create_adapter
from adapterkit.core.base import fingerprint
from adapterkit.errors import CorruptAdapterError, NonFiniteError
from adapterkit.formats.peft import write_peft
from adapterkit.core.heads import ClassificationHead
from adapterkit.serve import AdapterCache

SITE = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def model():
    return tiny_llama()


def make(model, name="a", **cfg):
    return create_adapter(name, model, LoraConfig(**{"r": 4, "alpha": 8, "target_modules": ATTN, "init": "nonzero",
                                                     **cfg}),
                          seed=0, fingerprint=fingerprint(model))


def peft_folder(path, adapter):
    """A plain PEFT folder, as another tool writes it (no adapterkit.json, nothing checked)."""
    path.mkdir(parents=True)
    write_peft(path, adapter.config, adapter.tensors, None)
    return path


@pytest.mark.parametrize("value, part", [(float("nan"), "lora_B"), (float("inf"), "lora_A"),
                                         (float("-inf"), "lora_B")])
def test_non_finite_tensors_are_refused_naming_the_tensor(model, tmp_path, value, part):
    a = make(model)
    a.tensors[SITE][part][1, 2] = value
    folder = peft_folder(tmp_path / "bad", a)
    with pytest.raises(NonFiniteError, match=rf"adapter 'bad': tensor {SITE}.{part} has 1 non-finite value\(s\) "
                                             r"\(NaN or inf\); the adapter is corrupt: re-train or re-save it"):
        Adapter.load(folder)


def test_a_delta_that_overflows_is_refused_naming_the_site(model, tmp_path):
    a = make(model, alpha=1e308)                         # finite tensors, scale alpha / r = 2.5e307
    with pytest.raises(NonFiniteError, match=r"adapter 'a': its weight change at model.layers.0.self_attn.q_proj "
                                             r"reaches 3.05e\+305, beyond float32's range \(3.4e\+38\)"):
        a.check_finite()
    a = make(model)
    a.tensors[SITE]["lora_A"].fill_(1e30)
    a.tensors[SITE]["lora_B"].fill_(1e30)
    with pytest.raises(NonFiniteError, match=r"its weight change at .*q_proj reaches 8e\+60"):
        a.check_finite()


def test_values_beyond_the_base_dtype_are_refused_for_that_dtype_only(model):
    a = make(model)
    a.tensors[SITE]["lora_B"][0, 0] = 1e5                # fine in float32 / bfloat16, not in float16
    a.check_finite(torch.float32)
    a.check_finite(torch.bfloat16)
    with pytest.raises(NonFiniteError, match=rf"tensor {SITE}.lora_B has values up to 1e\+05, beyond float16's "
                                             r"range \(6.55e\+04\)"):
        a.check_finite(torch.float16)


def test_a_loose_bound_falls_back_to_the_exact_delta(model):
    """scale·r·max|A|·max|B| = 8e60 overflows float32, but the exact ΔW peaks at 2e30: accepted."""
    a = make(model)
    A, B = a.tensors[SITE]["lora_A"], a.tensors[SITE]["lora_B"]
    A.zero_(), B.zero_()
    A[0, 0], A[1, :] = 1e30, 1.0
    B[0, 0], B[5, 1] = 1e-30, 1e30
    a.check_finite(torch.float32)
    B[5, 1] = 1e38                                        # exact peak 2e38 * ... > float32's max
    A[1, :] = 10.0
    with pytest.raises(NonFiniteError, match="its weight change at .*q_proj reaches 2e\\+39"):
        a.check_finite(torch.float32)


def test_the_two_config_files_must_agree(model, tmp_path):
    a = make(model)
    a.save(tmp_path / "a")
    Adapter.load(tmp_path / "a")                         # as saved: they agree
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    for key, value, shown in [("lora_alpha", 1e308, "lora_alpha (1e+308 vs 8)"),
                              ("target_modules", ATTN + ["made_up"],
                               f"target_modules ({ATTN + ['made_up']} vs {ATTN})")]:
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(CorruptAdapterError) as info:
            Adapter.load(tmp_path / "a")
        assert f"adapter_config.json and adapterkit.json disagree on {shown}; PEFT reads the first, adapterkit " \
               "the second" in str(info.value)
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    side = json.loads((tmp_path / "a" / "adapterkit.json").read_text())
    side["config"]["r"] = 8
    (tmp_path / "a" / "adapterkit.json").write_text(json.dumps(side))
    with pytest.raises(CorruptAdapterError, match=r"disagree on r \(4 vs 8\)"):
        Adapter.load(tmp_path / "a")


def test_a_damaged_head_stops_classification_but_not_generation(model, tmp_path):
    a = make(model, "clf")
    a.head = ClassificationHead.create(["x", "y"], 32, "last")
    root = tmp_path / "root"
    a.save(root / "clf")
    weights = root / "clf" / "task_head.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(CorruptAdapterError, match="task_head.safetensors is not a readable safetensors file"):
        Adapter.load(root / "clf")
    plain = Adapter.load(root / "clf", head=False)
    assert plain.head is None
    rt = AdapterRuntime(model, fingerprint=fingerprint(model), capacity=2)
    cache = AdapterCache(rt, adapter_dirs=[root], max_loaded=1)
    ids = input_ids(2, 5)
    with cache.acquire("clf"), torch.no_grad(), cache.batch(["clf", "clf"]):
        got = model(input_ids=ids).logits
    ref = AdapterRuntime(tiny_llama())
    ref.add(plain)
    with torch.no_grad(), ref.batch(["clf", "clf"]):
        torch.testing.assert_close(got, ref.model(input_ids=ids).logits)


def test_the_serving_cache_refuses_a_bad_adapter_alone(model, tmp_path):
    """Discovery finds every folder; reading the NaN one (or one that overflows float16 on a float16
    base) fails that acquire only, and the good one keeps serving."""
    root = tmp_path / "root"
    make(model, "good").save(root / "good")
    bad = make(model, "nan")
    bad.tensors[SITE]["lora_A"][0, 0] = float("nan")
    peft_folder(root / "nan", bad)
    big = make(model, "big")
    big.tensors[SITE]["lora_B"][0, 0] = 1e5
    big.save(root / "big")
    rt = AdapterRuntime(model, fingerprint=fingerprint(model), capacity=2)
    cache = AdapterCache(rt, adapter_dirs=[root], max_loaded=2)
    assert cache.names() == ["big", "good", "nan"]
    with pytest.raises(NonFiniteError, match=rf"tensor {SITE}.lora_A has 1 non-finite"):
        cache.acquire("nan")
    with cache.acquire("good"), cache.acquire("big"):
        pass
    half = tiny_llama().half()
    cache16 = AdapterCache(AdapterRuntime(half, fingerprint=fingerprint(model), capacity=2), adapter_dirs=[root])
    with pytest.raises(NonFiniteError, match="beyond float16's range"):
        cache16.acquire("big")
    with cache16.acquire("good"):
        pass
    assert cache16.stats()["load_errors"] == 1


def test_weights_must_be_float_and_at_targeted_sites(model, tmp_path):
    """Where PEFT would read the folder differently (or not at all), the load fails naming why."""
    a = make(model)
    a.tensors[SITE]["lora_A"] = a.tensors[SITE]["lora_A"].to(torch.int32)
    with pytest.raises(CorruptAdapterError, match=rf"{SITE}.lora_A is int32; LoRA weights are floating point"):
        Adapter.load(peft_folder(tmp_path / "ints", a))
    a = make(model)
    folder = peft_folder(tmp_path / "untargeted", a)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "v_proj"]}))
    with pytest.raises(CorruptAdapterError, match=r"site 'model.layers.0.self_attn.k_proj' is not matched by "
                                                  r"target_modules \('q_proj', 'v_proj'\)"):
        Adapter.load(folder)
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "exclude_modules": ["o_proj"]}))
    with pytest.raises(CorruptAdapterError, match=r"o_proj' is not matched by target_modules"):
        Adapter.load(folder)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    (folder / "adapterkit.json").mkdir()
    with pytest.raises(CorruptAdapterError, match="adapterkit.json is not a file"):
        Adapter.load(folder)
