"""DARE, the one-adapter identity of every method and parallel sites, against direct references
(reversible merging: test_merge_reversible.py)."""

import numpy as np
import pytest
import torch
from test_merge import SHAPES, close, inputs, lora, out_delta, ref_delta, ref_ties

from adapterkit.merge import merge, merge_with_report
from adapterkit.merge.dare import drop, site_generator


def test_dare_p0_is_the_identity_and_dare_ties_p0_is_ties_without_trim():
    ads, w = inputs(), [1.0, 0.5, 2.0]
    lin = merge(ads, "dare_linear", p=0.0, weights=w, rank=1000)
    dt = merge(ads, "dare_ties", p=0.0, weights=w, rank=1000)
    for site in SHAPES:
        deltas = [ref_delta(a, site) for a in ads]
        close(out_delta(lin, site), sum(wi * d for wi, d in zip(w, deltas)))
        close(out_delta(dt, site), ref_ties(deltas, w, 1.0))


def test_dare_drops_with_probability_p_rescales_and_is_seeded():
    a = lora("a", 2, 4.0, 7, sites=("big",))         # SCALE["a"]: alpha 4 / r 2
    d = ref_delta(a, "big")
    runs = {seed: out_delta(merge([a], "dare_linear", p=0.3, seed=seed, rank=1000), "big") for seed in (0, 0, 1)}
    got = merge([a], "dare_linear", p=0.3, seed=0, rank=1000)
    m = out_delta(got, "big")
    kept = np.abs(m) > 0
    close(m[kept], d[kept] / 0.7)                               # kept entries rescaled by 1 / (1 - p)
    assert abs((~kept).mean() - 0.3) < 0.05                     # 3072 entries: p within ±5 points
    np.testing.assert_array_equal(m, runs[0])                   # same seed -> same masks
    assert (np.abs(runs[1]) > 0).tolist() != kept.tolist()      # another seed -> other masks
    l1 = merge([a], "dare_linear", p=0.3, rescale="l1", rank=1000)
    assert np.abs(out_delta(l1, "big")).sum() == pytest.approx(np.abs(d).sum(), rel=1e-4)


def test_dare_linear_and_ties_match_reference_with_the_same_masks():
    ads, w, p, seed = inputs(), [1.0, 0.5, 2.0], 0.4, 3
    lin = merge(ads, "dare_linear", p=p, weights=w, seed=seed, rank=1000)
    ti = merge(ads, "dare_ties", p=p, weights=w, seed=seed, rank=1000, elect_on="weighted", mean="none")
    for site in SHAPES:
        dropped = []
        for a in ads:                                           # the documented mask: U(0,1) >= p, per (seed, site, name)
            u = torch.rand(SHAPES[site], generator=site_generator(seed, site, a.name)).numpy()
            dropped.append(np.where(u >= p, ref_delta(a, site) / (1 - p), 0.0) if site in a.tensors
                           else np.zeros(SHAPES[site]))
        close(out_delta(lin, site), sum(wi * x for wi, x in zip(w, dropped)))
        close(out_delta(ti, site), ref_ties(dropped, w, 1.0, elect_on="weighted", mean="none"))


def test_drop_p0_returns_input_unchanged():
    x = torch.randn(5, 6)
    assert drop(x, 0.0, torch.Generator()) is x


@pytest.mark.parametrize("method, params", [
    ("concat", {}), ("linear", {}), ("task_arithmetic", {}), ("ties", {"density": 1.0}),
    ("magnitude_prune", {"density": 1.0}), ("dare_linear", {"p": 0.0}), ("dare_ties", {"p": 0.0}),
])
def test_merging_one_adapter_with_weight_one_returns_it(method, params):
    a = inputs()[2]                                             # rank pattern, alpha pattern, a missing site
    out, rep = merge_with_report([a], method, weights=[1.0], **params)
    assert sorted(out.sites) == sorted(a.sites)
    for site in a.sites:
        assert np.abs(ref_delta(a, site)).max() > 0.1
        close(out_delta(out, site), ref_delta(a, site), 1e-4)   # "big" goes through the randomized SVD
    assert rep.max_error < 1e-4


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_parallel_sites_give_the_same_merge(method):
    ads = inputs()
    one = merge(ads, method, workers=1, seed=5)
    two = merge(ads, method, workers=2, seed=5)
    threads = torch.get_num_threads()
    assert merge(ads, method, workers=3, seed=5) is not None and torch.get_num_threads() == threads
    for site in SHAPES:
        close(out_delta(two, site), out_delta(one, site), 1e-5)
