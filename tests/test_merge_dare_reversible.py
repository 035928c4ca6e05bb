"""DARE, the one-adapter identity of every method, and reversible merging, against direct references."""

import json

import numpy as np
import pytest
import torch
from test_merge import SHAPES, close, inputs, lora, out_delta, ref_delta, ref_ties

from adapterkit.merge import ReversibleMerge, merge, merge_reversible, merge_with_report, recover
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


# ----------------------------------------------------------------------------- reversible merging
def ref_reversible(ads, k):
    """Direct reference: stack every task's ΔW over all sites into X [P, n]; rank-k truncated SVD."""
    x = np.stack([np.concatenate([ref_delta(a, s).ravel() for s in SHAPES]) for a in ads], 1)
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    approx = (u[:, :k] * s[:k]) @ vh[:k]
    errors = np.linalg.norm(x - approx, axis=0) / np.linalg.norm(x, axis=0)
    return approx, errors


def unstack(col):
    out, at = {}, 0
    for s, (m, n) in SHAPES.items():
        out[s], at = col[at:at + m * n].reshape(m, n), at + m * n
    return out


def test_reversible_k_equals_n_recovers_every_task_exactly(tmp_path):
    ads = inputs()
    rev = merge_reversible(ads, k=3, name="rev")
    assert [b.name for b in rev.basis] == ["rev.basis0", "rev.basis1", "rev.basis2"]
    assert max(rev.errors.values()) < 1e-5
    rev.save(tmp_path / "rev")
    index = json.loads((tmp_path / "rev" / "reversible.json").read_text())
    assert (index["type"], index["format_version"]) == ("adapterkit.reversible", 1)
    loaded = ReversibleMerge.load(tmp_path / "rev")
    for a in ads:
        got = recover(loaded, a.name)
        assert got.name == a.name
        for site in SHAPES:
            want = ref_delta(a, site)
            close(out_delta(got, site) if site in got.tensors else np.zeros(SHAPES[site]), want, 1e-4)


@pytest.mark.parametrize("k", [1, 2])
def test_reversible_k_below_n_reports_the_direct_reconstruction_error(k):
    ads = inputs()
    rev = merge_reversible(ads, k=k)
    approx, errors = ref_reversible(ads, k)
    assert errors.max() > 0.1                                   # a real loss, not a vacuous pass
    np.testing.assert_allclose([rev.errors[a.name] for a in ads], errors, rtol=1e-4, atol=1e-6)
    for i, a in enumerate(ads):
        want = unstack(approx[:, i])
        got = recover(rev, i)
        for site in SHAPES:
            close(out_delta(got, site), want[site], 1e-4)
        # at run time a task is the weighted row of the basis adapters
        weights = rev.row_weights(a.name)
        row = sum(c * out_delta(next(b for b in rev.basis if b.name == n), "big") for n, c in weights.items())
        close(row, want["big"], 1e-4)


def test_reversible_compressed_basis_reports_its_extra_loss():
    ads = inputs()
    exact, small = merge_reversible(ads, k=2), merge_reversible(ads, k=2, rank=2)
    assert all(b.ranks() == [2] for b in small.basis)
    extra = [small.errors[a.name] - exact.errors[a.name] for a in ads]
    assert min(extra) > -1e-6 and max(extra) > 1e-3
    for a in ads:
        got = recover(small, a.name)                            # the error is measured on what is stored
        x = np.concatenate([ref_delta(a, s).ravel() for s in SHAPES])
        y = np.concatenate([out_delta(got, s).ravel() for s in SHAPES])
        assert np.linalg.norm(x - y) / np.linalg.norm(x) == pytest.approx(small.errors[a.name], rel=1e-3)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_parallel_sites_give_the_same_merge(method):
    ads = inputs()
    one = merge(ads, method, workers=1, seed=5)
    two = merge(ads, method, workers=2, seed=5)
    threads = torch.get_num_threads()
    assert merge(ads, method, workers=3, seed=5) is not None and torch.get_num_threads() == threads
    for site in SHAPES:
        close(out_delta(two, site), out_delta(one, site), 1e-5)
