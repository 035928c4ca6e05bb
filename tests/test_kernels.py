"""Every kernel against the float64 reference: skewed mixes, odd batch sizes, weighted K > 1."""

import pytest
import torch

from adapterkit import build_batch
from adapterkit.methods import kernels
from adapterkit.methods.kernels import (dense_kernel, gather_kernel, reference_delta, segment_kernel, span_kernel,
                                        span_of, unit_plan)

D_IN, D_OUT = 24, 40


def make_factors(n_adapters, ranks, gen):
    factors = {}
    for slot in range(1, n_adapters + 1):
        r = ranks[(slot - 1) % len(ranks)]
        factors[slot] = (torch.randn(r, D_IN, generator=gen), torch.randn(D_OUT, r, generator=gen),
                         0.5 + slot / 7)
    return factors


def stacks(factors, capacity):
    rank = max(a.shape[0] for a, _, _ in factors.values())
    a_stack = torch.zeros(capacity + 1, D_IN, rank)
    b_stack = torch.zeros(capacity + 1, rank, D_OUT)
    for slot, (a, b, scale) in factors.items():
        a_stack[slot, :, : a.shape[0]] = a.t()
        b_stack[slot, : a.shape[0], :] = b.t() * scale
    return a_stack, b_stack


def skewed_ids(n, n_adapters, gen, k=1):
    # Zipf-like: adapter 1 dominates, a tail appears once or twice, ~15% rows have none.
    probs = torch.tensor([1.0 / (i + 1) ** 1.5 for i in range(n_adapters)] + [0.15 * n_adapters ** 0.1])
    draws = torch.multinomial(probs, n * k, replacement=True, generator=gen).view(n, k) + 1
    return torch.where(draws == n_adapters + 1, torch.zeros_like(draws), draws)


def run(kernel, x, batch, factors, capacity):
    y = torch.zeros(x.shape[0], x.shape[1], D_OUT)
    if kernel == "dense":
        terms = [(a, b, batch.dense_w[s] * scale, None) for s, (a, b, scale) in factors.items() if s in batch.dense_w]
        return dense_kernel(x, y, terms)
    a_stack, b_stack = stacks(factors, capacity)
    if kernel == "gather":
        return gather_kernel(x, y, a_stack, b_stack, batch.gather_idx, batch.gather_w)
    return segment_kernel(x, y, a_stack, b_stack, batch.order, batch.bounds, batch.seg_slots, batch.seg_w)


@pytest.mark.parametrize("kernel", ["dense", "gather", "segment"])
@pytest.mark.parametrize("n", [1, 7, 133])
@pytest.mark.parametrize("n_adapters,length,ranks", [(1, 1, [4]), (5, 3, [2, 8]), (33, 1, [1, 4, 16])])
@torch.no_grad()
def test_kernel_matches_float64_reference(kernel, n, n_adapters, length, ranks):
    gen = torch.Generator().manual_seed(n * 1000 + n_adapters)
    factors = make_factors(n_adapters, ranks, gen)
    ids = skewed_ids(n, n_adapters, gen)
    ids[0, 0] = 1                                   # at least one adapter row, so the check is not vacuous
    weights = torch.where(ids > 0, torch.rand(ids.shape, generator=gen) + 0.5, torch.zeros(ids.shape))
    x = torch.randn(n, length, D_IN, generator=gen)
    batch = build_batch(ids, weights, kernel=kernel)
    got = run(kernel, x, batch, factors, capacity=n_adapters + 2)
    want = reference_delta(x, ids, weights, factors)
    assert want.abs().max() > 1.0
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", ["dense", "gather"])
@torch.no_grad()
def test_weighted_multi_adapter_rows(kernel):
    gen = torch.Generator().manual_seed(7)
    factors = make_factors(6, [3, 5], gen)
    ids = skewed_ids(7, 6, gen, k=3)
    ids[0] = torch.tensor([2, 2, 5])                  # the same adapter twice on a row adds up
    weights = torch.where(ids > 0, torch.randn(ids.shape, generator=gen), torch.zeros(ids.shape))
    x = torch.randn(7, 2, D_IN, generator=gen)
    batch = build_batch(ids, weights, kernel=kernel)
    torch.testing.assert_close(run(kernel, x, batch, factors, 8).double(),
                               reference_delta(x, ids, weights, factors), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,n_adapters,length,k", [(1, 1, 1, 1), (7, 5, 3, 1), (133, 33, 1, 1), (9, 6, 2, 3)])
@pytest.mark.parametrize("held_every", [1, 2])
@torch.no_grad()
def test_span_kernel_matches_float64_reference(n, n_adapters, length, k, held_every, monkeypatch):
    """The span kernel reads slots lo..hi of the stacks as a view: skewed mixes (padding columns), a pool
    holding every other slot only (gaps, and units of other pools' slots left alone), weighted K > 1 with a
    slot twice on a row, base units; equal to the float64 reference on the held slots."""
    monkeypatch.setattr(kernels, "SPAN_MAX_PADDING", float("inf"))       # take the span whatever its padding
    gen = torch.Generator().manual_seed(n * 100 + n_adapters + k + held_every)
    factors = make_factors(n_adapters, [1, 4, 6], gen)
    ids = skewed_ids(n, n_adapters, gen, k=k)
    ids[0, 0] = 1
    if k > 1:
        ids[-1] = torch.tensor([1, 1, 0])
    weights = torch.where(ids > 0, torch.randn(ids.shape, generator=gen), torch.zeros(ids.shape))
    x = torch.randn(n, length, D_IN, generator=gen)
    held = {s: f for s, f in factors.items() if (s - 1) % held_every == 0}
    batch = build_batch(ids, weights, kernel="gather")
    plan = unit_plan(batch, held)
    span = span_of(batch, plan, length)
    assert span.lo == 1 and span.s == max(plan.slots)
    a_stack, b_stack = stacks(factors, n_adapters + 2)                 # the other slots' stacks hold data too
    got = span_kernel(x, torch.zeros(n, length, D_OUT), a_stack, b_stack, plan, span)
    mine = torch.where(torch.isin(ids, torch.tensor(list(held))), ids, torch.zeros_like(ids))
    want = reference_delta(x, mine, weights, held)
    assert want.abs().max() > 1.0
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_span_kernel_without_padding_weights_each_column_by_its_own_unit():
    """Every row its own slot, in shuffled order (continuous batching's decode): no padding, so the columns
    are the units reordered by slot and so must their weights be."""
    gen = torch.Generator().manual_seed(3)
    factors = make_factors(5, [2, 3], gen)
    ids = torch.tensor([[3], [1], [2], [5], [4]])
    weights = torch.rand(5, 1, generator=gen) + 0.5
    x = torch.randn(5, 2, D_IN, generator=gen)
    batch = build_batch(ids, weights, kernel="gather")
    plan = unit_plan(batch, factors)
    span = span_of(batch, plan, 2)
    assert span.lay.unit is not None and span.lay.unit.tolist() == [1, 2, 0, 4, 3]
    a_stack, b_stack = stacks(factors, 6)
    got = span_kernel(x, torch.zeros(5, 2, D_OUT), a_stack, b_stack, plan, span)
    torch.testing.assert_close(got.double(), reference_delta(x, ids, weights, factors), rtol=1e-4, atol=1e-4)


def test_span_is_refused_when_its_padding_outweighs_the_units():
    """Decode (1 token a unit): the span may compute up to as many padding columns as pairs; a prefill of
    many tokens with one adapter on most rows would compute mostly padding, so it gathers instead."""
    ids = torch.tensor([1, 1, 1, 1, 2, 3])
    batch = build_batch(ids, kernel="gather")
    plan = unit_plan(batch, {1: None, 2: None, 3: None})
    assert span_of(batch, plan, 1) is not None and span_of(batch, plan, 1).lay.most == 4      # 12 columns, 6 pairs
    assert span_of(batch, plan, 128) is None
    spread = build_batch(torch.tensor([1, 2, 3]), kernel="gather")
    lay = span_of(spread, unit_plan(spread, {1: None, 2: None, 3: None}), 128).lay
    assert lay.most == 1 and lay.unit is not None                  # no padding at all: any length takes the span
    far = build_batch(torch.tensor([1, 9]), kernel="gather")       # slots 2..8 would be 7 padding columns
    assert span_of(far, unit_plan(far, {1: None, 9: None}), 1) is None


@torch.no_grad()
def test_a_slot_freed_by_a_lora_adds_nothing_to_the_next_adapter_of_another_family():
    """The gathered LoRA kernel reads every row's slot: a removed LoRA's stack rows must read zero, or a row
    of another family that takes its slot would get the old LoRA's change too."""
    from conftest import ATTN, input_ids, tiny_llama

    from adapterkit import AdapterRuntime, Ia3Config, LoraConfig, create_adapter

    model = tiny_llama()
    rt = AdapterRuntime(model, capacity=4)
    keep = create_adapter("keep", model, LoraConfig(r=2, target_modules=ATTN, init="nonzero", init_std=0.3), seed=1)
    gone = create_adapter("gone", model, LoraConfig(r=2, target_modules=ATTN, init="nonzero", init_std=0.3), seed=2)
    ia3 = create_adapter("ia3", model, Ia3Config(target_modules=tuple(ATTN), feedforward_modules=(), init="nonzero",
                                                 init_std=0.3), seed=3)
    rt.add(keep)
    slot = rt.add(gone)
    rt.remove("gone")
    assert rt.add(ia3) == slot                                   # the freed slot is reused
    ids = input_ids(2, 5)
    with rt.batch(["ia3", "keep"], kernel="gather"):
        got = model(ids).logits
    ref = AdapterRuntime(tiny_llama())
    ref.add(ia3)
    with ref.batch(["ia3"]):
        want = ref.model(ids[:1]).logits
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
