"""Merges against straightforward float64 references written here (loops, numpy), on random tensors."""

import numpy as np
import pytest
import torch

from adapterkit import Adapter, AdapterMeta, LoraConfig
from adapterkit.merge import merge, merge_with_report
from adapterkit.merge.svd import refactor_dense, truncate_factors
from adapterkit.merge.ties import trim

# site -> (d_out, d_in); "big" is large enough for the randomized SVD path (rank + 16 < 48)
SHAPES = {"l0.q": (6, 5), "l0.v": (4, 7), "l1.q": (6, 5), "big": (48, 64)}


def lora(name, r, alpha, seed, sites=tuple(SHAPES), rslora=False, rank_pattern=None, alpha_pattern=None,
         base="sha256:base-a", std=1.0):
    cfg = LoraConfig(r=r, alpha=alpha, target_modules=tuple(sites), use_rslora=rslora,
                     rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})
    g = torch.Generator().manual_seed(seed)
    tensors = {s: {"lora_A": torch.randn(cfg.rank(s), SHAPES[s][1], generator=g),
                   "lora_B": std * torch.randn(SHAPES[s][0], cfg.rank(s), generator=g)} for s in sites}
    return Adapter(name, cfg, tensors, AdapterMeta(base_fingerprint=base, base_name="base"))


def inputs():
    """Three adapters: different ranks, alphas, target sets, rsLoRA and rank/alpha patterns."""
    return [lora("a", 2, 4.0, 1),
            lora("b", 3, 5.0, 2, sites=("l0.q", "l1.q", "big"), rslora=True),
            lora("c", 4, 8.0, 3, sites=("l0.q", "l0.v", "big"), rank_pattern={"l0.v": 2}, alpha_pattern={"big": 2.0})]


# Scales written out by hand (not via LoraConfig.scale): alpha / r, alpha / sqrt(r) for rsLoRA.
SCALE = {"a": {s: 4.0 / 2 for s in SHAPES},
         "b": {s: 5.0 / np.sqrt(3) for s in SHAPES},
         "c": {"l0.q": 8.0 / 4, "l0.v": 8.0 / 2, "big": 2.0 / 4}}


def ref_delta(adapter, site):
    """float64 ΔW of an input (zero where it has no such site)."""
    if site not in adapter.tensors:
        return np.zeros(SHAPES[site])
    p = adapter.tensors[site]
    return SCALE[adapter.name][site] * (p["lora_B"].double().numpy() @ p["lora_A"].double().numpy())


def out_delta(adapter, site):
    p = adapter.tensors[site]
    return adapter.config.scale(site) * (p["lora_B"].double().numpy() @ p["lora_A"].double().numpy())


def close(x, y, tol=1e-5):
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol * max(1.0, np.abs(y).max()))


def test_concat_is_the_exact_weighted_sum_and_ranks_add():
    ads, w = inputs(), [1.0, -0.5, 2.0]
    out, rep = merge_with_report(ads, "concat", weights=w, name="cat")
    assert sorted(out.sites) == sorted(SHAPES)
    for site in SHAPES:
        want = sum(wi * ref_delta(a, site) for wi, a in zip(w, ads))
        assert all(np.abs(want - wi * ref_delta(a, site)).max() > 1e-3 for wi, a in zip(w, ads))
        close(out_delta(out, site), want)
    assert rep.site_ranks == {"l0.q": 9, "l0.v": 4, "l1.q": 5, "big": 9}
    assert rep.total_error == 0.0 and rep.max_error == 0.0


def test_linear_normalize_and_task_arithmetic_lambda():
    ads, w = inputs(), [1.0, 2.0, 1.0]
    lin = merge(ads, "linear", weights=w, normalize=True)
    ta = merge(ads, "task_arithmetic", weights=w, lam=0.3)
    for site in SHAPES:
        total = sum(wi * ref_delta(a, site) for wi, a in zip(w, ads))
        close(out_delta(lin, site), total / 4.0)
        close(out_delta(ta, site), 0.3 * total)


def test_linear_rank_is_the_best_low_rank_approximation_with_its_error():
    ads = inputs()
    out, rep = merge_with_report(ads, "linear", rank=3)
    for site in SHAPES:
        m = sum(ref_delta(a, site) for a in ads)
        u, s, vh = np.linalg.svd(m)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        close(out_delta(out, site), best, 1e-4)
        want = np.sqrt((s[3:] ** 2).sum() / (s ** 2).sum())
        assert rep.site_errors[site] == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert out.tensors[site]["lora_A"].shape[0] == min(3, rep.site_ranks[site])
    assert rep.site_errors["big"] > 0.05                     # a real truncation was measured
    assert 0 < rep.total_error < rep.max_error + 1e-12


def test_svd_full_rank_is_exact_and_randomized_is_near_optimal():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(30, 20, generator=g)
    b, a, err = refactor_dense(m, 20)
    assert err == 0.0 and torch.allclose(b @ a, m)
    low = torch.randn(48, 5, generator=g) @ torch.randn(5, 64, generator=g)    # exactly rank 5
    for mode in ("exact", "randomized"):
        b, a, err = refactor_dense(low, 5, svd=mode)
        assert err < 1e-5 and b.shape == (48, 5)
    fb, fa = torch.randn(40, 6, generator=g), torch.randn(6, 50, generator=g)
    nb, na, err = truncate_factors(fb, fa, 6)                  # full rank of the product: exact
    assert err == 0.0 and torch.allclose(nb @ na, fb @ fa)
    dense = torch.randn(120, 100, generator=g)
    s = torch.linalg.svdvals(dense.double())
    optimal = float((s[10:] ** 2).sum() / (s ** 2).sum()) ** 0.5
    _, _, exact_err = refactor_dense(dense, 10, svd="exact")
    _, _, rand_err = refactor_dense(dense, 10, svd="randomized", seed=1)
    assert exact_err == pytest.approx(optimal, rel=1e-4)
    assert optimal - 1e-6 <= rand_err <= optimal * 1.05


# ----------------------------------------------------------------------------- TIES, by hand
T1 = [[4.0, -1.0, 2.0], [0.5, -3.0, 1.0]]
T2 = [[-2.5, 0.5, 3.0], [1.0, -1.5, -4.0]]
T3 = [[1.0, -2.0, -0.5], [3.0, 2.5, -0.2]]
# density 0.5: keep floor(0.5 * 6) = 3 entries per task:
#   T1 -> [[4, 0, 2], [0, -3, 0]]   T2 -> [[-2.5, 0, 3], [0, 0, -4]]   T3 -> [[0, -2, 0], [3, 2.5, 0]]
# 1) weights 1, elect by total, mean by count. Votes (sums): [[1.5, -2, 5], [3, -0.5, -4]], signs
#    [[+, -, +], [+, -, -]]; agreeing: (0,0) T1 -> 4; (0,1) T3 -> -2; (0,2) T1,T2 -> (2+3)/2 = 2.5;
#    (1,0) T3 -> 3; (1,1) T1 -> -3; (1,2) T2 -> -4.
HAND_UNIT = [[4.0, -2.0, 2.5], [3.0, -3.0, -4.0]]
# 2) weights [1, 2, 0.5], PEFT convention (elect on unweighted, divide by count): same signs;
#    (0,0) 1*4/1; (0,1) 0.5*-2/1; (0,2) (1*2 + 2*3)/2; (1,0) 0.5*3; (1,1) -3; (1,2) 2*-4.
HAND_PEFT = [[4.0, -1.0, 4.0], [1.5, -3.0, -8.0]]
# 3) weights [1, 2, 0.5], mergekit convention (elect on weighted, divide by agreeing weights):
#    weighted T2 (0,0) = -5, so the vote 4 - 5 = -1 elects -: T2 alone, -5/2 = -2.5;
#    (0,1) -1/0.5 = -2; (0,2) (2+6)/(1+2) = 8/3; (1,0) 1.5/0.5 = 3; (1,1) votes -3+1.25 < 0: -3/1;
#    (1,2) -8/2 = -4.
HAND_MERGEKIT = [[-2.5, -2.0, 8 / 3], [3.0, -3.0, -4.0]]
# 4) weights 1, majority "frequency" (count of signs): (1,1) has one - and one + -> tie -> +, so
#    T3's 2.5 wins; the rest as in 1).
HAND_FREQUENCY = [[4.0, -2.0, 2.5], [3.0, 2.5, -4.0]]


def explicit(name, m):
    """An adapter whose ΔW is exactly m: A = I, B = m, alpha = r (scale 1)."""
    m = torch.tensor(m)
    cfg = LoraConfig(r=3, alpha=3.0, target_modules=("w",))
    return Adapter(name, cfg, {"w": {"lora_A": torch.eye(3), "lora_B": m.clone()}}, AdapterMeta(base_fingerprint="fp"))


@pytest.mark.parametrize("params, want", [
    ({}, HAND_UNIT),
    ({"weights": [1, 2, 0.5]}, HAND_PEFT),
    ({"weights": [1, 2, 0.5], "elect_on": "weighted", "mean": "weight"}, HAND_MERGEKIT),
    ({"majority": "frequency"}, HAND_FREQUENCY),
])
def test_ties_hand_checked_three_tasks(params, want):
    ads = [explicit("t1", T1), explicit("t2", T2), explicit("t3", T3)]
    out, rep = merge_with_report(ads, "ties", density=0.5, **params)
    p = out.tensors["w"]
    got = out.config.scale("w") * (p["lora_B"] @ p["lora_A"])
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=1e-6)
    assert rep.site_errors["w"] == 0.0                        # rank 9 >= min(2, 3): stored exactly


def ref_trim(m, density):
    flat = m.ravel()
    k = max(1, int(density * flat.size))
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
    return np.where(keep, flat, 0.0).reshape(m.shape)


def ref_ties(ms, w, density, elect_on="unweighted", mean="count"):
    trimmed = [ref_trim(m, density) for m in ms]
    out = np.zeros(ms[0].shape)
    for idx in np.ndindex(out.shape):
        vals = [t[idx] for t in trimmed]
        voters = [wi * v for wi, v in zip(w, vals)] if elect_on == "weighted" else vals
        sign = 1.0 if sum(voters) >= 0 else -1.0
        agree = [i for i, v in enumerate(voters) if v * sign > 0]
        total = sum(w[i] * vals[i] for i in agree)
        div = {"count": max(len(agree), 1), "weight": sum(w[i] for i in agree) or 1.0, "none": 1.0}[mean]
        out[idx] = total / div
    return out


@pytest.mark.parametrize("conv", [{}, {"elect_on": "weighted", "mean": "weight"}, {"mean": "none", "lam": 0.7}])
def test_ties_matches_reference_on_random_adapters(conv):
    ads, w = inputs(), [1.0, 0.7, 1.6]
    out = merge(ads, "ties", weights=w, density=0.4, rank=1000, **conv)
    lam = conv.pop("lam", 1.0)
    for site in SHAPES:
        want = lam * ref_ties([ref_delta(a, site) for a in ads], w, 0.4, **conv)
        assert np.abs(want).max() > 0
        close(out_delta(out, site), want)


def test_magnitude_prune_matches_reference():
    ads, w = inputs(), [0.5, 1.0, 2.0]
    out = merge(ads, "magnitude_prune", weights=w, density=0.3, rank=1000)
    for site in SHAPES:
        close(out_delta(out, site), sum(wi * ref_trim(ref_delta(a, site), 0.3) for wi, a in zip(w, ads)))


def test_fast_trim_threshold_equals_sorting_on_large_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 300, 301, generator=g)                  # 90300 entries per row: sampled bracket path
    for density in (0.2, 0.5, 0.97):
        got = trim(x, density).numpy()
        for i in range(3):
            np.testing.assert_array_equal(got[i], ref_trim(x[i].numpy(), density))
