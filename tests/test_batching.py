"""AdapterBatch construction: table-driven, pure functions."""

import pytest
import torch

from adapterkit import ConfigError, build_batch

CASES = [
    # name, ids, weights, mode, kwargs, expected kernel, expected unique
    ("no adapters", [0, 0, 0], None, "row", {}, "none", ()),
    ("one adapter", [1, 1, 0], None, "row", {}, "dense", (1,)),
    ("two adapters", [1, 2, 0, 2], None, "row", {}, "dense", (1, 2)),
    ("many rows -> gather", [1, 2, 3, 4, 0], None, "row", {}, "gather", (1, 2, 3, 4)),
    ("grad forces dense", [1, 2, 3, 4], None, "row", {"needs_grad": True}, "dense", (1, 2, 3, 4)),
    ("long token segments -> segment", [1] * 9 + [2] * 9 + [3] * 9, None, "token", {}, "segment", (1, 2, 3)),
    ("short token segments -> gather", [1, 2, 3, 1, 2, 3], None, "token", {}, "gather", (1, 2, 3)),
    ("weighted K=2", [[1, 2], [3, 0], [4, 1]], [[0.5, 0.5], [1.0, 0.0], [0.3, 0.7]], "row", {}, "gather", (1, 2, 3, 4)),
    ("forced segment", [3, 1, 3, 2], None, "row", {"kernel": "segment"}, "segment", (1, 2, 3)),
    ("all mode", [[2, 5]], [[1.0, 0.25]], "all", {}, "dense", (2, 5)),
]


@pytest.mark.parametrize("name,ids,weights,mode,kwargs,kernel,unique", CASES, ids=[c[0] for c in CASES])
def test_kernel_choice_and_unique(name, ids, weights, mode, kwargs, kernel, unique):
    batch = build_batch(torch.tensor(ids), None if weights is None else torch.tensor(weights), mode=mode, **kwargs)
    assert batch.kernel == kernel
    assert batch.unique == unique
    assert batch.ids.dim() == 2 and batch.weights.shape == batch.ids.shape


def test_dense_weights_sum_per_slot():
    b = build_batch(torch.tensor([[1, 1], [2, 0], [0, 0]]), torch.tensor([[0.25, 0.5], [2.0, 9.0], [1.0, 1.0]]))
    assert b.kernel == "dense"
    assert b.dense_w[1].flatten().tolist() == [0.75, 0.0, 0.0]
    # weights where the id is 0 are ignored
    assert b.dense_w[2].flatten().tolist() == [0.0, 2.0, 0.0]


def test_segment_plan_sorts_stably_and_skips_empty_rows():
    b = build_batch(torch.tensor([3, 1, 0, 3, 2, 1]), kernel="segment")
    assert b.order.tolist() == [1, 5, 4, 0, 3]
    assert b.bounds == (0, 2, 3, 5)
    assert b.seg_slots == (1, 2, 3)
    assert b.seg_w is None                                 # all weights 1: no multiply


def test_gather_plan_drops_empty_positions_and_unit_weights():
    b = build_batch(torch.tensor([[1, 0], [2, 0], [3, 0]]), kernel="gather")
    assert len(b.gather_idx) == 1 and b.gather_w == (None,)
    w = build_batch(torch.tensor([[1, 2], [2, 0], [3, 3]]), torch.tensor([[1.0, 0.5], [1.0, 0.0], [1.0, 2.0]]),
                    kernel="gather")
    assert len(w.gather_idx) == 2
    assert w.gather_w[0] is None
    assert w.gather_w[1].flatten().tolist() == [0.5, 0.0, 2.0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(ids=torch.tensor([1, 2]), weights=torch.tensor([1.0])), r"weights \(1, 1\) must match ids \(2, 1\)"),
    (dict(ids=torch.tensor([[1, 2]]), kernel="segment"), "kernel 'segment' takes one adapter per unit"),
    (dict(ids=torch.tensor([1, 2]), kernel="gather", needs_grad=True), "gradients need kernel 'dense'"),
    (dict(ids=torch.tensor([1]), mode="rows"), "unknown batch mode 'rows'"),
    (dict(ids=torch.tensor([1]), kernel="fast"), "unknown kernel 'fast'"),
    (dict(ids=torch.tensor([1, 2]), weights=torch.tensor([1.0, float("nan")])), "weights must be finite"),
    (dict(ids=torch.tensor([1, 2]), mode="all"), "mode 'all' takes exactly one unit"),
])
def test_bad_batches(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_batch(**kwargs)


def test_view_input_checks_rows():
    b = build_batch(torch.tensor([1, 0, 1]))
    assert b.view_input(torch.zeros(3, 5, 8)).shape == (3, 5, 8)
    with pytest.raises(ConfigError, match="built for 3 rows but a module got input of shape"):
        b.view_input(torch.zeros(4, 5, 8))
    t = build_batch(torch.tensor([1, 0, 1, 1]), mode="token")
    assert t.view_input(torch.zeros(2, 2, 8)).shape == (4, 1, 8)
