"""LoRA on Conv2d, as PEFT defines it: equal outputs with PEFT both ways, mixed batches per image, merge
into the base, weight-space merges, and clear refusals (grouped convs, families without conv support).

A random MobileNetV2 (5 classes, BatchNorm statistics randomised so no layer is an identity) at 64x64."""

from __future__ import annotations

import copy

import pytest
import torch

from adapterkit import AdapterRuntime, LoraConfig, create_adapter, merge
from adapterkit.core.adapter import Adapter
from adapterkit.errors import UnsupportedError
from adapterkit.methods.ia3 import Ia3Config
from adapterkit.vision.mobilenet import MobileNetConfig, MobileNetV2

peft = pytest.importorskip("peft")

# the stem 3x3 conv, a block's 1x1 expand and projection, the last 1x1: every geometry MobileNetV2 has
TARGETS = ["features.0.0", "features.2.conv.0.0", "features.2.conv.2", "features.18.0"]
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    with rt.batch(["a"] * 3):
        unmerged = net(x)
    rt.merge("a")
    with rt.disabled():
        merged = net(x)
    rt.unmerge()
    assert torch.allclose(merged, unmerged, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


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
    with pytest.raises(UnsupportedError, match=r"adapter 'ia': IA3 does not adapt a convolution \(nn.Conv2d\) "
                                               r"\(features.2.conv.2\); it adapts linear layers and blocks: choose target_modules of "
                                               r"those kinds, or LoRA for convolutions"):
        create_adapter("ia", net, Ia3Config(target_modules=["features.2.conv.2"], feedforward_modules=[]))


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
