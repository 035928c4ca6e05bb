"""The low-bit codec (codecs/lowbit.py) and low-bit adapters end to end: the quantizer's optimum, packing,
the native format, `adapter quantize` / `inspect` / `ls` / `export-peft`, and the bad inputs the issue
lists (a packed tensor whose length does not match, bits not in 1/2/4/8)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TARGETS, input_ids, save_tiny
from typer.testing import CliRunner

from adapterkit import (Adapter, AdapterRuntime, BottleneckConfig, ConfigError, CorruptAdapterError, LoraConfig,
                        SparseConfig, UnsupportedError, create_adapter, load_base)
from adapterkit.cli import app
from adapterkit.codecs import LowBit, Packed, pack, quantize

BITS = (1, 2, 4, 8)


def _mse(x: torch.Tensor, codec: LowBit, step: torch.Tensor) -> torch.Tensor:
    """Per-group squared error of x [G, g] read back on the nearest levels of `step` [G] (float32)."""
    half = 2 ** (codec.bits - 1)
    k = torch.floor(x / step.unsqueeze(1)).clamp(-half, half - 1) + 0.5
    return ((x - k * step.unsqueeze(1)) ** 2).sum(1)


@pytest.mark.parametrize("bits", BITS)
def test_the_fitted_step_is_as_good_as_an_exhaustive_search(bits):
    torch.manual_seed(bits)
    x = torch.randn(50, 64) * torch.rand(50, 1)          # groups of different spread
    codec = LowBit(bits)
    codes, step = codec.fit(x)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2 ** bits and step.dtype == torch.float16
    got = ((codec.read(codes, step) - x) ** 2).sum(1)
    torch.testing.assert_close(got, _mse(x, codec, step.float()), rtol=1e-5, atol=1e-7)   # nearest levels
    maxed = x.abs().amax(1) / (2 ** (bits - 1) - 0.5)     # the naive range-covering step
    search = torch.stack([_mse(x, codec, maxed * f) for f in torch.linspace(0.05, 1.0, 1000)]).min(0).values
    assert float(got.sum()) <= 1.01 * float(search.sum())         # as good as a 1000-point search, in total
    assert float(got.sum()) < float(_mse(x, codec, maxed).sum()) or bits == 1


def test_one_bit_is_the_sign_times_the_mean_magnitude():
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    codec = LowBit(1)
    values = codec.read(*codec.fit(x))
    assert torch.equal(values.sign(), x.sign())
    torch.testing.assert_close(values.abs(), x.abs().mean(1, keepdim=True).half().float().expand(-1, 64))


def test_pack_and_unpack_many_tensors_with_padding_zeros_and_huge_values():
    torch.manual_seed(1)
    tensors = {"s0": {"a": torch.randn(3, 7), "b": torch.zeros(5, 2)},     # 21 and 10 values: padded groups
               "s1": {"a": torch.randn(4, 4)}}
    keys = [("s0", "a"), ("s0", "b"), ("s1", "a")]
    huge = {"s": {"a": torch.randn(4, 4) * 1e9}}                           # steps beyond float16
    for bits in BITS:
        codec = LowBit(bits, group_size=8)
        packed = pack(codec, tensors, keys)
        assert packed.codes.numel() == (24 + 16 + 16) * bits // 8 and packed.scales.numel() == 7
        assert packed.scales.dtype == torch.float16
        out = packed.unpack()
        for site, key in keys:                  # each tensor packed as if alone (its groups start fresh)
            assert torch.equal(out[site][key], codec.round_trip(tensors[site][key])), (bits, site, key)
        assert torch.equal(out["s0"]["b"], torch.zeros(5, 2))
        shared = packed.unpack(copy=False)
        assert shared["s0"]["a"].untyped_storage().data_ptr() == shared["s1"]["a"].untyped_storage().data_ptr()
        big = pack(codec, huge, [("s", "a")])
        assert big.scales.dtype == torch.float32
        got, want = big.unpack()["s"]["a"], huge["s"]["a"]
        assert float((got - want).norm() / want.norm()) < {1: 0.75, 2: 0.45, 4: 0.15, 8: 0.01}[bits]


def test_bad_codec_settings_and_mismatched_buffers_are_refused():
    with pytest.raises(ConfigError, match=r"bits must be 1, 2, 4 or 8, got 3: low-bit adapters pack 8/bits codes"):
        LowBit(3)
    with pytest.raises(ConfigError, match=r"group_size must be a positive multiple of 8, got 12"):
        LowBit(1, 12)
    packed = pack(LowBit(2, 8), {"s": {"a": torch.randn(4, 4)}}, [("s", "a")])
    short = Packed(packed.codec, packed.layout, packed.codes[:-1], packed.scales)
    with pytest.raises(CorruptAdapterError, match=r"f: the packed codes are uint8 \[3\]; 1 tensors of 16 values "
                       r"\(padded to groups of 8\) at 2 bit\(s\) need uint8 \[4\]: the file is truncated"):
        short.check("f")
    few = Packed(packed.codec, packed.layout, packed.codes, packed.scales[:1])
    with pytest.raises(CorruptAdapterError, match=r"the packed scales are float16 \[1\]; 16 values in groups of 8 "
                       r"need float16 or float32 \[2\]"):
        few.check("f")
    nan = Packed(packed.codec, packed.layout, packed.codes, torch.tensor([float("nan"), 1.0], dtype=torch.float16))
    with pytest.raises(CorruptAdapterError, match=r"1 packed scale\(s\) are negative, NaN or inf"):
        nan.check("f")


def test_one_bit_rank_16_is_over_20x_smaller_than_fp32():
    """The issue's storage target, on SmolLM2's attention shapes (d 576, k/v 192), rank 16, q,k,v,o."""
    shapes = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576)}
    tensors = {f"l{i}.{n}": {"lora_A": torch.randn(16, d_in), "lora_B": torch.randn(d_out, 16)}
               for i in range(2) for n, (d_out, d_in) in shapes.items()}
    fp32 = sum(t.numel() * 4 for parts in tensors.values() for t in parts.values())
    packed = pack(LowBit(1), tensors, [(s, k) for s, parts in tensors.items() for k in parts])
    assert fp32 / packed.nbytes == pytest.approx(25.6)       # 32 bits / (1 + 16/64)


@pytest.fixture
def llama(tmp_path):
    return load_base(str(save_tiny("llama", tmp_path / "llama")))


def _lora(base, name="a", seed=0):
    return create_adapter(name, base.model, LoraConfig(r=4, target_modules=TARGETS["llama"], init="nonzero",
                                                       init_std=0.3), seed=seed)


def _logits(base, adapter, ids):
    rt = AdapterRuntime.from_base(base)
    rt.add(adapter)
    with torch.no_grad(), rt.batch([adapter.name] * ids.shape[0]):
        return rt.model(ids).logits


@pytest.mark.parametrize("bits", BITS)
def test_a_low_bit_adapter_saves_packed_and_loads_the_same_values(llama, tmp_path, bits):
    a = _lora(llama)
    q = quantize(a, LowBit(bits, 8), "a-q")
    assert q.summary() == f"lora r=4 alpha=16, {bits}-bit g8" and q.num_parameters() == a.num_parameters()
    assert not any(torch.equal(q.tensors[s]["lora_A"], a.tensors[s]["lora_A"]) for s in a.sites)
    q.save(tmp_path / "q")
    assert not (tmp_path / "q" / "adapter_config.json").exists()     # PEFT has no low-bit adapters: native
    side = json.loads((tmp_path / "q" / "adapterkit.json").read_text())
    assert side["codec"]["bits"] == bits and len(side["codec"]["layout"]) == 2 * len(a.sites)
    back = Adapter.load(tmp_path / "q")
    assert back.packed is not None and back.summary() == q.summary()
    for s in a.sites:
        for k in ("lora_A", "lora_B"):
            assert torch.equal(back.tensors[s][k], q.tensors[s][k]), (s, k)
    file_bytes = (tmp_path / "q" / "adapter.safetensors").stat().st_size
    assert back.stored_bytes() == q.packed.nbytes < file_bytes < q.packed.nbytes + 2048
    ids = input_ids(2, 5)
    torch.testing.assert_close(_logits(llama, back, ids), _logits(llama, q.dequantized(), ids))
    if bits == 8:                                   # 8 bits is close to the float adapter, and it moves the output
        bare = llama.model(ids).logits
        want = _logits(llama, a, ids)
        assert float((want - bare).abs().max()) > 1e-2
        assert float((_logits(llama, back, ids) - want).abs().max()) < 0.05 * float((want - bare).abs().max())


def test_a_bottleneck_quantizes_its_matrices_and_keeps_its_biases(llama, tmp_path):
    cfg = BottleneckConfig(target_modules=("mlp",), reduction_factor=4, init="nonzero", init_std=0.2)
    a = create_adapter("b", llama.model, cfg)
    q = quantize(a, LowBit(4, 8))
    layout = {(s, k) for s, k, _ in q.packed.layout}
    for s, parts in a.tensors.items():
        for k, t in parts.items():
            assert ((s, k) in layout) == (t.dim() >= 2), (s, k)
            if t.dim() < 2:
                assert torch.equal(q.tensors[s][k], t)
    q.save(tmp_path / "b")
    back = Adapter.load(tmp_path / "b")
    ids = input_ids(2, 5)
    torch.testing.assert_close(_logits(llama, back, ids), _logits(llama, q.dequantized(), ids))


def test_a_family_without_float_matrices_is_refused(llama):
    sp = create_adapter("sp", llama.model, SparseConfig(target_modules=tuple(TARGETS["llama"]), init="random"))
    with pytest.raises(UnsupportedError, match=r"adapter 'sp', a sparse adapter, has no float matrix to quantize "
                       r"\(the low-bit codec packs matrices; vectors and integer tensors stay as they are\)"):
        quantize(sp, LowBit(1))


def test_damaged_packed_folders_are_refused_with_the_fix(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    quantize(_lora(llama), LowBit(1, 8)).save(tmp_path / "q")
    weights = tmp_path / "q" / "adapter.safetensors"
    flat = load_file(str(weights))
    cut = {**flat, "__codec__.codes": flat["__codec__.codes"][:-1]}
    save_file(cut, str(weights))
    with pytest.raises(CorruptAdapterError, match=r"the packed codes are uint8 \[\d+\]; .* need uint8 \[\d+\]: the "
                       r"file is truncated or was edited; quantize the adapter again"):
        Adapter.load(tmp_path / "q")
    save_file({k: v for k, v in flat.items() if k != "__codec__.scales"}, str(weights))
    with pytest.raises(CorruptAdapterError, match=r"says the adapter is packed \(1 bit\(s\)\) but the file lacks "
                       r"__codec__.codes or __codec__.scales"):
        Adapter.load(tmp_path / "q")
    save_file(flat, str(weights))
    side = json.loads((tmp_path / "q" / "adapterkit.json").read_text())
    (tmp_path / "q" / "adapterkit.json").write_text(json.dumps({**side, "codec": {**side["codec"], "bits": 3}}))
    with pytest.raises(CorruptAdapterError, match=r"the codec record is malformed \(bits must be 1, 2, 4 or 8, got 3"):
        Adapter.load(tmp_path / "q")
    del side["codec"]
    side["config"]["type"] = "lora"
    (tmp_path / "q" / "adapterkit.json").write_text(json.dumps(side))
    with pytest.raises(CorruptAdapterError):                 # no codec record: read as PEFT's format, which is absent
        Adapter.load(tmp_path / "q")


def test_cli_quantize_inspect_ls_and_export_peft(llama, tmp_path):
    peft = pytest.importorskip("peft")
    from adapterkit.store import AdapterStore

    store = tmp_path / "s"
    a = _lora(llama)
    a.meta.base_name = str(tmp_path / "llama")
    AdapterStore(store).put(a)
    res = CliRunner().invoke(app, ["adapter", "quantize", "a", "--bits", "1", "--name", "a-1b", "--group-size", "8",
                                   "--store", str(store), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["bits"] == 1 and report["summary"] == "lora r=4 alpha=16, 1-bit g8"
    assert report["bytes_before"] / report["bytes_after"] == pytest.approx(32 / (1 + 16 / 8))
    assert 0.4 < report["relative_error_mean"] < 0.8
    row = AdapterStore(store).show("a-1b")
    assert row["summary"] == "lora r=4 alpha=16, 1-bit g8" and row["lineage"][0]["op"] == "quantize"
    assert row["bytes"] < AdapterStore(store).show("a")["bytes"]
    res = CliRunner().invoke(app, ["adapter", "inspect", "a-1b", "--store", str(store), "--json"])
    info = json.loads(res.output)
    assert (info["bits"], info["group_size"], info["weights"]) == (1, 8, "native adapter.safetensors")
    res = CliRunner().invoke(app, ["ls", "--store", str(store)])
    assert "1-bit g8" in res.output and "size" in res.output
    res = CliRunner().invoke(app, ["adapter", "quantize", "a", "--bits", "3", "--name", "x", "--store", str(store)])
    assert res.exit_code == 2 and "bits must be 1, 2, 4 or 8, got 3" in res.output

    res = CliRunner().invoke(app, ["adapter", "export-peft", "a-1b", "--out", str(tmp_path / "peft"),
                                   "--store", str(store)])
    assert res.exit_code == 0, res.output
    assert "dequantized from 1-bit g8" in res.output
    q = AdapterStore(store).get("a-1b")
    ids = input_ids(2, 5)
    ours = _logits(llama, q, ids)
    fresh = load_base(str(tmp_path / "llama")).model
    pm = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = pm(ids).logits
    assert float((ours - llama.model(ids).logits).abs().max()) > 1e-2      # the adapter moves the output
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    sp = create_adapter("sp", llama.model, SparseConfig(target_modules=tuple(TARGETS["llama"]), init="random"))
    AdapterStore(store).put(sp)
    res = CliRunner().invoke(app, ["adapter", "export-peft", "sp", "--out", str(tmp_path / "p2"), "--store", str(store)])
    assert res.exit_code == 2 and "PEFT has no such family" in res.output
    assert math.isfinite(report["relative_error_max"])


def test_the_cache_holds_low_bit_adapters_packed_and_serves_their_values(tmp_path):
    """The RAM tier keeps (and counts) the packed bytes, so one budget holds many more low-bit adapters;
    attach unpacks, and the served logits are the dequantized adapter's."""
    from adapterkit.core.base import fingerprint
    from adapterkit.serve import AdapterCache
    from conftest import tiny_llama

    model = tiny_llama()
    rt = AdapterRuntime(model, fingerprint=fingerprint(model), base_name="tiny", capacity=2)
    floats, packed = tmp_path / "floats", tmp_path / "packed"
    for i in range(6):
        a = create_adapter(f"a{i}", model, LoraConfig(r=8, target_modules=TARGETS["llama"], init="nonzero",
                                                      init_std=0.3), seed=i, fingerprint=rt.fingerprint)
        a.save(floats / a.name)
        quantize(a, LowBit(1, 16)).save(packed / a.name)
    fp32 = Adapter.load(floats / "a0").stored_bytes()
    one_bit = Adapter.load(packed / "a0").stored_bytes()
    assert fp32 / one_bit == pytest.approx(32 / 2)            # 1 bit + a float16 scale per 16 values
    budget = 3 * fp32 / 2 ** 20                                # three float adapters fit, not four
    results = {}
    for kind, root in (("floats", floats), ("packed", packed)):
        model = tiny_llama()                                   # the same weights, a runtime of its own
        cache = AdapterCache(AdapterRuntime(model, fingerprint=rt.fingerprint, base_name="tiny", capacity=2),
                             adapter_dirs=[root], max_loaded=2, ram_cache_mb=budget)
        for i in range(6):
            cache.prefetch(f"a{i}").result()
        s = cache.stats()
        results[kind] = s
        per = fp32 if kind == "floats" else one_bit
        assert s["ram_bytes"] == per * len(s["ram_adapters"])
        ids = input_ids(2, 5)
        with torch.no_grad(), cache.acquire("a2"), cache.acquire("a5"), cache.batch(["a2", "a5"]):
            got = model(ids).logits
            assert cache.stats()["active_bytes"] == 2 * fp32  # attached: unpacked floats, as the float ones
        ref = tiny_llama()
        want_rt = AdapterRuntime(ref)
        for n in ("a2", "a5"):
            want_rt.add(Adapter.load(root / n))
        with torch.no_grad(), want_rt.batch(["a2", "a5"]):
            want = ref(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        cache.close()
    assert len(results["floats"]["ram_adapters"]) == 3 and len(results["packed"]["ram_adapters"]) == 6
