"""Adapters on Conv2d, as PEFT defines them (LoRA: a conv A and a 1x1 conv B; IA3: one scale per channel):
equal outputs with PEFT both ways, mixed batches per image, merge into the base, weight-space merges, and
clear refusals (grouped convs, families without conv support). Bottleneck adapters after conv blocks (PEFT
has none): against the float64 reference, per image in mixed batches.

A random MobileNetV2 (5 classes, BatchNorm statistics randomised so no layer is an identity) at 64x64."""

from __future__ import annotations

import copy

import pytest
import torch

from adapterkit import AdapterRuntime, LoraConfig, create_adapter, merge
from adapterkit.core.adapter import Adapter
from adapterkit.errors import ConfigError, UnsupportedError
from adapterkit.methods.bottleneck import BottleneckConfig
from adapterkit.methods.ia3 import Ia3Config
from adapterkit.methods.sparse import SparseConfig
from adapterkit.vision.mobilenet import MobileNetConfig, MobileNetV2

def _peft():
    return pytest.importorskip("peft")          # only the PEFT comparisons need it

# the stem 3x3 conv, a block's 1x1 expand and projection, the last 1x1: every geometry MobileNetV2 has
TARGETS = ["features.0.0", "features.2.conv.0.0", "features.2.conv.2", "features.18.0"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def net() -> MobileNetV2:
    torch.manual_seed(0)
    m = MobileNetV2(MobileNetConfig(num_classes=5)).eval().requires_grad_(False)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def conv_lora(name: str, net: MobileNetV2, seed: int, r: int = 4, **kw) -> Adapter:
    cfg = LoraConfig(r=r, alpha=2 * r, target_modules=TARGETS, init="nonzero", init_std=0.05, **kw)
    return create_adapter(name, net, cfg, seed=seed)


def test_conv_tensors_have_peft_layout(net):
    a = conv_lora("a", net, 0)
    shapes = {s: {k: tuple(t.shape) for k, t in p.items()} for s, p in a.tensors.items()}
    assert shapes == {"features.0.0": {"lora_A": (4, 3, 3, 3), "lora_B": (32, 4, 1, 1)},
                      "features.2.conv.0.0": {"lora_A": (4, 16, 1, 1), "lora_B": (96, 4, 1, 1)},
                      "features.2.conv.2": {"lora_A": (4, 96, 1, 1), "lora_B": (24, 4, 1, 1)},
                      "features.18.0": {"lora_A": (4, 320, 1, 1), "lora_B": (1280, 4, 1, 1)}}
    bound = 1 / (3 * 3 * 3) ** 0.5                           # kaiming bound over C_in·kh·kw, as PEFT
    assert float(a.tensors["features.0.0"]["lora_A"].abs().max()) <= bound


@torch.no_grad()
def test_outputs_equal_peft_both_ways(net, tmp_path):
    x = images()
    a = conv_lora("a", net, 1)
    rt = AdapterRuntime(net)
    rt.add(a)
    base = net(x)
    with rt.batch(["a"] * 3):
        ours = net(x)
    rt.remove("a")
    assert float((ours - base).abs().max()) > 1e-3             # the adapter moves the logits
    a.save(tmp_path / "ours")                                 # ours -> PEFT
    peft = _peft()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(net), str(tmp_path / "ours")).eval()
    assert torch.allclose(theirs(x), ours, atol=ATOL)
    # PEFT -> ours: PEFT's own conv LoRA (non-zero B), saved by PEFT, loaded and run by us
    cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=TARGETS, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(net), cfg).eval()
    want = pm(x)
    pm.save_pretrained(str(tmp_path / "peft"))
    loaded = Adapter.load(tmp_path / "peft", name="p")
    rt.add(loaded)
    with rt.batch(["p"] * 3):
        got = net(x)
    rt.remove("p")
    assert float((want - base).abs().max()) > 1e-3 and torch.allclose(got, want, atol=ATOL)


@torch.no_grad()
def test_mixed_batch_per_image_equals_one_adapter_at_a_time(net):
    x = images(5, seed=1)
    rt = AdapterRuntime(net)
    for i, name in enumerate(("a", "b", "c")):
        rt.add(conv_lora(name, net, 10 + i, r=2 + i))
    rows = ["a", None, "c", {"a": 0.5, "b": 1.5}, "b"]
    with rt.batch(rows):
        mixed = net(x)
    for i, row in enumerate(rows):
        with rt.batch([row]):
            alone = net(x[i:i + 1])
        assert torch.allclose(mixed[i:i + 1], alone, atol=ATOL), row
    with rt.disabled():
        assert torch.allclose(mixed[1:2], net(x[1:2]), atol=1e-6)   # the row without an adapter: the base


@torch.no_grad()
def test_pool_matches_the_float64_reference(net):
    """The conv pool against LoRA's float64 reference forward, site by site, on a mixed batch."""
    from adapterkit.core.targets import site_info
    from adapterkit.methods.registry import get_method

    lora = get_method("lora")
    adapters = [conv_lora(n, net, 20 + i) for i, n in enumerate("ab")]
    rt = AdapterRuntime(net)
    for a in adapters:
        rt.add(a)
    module = dict(net.named_modules())["features.0.0"]
    info = site_info("features.0.0", module)
    x = images(4, seed=2)
    y = torch.nn.functional.conv2d(x, module.weight, None, 2, 1)
    batch = rt.make_batch(["a", "b", None, "b"])
    pool = rt._sites["features.0.0"].pools["lora"]
    got = pool.apply(x, y, batch, training=False)
    for i, who in enumerate([0, 1, None, 1]):
        want = y[i:i + 1].double() if who is None else lora.reference(
            adapters[who].config, info, adapters[who].tensors["features.0.0"], x[i:i + 1], y[i:i + 1])
        assert torch.allclose(got[i:i + 1].double(), want, atol=1e-5)


@torch.no_grad()
def test_merge_into_base_equals_unmerged_and_unmerges_exactly(net):
    x = images()
    rt = AdapterRuntime(net)
    rt.add(conv_lora("a", net, 3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert_merge_equals_unmerged(rt, net, "a", x)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def assert_merge_equals_unmerged(rt: AdapterRuntime, net: MobileNetV2, name: str, x: torch.Tensor) -> None:
    """The adapter merged into the conv weights gives its unmerged outputs; then it is unmerged."""
    with rt.batch([name] * x.shape[0]):
        unmerged = net(x)
    rt.merge(name)
    with rt.disabled():
        merged = net(x)
    rt.unmerge()
    assert torch.allclose(merged, unmerged, atol=1e-4)


@torch.no_grad()
def test_weight_space_merge_of_conv_adapters_keeps_the_layout(net):
    a, b = conv_lora("a", net, 4), conv_lora("b", net, 5, r=2)
    out = merge([a, b], method="linear", weights=[0.5, 0.5], name="m")
    assert out.tensors["features.0.0"]["lora_A"].shape == (6, 3, 3, 3)
    assert out.tensors["features.0.0"]["lora_B"].shape == (32, 6, 1, 1)
    x = images()
    rt = AdapterRuntime(net)
    for ad in (a, b, out):
        rt.add(ad)
    with rt.batch([{"a": 0.5, "b": 0.5}] * 3):
        stacked = net(x)
    with rt.batch(["m"] * 3):
        merged = net(x)
    assert torch.allclose(merged, stacked, atol=1e-4)         # a linear merge of ΔW is exact


def test_grouped_conv_and_families_without_conv_support_are_refused(net):
    with pytest.raises(UnsupportedError, match=r"target module 'features.2.conv.1.0' is a Conv2d with groups > 1 "
                                               r"\(a depthwise or grouped conv\): adapt the 1x1 \(pointwise\)"):
        create_adapter("dw", net, LoraConfig(target_modules=["features.2.conv.1.0"]))
    with pytest.raises(UnsupportedError, match=r"adapter 'sp': sparse does not adapt a convolution \(nn.Conv2d\) "
                                               r"\(features.2.conv.2\); it adapts linear layers: choose target_modules "
                                               r"of those kinds, or LoRA for convolutions"):
        create_adapter("sp", net, SparseConfig(target_modules=["features.2.conv.2"]))


def test_training_reaches_the_conv_adapter(net):
    """Gradients flow into lora_A and lora_B through the conv pool (the dense path of training)."""
    a = conv_lora("t", net, 6)
    for parts in a.tensors.values():
        for t in parts.values():
            t.requires_grad_(True)
    rt = AdapterRuntime(net)
    rt.add(a)
    rt.activate("t")
    loss = net(images(2)).square().mean()
    loss.backward()
    rt.deactivate()
    assert all(t.grad is not None and float(t.grad.abs().sum()) > 0 for p in a.tensors.values() for t in p.values())


# ------------------------------------------------------------------ IA3: one scale per channel
IA3_TARGETS = ["features.2.conv.0.0", "features.2.conv.2", "features.18.0"]
IA3_FF = ["features.2.conv.2"]                    # its input channels scaled (PEFT's feedforward_modules)


def conv_ia3(name: str, net: MobileNetV2, seed: int) -> Adapter:
    return create_adapter(name, net, Ia3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FF,
                                               init="nonzero", init_std=0.3), seed=seed)


@torch.no_grad()
def test_ia3_on_channels_equals_peft_both_ways(net, tmp_path):
    x = images()
    a = conv_ia3("i", net, 7)
    assert a.tensors["features.2.conv.2"]["ia3_l"].shape == (1, 96, 1, 1)        # input channels
    assert a.tensors["features.18.0"]["ia3_l"].shape == (1, 1280, 1, 1)          # output channels
    rt = AdapterRuntime(net)
    rt.add(a)
    base = net(x)
    with rt.batch(["i"] * 3):
        ours = net(x)
    rt.remove("i")
    assert float((ours - base).abs().max()) > 1e-3
    a.save(tmp_path / "ours")
    peft = _peft()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(net), str(tmp_path / "ours")).eval()
    assert torch.allclose(theirs(x), ours, atol=ATOL)
    cfg = peft.IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FF, init_ia3_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(net), cfg).eval()
    want = pm(x)
    pm.save_pretrained(str(tmp_path / "peft"))
    rt.add(Adapter.load(tmp_path / "peft", name="p"))
    with rt.batch(["p"] * 3):
        got = net(x)
    assert float((want - base).abs().max()) > 1e-3 and torch.allclose(got, want, atol=ATOL)


@torch.no_grad()
def test_ia3_mixed_with_lora_per_image_and_merged_into_the_base(net):
    x = images(4, seed=3)
    rt = AdapterRuntime(net)
    rt.add(conv_ia3("i", net, 8))
    rt.add(conv_lora("l", net, 9))
    rows = ["i", "l", {"i": 1.0, "l": 1.0}, None]
    with rt.batch(rows):
        mixed = net(x)
    for k, row in enumerate(rows):
        with rt.batch([row]):
            assert torch.allclose(mixed[k:k + 1], net(x[k:k + 1]), atol=ATOL), row
    assert_merge_equals_unmerged(rt, net, "i", x)


# ------------------------------------------------------------------ bottleneck after conv blocks
def conv_bottleneck(name: str, net: MobileNetV2, seed: int, placement: str = "pfeiffer",
                    targets=("features.2", "features.3", "features.18")) -> Adapter:
    cfg = BottleneckConfig(target_modules=list(targets), placement=placement, reduction_factor=4, init="nonzero",
                           init_std=0.05)
    return create_adapter(name, net, cfg, seed=seed)


@torch.no_grad()
def test_bottleneck_after_conv_blocks_matches_the_reference_per_image(net):
    from adapterkit.core.targets import site_info
    from adapterkit.methods.registry import get_method

    bottleneck = get_method("bottleneck")
    a = conv_bottleneck("p", net, 11)
    b = conv_bottleneck("q", net, 12, placement="parallel", targets=("features.3", "features.5"))
    # features.2 maps 16 -> 24 channels at stride 2; features.18 (a conv-norm-act) 320 -> 1280
    assert a.tensors["features.2"]["down"].shape == (6, 24) and a.tensors["features.18"]["up"].shape == (1280, 320)
    assert b.tensors["features.3"]["down"].shape == (6, 24)              # parallel: reads the block input
    rt = AdapterRuntime(net)
    rt.add(a)
    rt.add(b)
    x = images(4, seed=4)
    block = dict(net.named_modules())["features.3"]
    h = net.features[:3](x)                                  # features.3's input
    y = block(h)
    batch = rt.make_batch(["p", "q", None, {"p": 1.0, "q": 1.0}])
    info = site_info("features.3", block, "module")
    assert info.kind == "conv-module" and info.conv == ((1, 1), (1, 1), (0, 0))
    got = y.clone()
    site = rt._sites["features.3"]
    for key in sorted(site.pools):
        got = site.pools[key].apply(h, got, batch, training=False)
    ref_p = bottleneck.reference(a.config, info, a.tensors["features.3"], h, y)
    ref_q = bottleneck.reference(b.config, info, b.tensors["features.3"], h, y)
    assert float((ref_p - y.double()).abs().max()) > 1e-3 and float((ref_q - y.double()).abs().max()) > 1e-3
    assert torch.allclose(got[0].double(), ref_p[0], atol=1e-5)
    assert torch.allclose(got[1].double(), ref_q[1], atol=1e-5)
    assert torch.equal(got[2], y[2])
    both = bottleneck.reference(a.config, info, a.tensors["features.3"], h,
                                bottleneck.reference(b.config, info, b.tensors["features.3"], h, y).float())
    assert torch.allclose(got[3].double(), both[3], atol=1e-5)    # parallel first, then the series one
    with rt.batch(["p", "q", None, {"p": 1.0, "q": 1.0}]):
        mixed = net(x)
    for k, row in enumerate(["p", "q", None, {"p": 1.0, "q": 1.0}]):
        with rt.batch([row]):
            assert torch.allclose(mixed[k:k + 1], net(x[k:k + 1]), atol=ATOL), row


def test_parallel_bottleneck_on_a_block_that_changes_shape_is_refused(net):
    with pytest.raises(ConfigError, match=r"a parallel bottleneck at features.2 adds f\(block input\) to the block's "
                                        r"output, but this block maps 16 channels at stride \(2, 2\) to 24: use "
                                        r"placement 'pfeiffer'"):
        conv_bottleneck("bad", net, 0, placement="parallel", targets=("features.2",))


@torch.no_grad()
def test_gathered_pointwise_kernel_matches_the_reference_with_mixed_ranks_and_weights(net):
    """1x1 convs in a mixed batch read slot stacks (ranks padded, scale folded): equal to the float64
    reference per image, weighted rows included; a slot freed and taken by IA3 adds no stale LoRA change."""
    from adapterkit.core.targets import site_info
    from adapterkit.methods.registry import get_method

    lora = get_method("lora")
    site = "features.2.conv.0.0"                                         # 1x1, 16 -> 96 channels
    a, b = conv_lora("a", net, 30, r=2), conv_lora("b", net, 31, r=4)
    rt = AdapterRuntime(net, capacity=4)
    rt.add(a)
    rt.add(b)
    module = dict(net.named_modules())[site]
    info = site_info(site, module)
    x = images(4, seed=5)[:, :1].expand(4, 16, 64, 64).contiguous()      # any [n, 16, H, W] input
    y = torch.nn.functional.conv2d(x, module.weight)
    rows = ["a", "b", None, {"a": 0.5, "b": 1.5}]
    pool = rt._sites[site].pools["lora"]
    got = pool.apply(x, y.clone(), rt.make_batch(rows, kernel="gather"), training=False)
    ref_a = lora.reference(a.config, info, a.tensors[site], x, y) - y.double()
    ref_b = lora.reference(b.config, info, b.tensors[site], x, y) - y.double()
    want = y.double() + torch.stack([ref_a[0], ref_b[1], 0 * ref_a[2], 0.5 * ref_a[3] + 1.5 * ref_b[3]])
    assert float(ref_a.abs().max()) > 1e-3
    assert torch.allclose(got.double(), want, atol=1e-5)
    slot = rt.slot("a")
    rt.remove("a")
    ia3 = create_adapter("i3", net, Ia3Config(target_modules=[site], feedforward_modules=[], init="nonzero"), seed=2)
    assert rt.add(ia3) == slot                                            # the freed slot is reused
    got = pool.apply(x, y.clone(), rt.make_batch(["i3", "b", None, "b"], kernel="gather"), training=False)
    assert torch.allclose(got[0], y[0]) and torch.allclose(got[1].double(), want[1], atol=1e-5)
