"""The method contract apart from LoRA (issue 13 §1), with the toy families of toy_methods.py: every
attachment point and stage, integer tensors kept exact end to end, a fixed order of methods at one
site, and rows of every family in one batch equal to a float64 reference run of each row alone."""

import pytest
import torch
from conftest import input_ids, save_tiny
from method_reference import reference
from toy_methods import TOYS, register_toys, unregister_toys

from adapterkit import Adapter, AdapterRuntime, LoraConfig, create_adapter, load_base
from adapterkit.errors import CorruptAdapterError, UnsupportedError
from adapterkit.methods import get_method
from adapterkit.store import AdapterStore

BIG = 2 ** 24 + 1          # the first integer float32 cannot hold: 16777217 -> 16777216.0


@pytest.fixture
def toys():
    register_toys()
    yield {t.name: t for t in TOYS}
    unregister_toys()


@pytest.fixture
def llama(tmp_path):
    return load_base(str(save_tiny("llama", tmp_path / "llama")))


def make(name, base, method, targets, seed=0, **extra):
    if method == "lora":
        config = LoraConfig(r=2, alpha=4.0, target_modules=targets, init="nonzero", init_std=0.3)
    else:
        config = get_method(method).config_cls(target_modules=targets, **extra)
    return create_adapter(name, base.model, config, seed=seed, fingerprint=base.fingerprint, base_name=base.name)


def family_adapters(base):
    return {
        "lora": make("a-lora", base, "lora", ("q_proj", "v_proj"), 1),
        "offset": make("a-offset", base, "offset", ("q_proj", "down_proj"), 2, tag=BIG),
        "gain": make("a-gain", base, "gain", ("q_proj", "o_proj"), 3),
        "inscale": make("a-inscale", base, "inscale", ("down_proj", "q_proj"), 4),
        "around": make("a-around", base, "around", ("mlp",), 5),
    }


def test_every_family_changes_the_output_and_mixed_rows_equal_the_reference(toys, llama):
    adapters = family_adapters(llama)
    rt = AdapterRuntime.from_base(llama, capacity=2)         # small: slots must grow
    for a in adapters.values():
        rt.add(a)
    ids = input_ids(len(adapters) + 2, 7)
    names = list(adapters)
    rows = [[adapters[n]] for n in names] + [[], [adapters["lora"], adapters["gain"]]]
    entries = [n and f"a-{n}" for n in names] + [None, {"a-lora": 1.0, "a-gain": 1.0}]
    want = reference(llama.model, rows, ids)
    with torch.no_grad():
        bare = llama.model(ids).logits
        for kernel in ("dense", "gather"):
            with rt.batch(entries, kernel=kernel):
                got = llama.model(ids).logits
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    for i, n in enumerate(names):               # no family passes vacuously
        assert (want[i] - bare[i].double()).abs().max() > 1e-3, n
    torch.testing.assert_close(bare[len(names)], got[len(names)], atol=0, rtol=0)    # the base row is bare


def test_stage_fixes_the_order_at_one_site_whatever_the_attach_order(toys, llama):
    lora, gain = make("l", llama, "lora", ("q_proj",), 1), make("g", llama, "gain", ("q_proj",), 2)
    ids = input_ids(2, 5)
    want = reference(llama.model, [[lora, gain]] * 2, ids)      # gain scales (W + ΔW) x
    for order in ([lora, gain], [gain, lora]):
        rt = AdapterRuntime.from_base(llama)
        for a in order:
            rt.add(a)
        with torch.no_grad(), rt.batch([{"l": 1.0, "g": 1.0}] * 2):
            torch.testing.assert_close(llama.model(ids).logits.double(), want, atol=1e-4, rtol=1e-4)
        for a in order:
            rt.remove(a.name)


def test_integer_tensors_stay_exact_through_attach_save_load_and_store(toys, llama, tmp_path):
    a = make("ints", llama, "offset", ("q_proj",), tag=BIG)
    site = next(iter(a.tensors))
    assert a.tensors[site]["tag"].dtype == torch.int64 and int(a.tensors[site]["tag"]) == BIG
    llama.model.to(torch.bfloat16)              # a bf16 base: floats are cast to it, integers never
    rt = AdapterRuntime.from_base(llama)
    rt.add(a)
    held = rt._sites[site].pools["offset"].held[rt.slot("ints")]
    assert held["tag"].dtype == torch.int64 and int(held["tag"]) == BIG and held["idx"].dtype == torch.int64
    assert held["val"].dtype == torch.bfloat16
    a.save(tmp_path / "ints")
    assert not (tmp_path / "ints" / "adapter_config.json").exists()       # no PEFT format for this family
    back = Adapter.load(tmp_path / "ints")
    assert back.tensors[site]["tag"].dtype == torch.int64 and int(back.tensors[site]["tag"]) == BIG
    assert torch.equal(back.tensors[site]["val"], a.tensors[site]["val"]) and back.config == a.config
    store = AdapterStore(tmp_path / "store")
    store.put(a)
    got = store.get("ints")
    assert int(got.tensors[site]["tag"]) == BIG and store.show("ints")["summary"] == f"offset on {len(a.tensors)} sites"


def test_native_load_refuses_tensors_of_the_wrong_dtype_or_names(toys, llama, tmp_path):
    a = make("bad", llama, "offset", ("q_proj",))
    site = next(iter(a.tensors))
    a.tensors[site]["idx"] = a.tensors[site]["idx"].float()
    a.save(tmp_path / "f")
    with pytest.raises(CorruptAdapterError, match=rf"{site}.idx is float32; an offset adapter's idx is int64: "
                                                  "re-save the adapter"):
        Adapter.load(tmp_path / "f")
    a = make("bad", llama, "offset", ("q_proj",))
    del a.tensors[site]["tag"]
    a.save(tmp_path / "g")
    with pytest.raises(CorruptAdapterError, match=r"an offset adapter has tensors \['idx', 'tag', 'val'\] at each "
                                                  rf"site; site '{site}' has \['idx', 'val'\]"):
        Adapter.load(tmp_path / "g")


def test_training_moves_only_trainable_tensors(toys, llama):
    from adapterkit.train.trainer import TrainConfig, train

    a = make("t", llama, "offset", ("q_proj",), tag=BIG)
    site = next(iter(a.tensors))
    idx, val = a.tensors[site]["idx"].clone(), a.tensors[site]["val"].clone()
    rt = AdapterRuntime.from_base(llama)
    rt.add(a)
    ids = input_ids(4, 6)

    def loss(model, batch):
        return model(**batch).logits.float().pow(2).mean()

    train(rt, "t", [ids[i] for i in range(4)], lambda rows: {"input_ids": torch.stack(rows)}, loss,
          TrainConfig(steps=3, batch_size=2, lr=0.1, weight_decay=0.1))
    t = rt.adapters["t"].tensors[site]
    assert torch.equal(t["idx"], idx) and int(t["tag"]) == BIG and t["idx"].dtype == torch.int64
    assert not torch.equal(t["val"], val)


def test_merging_a_family_without_a_weight_change_is_refused_by_name(toys, llama):
    from adapterkit.merge import merge

    a = make("g", llama, "gain", ("q_proj",))
    rt = AdapterRuntime.from_base(llama)
    rt.add(a)
    with pytest.raises(UnsupportedError, match="adapter 'g' is a gain adapter, which is not linear in the base "
                                               "weights: it cannot be merged into the base"):
        rt.merge("g")
    with pytest.raises(UnsupportedError, match="merge 'ties' is not defined for adapter 'g', a gain adapter: it is "
                                               "not linear in the base weights"):
        merge([a, make("l", llama, "lora", ("q_proj",))], method="ties")


def test_a_peft_folder_of_another_method_is_refused_by_name(tmp_path):
    import json

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 8,
                                                              "target_modules": ["q_proj"]}))
    with pytest.raises(UnsupportedError, match="PEFT method 'LOHA' is not supported; adapterkit reads PEFT IA3, LORA adapters"):
        Adapter.load(tmp_path)


def test_the_serving_cache_discovers_a_native_folder_keeps_integers_and_counts_their_bytes(toys, llama, tmp_path):
    from adapterkit.serve.cache.roots import AdapterRoots
    from adapterkit.serve.cache.tiers import read_entry

    a = make("ints", llama, "offset", ("q_proj",), tag=BIG)
    a.save(tmp_path / "served" / "ints")
    roots = AdapterRoots(dirs=[tmp_path / "served"])
    src = roots.scan()["ints"]                                         # a native folder is discovered
    entry = read_entry(src, roots, torch.bfloat16)
    site = next(iter(entry.adapter.tensors))
    parts = entry.adapter.tensors[site]
    assert int(parts["tag"]) == BIG and parts["idx"].dtype == torch.int64 and parts["val"].dtype == torch.bfloat16
    # int64: 8 bytes an entry (idx 2 + tag 1), the float in the base dtype: 2 bytes (val 2), per site
    assert entry.nbytes == len(entry.adapter.tensors) * (3 * 8 + 2 * 2)


def test_the_folder_format_identifiers_do_not_follow_module_paths(llama, tmp_path):
    """adapterkit.json's type is a format name, written by every version: a folder saved before the
    layout moved (type "adapterkit.adapter") loads, and new folders are written the same way."""
    import json

    a = make("keep", llama, "lora", ("q_proj",))
    a.save(tmp_path / "a")
    side = json.loads((tmp_path / "a" / "adapterkit.json").read_text())
    assert side["type"] == "adapterkit.adapter" and side["format_version"] == 1
    assert Adapter.load(tmp_path / "a").name == "keep"
