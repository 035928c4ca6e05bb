"""Reversible merging against a direct reference: every ΔW materialised in float64, numpy SVD/lstsq.

Per-site mode: at each site, X_s [d_out·d_in, n] (a task without the site: a zero column); the best
rank-k approximation is the truncated SVD of X_s. Global mode: one X over all sites."""

import json
import re

import numpy as np
import pytest
import torch
from test_merge import SHAPES, close, inputs, lora, out_delta, ref_delta

from adapterkit import Adapter, AdapterMeta, ConfigError, LoraConfig
from adapterkit.merge import ReversibleMerge, merge_reversible, recover, run_recipe
from adapterkit.merge.recipe import parse_recipe
from adapterkit.store import AdapterStore


def truncated(x, k, w):
    """Best rank-k approximation of the columns x_i weighted by w_i, unweighted again."""
    u, s, vh = np.linalg.svd(x * w, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k] / w


def ref_reversible(ads, k, per_site, normalize=False):
    """(approx {site: [n, d_out, d_in]}, overall errors [n], site errors {site: [n]}) of the rank-k fit."""
    deltas = {s: np.stack([ref_delta(a, s) for a in ads]) for s in SHAPES}
    flat = {s: d.reshape(len(ads), -1).T for s, d in deltas.items()}          # X_s [P_s, n]
    w = 1 / np.linalg.norm(np.concatenate(list(flat.values())), axis=0) if normalize else np.ones(len(ads))
    if per_site:
        approx = {s: truncated(x, k, w) for s, x in flat.items()}
    else:
        cat = truncated(np.concatenate(list(flat.values())), k, w)
        approx, at = {}, 0
        for s, x in flat.items():
            approx[s], at = cat[at:at + len(x)], at + len(x)
    lost = {s: ((flat[s] - approx[s]) ** 2).sum(0) for s in SHAPES}
    norm = {s: (flat[s] ** 2).sum(0) for s in SHAPES}
    errors = np.sqrt(sum(lost.values()) / sum(norm.values()))
    site_errors = {s: np.sqrt(lost[s] / np.where(norm[s] > 0, norm[s], 1.0)) for s in SHAPES}
    return {s: approx[s].T.reshape(len(ads), *SHAPES[s]) for s in SHAPES}, errors, site_errors


def recovered(rev, task, site):
    got = recover(rev, task)
    return out_delta(got, site) if site in got.tensors else np.zeros(SHAPES[site])


def row_delta(rev, task, site):
    """The runtime row {basis_j: c_j} as one ΔW."""
    by_name = {b.name: b for b in rev.basis}
    return sum(c * out_delta(by_name[n], site) for n, c in rev.row_weights(task).items())


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("per_site", [True, False])
@pytest.mark.parametrize("k", [1, 2])
def test_k_below_n_matches_the_direct_truncated_svd_and_reports_its_errors(k, per_site, normalize):
    ads = inputs()                          # ranks 2/3/4, rsLoRA, rank+alpha patterns, missing sites
    rev = merge_reversible(ads, k=k, per_site=per_site, normalize=normalize)
    assert rev.per_site is per_site and len(rev.basis) == k
    approx, errors, site_errors = ref_reversible(ads, k, per_site, normalize)
    assert errors.max() > 0.1                                   # a real loss, not a vacuous pass
    np.testing.assert_allclose([rev.errors[a.name] for a in ads], errors, rtol=1e-4, atol=1e-6)
    for i, a in enumerate(ads):
        assert sorted(rev.site_errors[a.name]) == sorted(a.sites)      # only the sites the task targets
        for site in a.sites:
            assert rev.site_errors[a.name][site] == pytest.approx(site_errors[site][i], rel=1e-4, abs=1e-6)
        summary = rev.error_summary()[a.name]
        assert summary["overall"] == rev.errors[a.name]
        assert summary["site_max"] == max(rev.site_errors[a.name].values())
        for site in SHAPES:
            close(recovered(rev, i, site), approx[site][i], 1e-4)


def test_normalize_evens_out_the_relative_errors_of_unequal_tasks():
    ads = [lora("big", 2, 2.0, 1, std=10.0), lora("mid", 2, 2.0, 2, std=3.0), lora("small", 2, 2.0, 3)]
    plain, even = merge_reversible(ads, k=2), merge_reversible(ads, k=2, normalize=True)
    assert plain.errors["small"] > 0.9 and plain.errors["big"] < 1e-3    # the smallest ΔW is dropped
    assert max(even.errors.values()) < plain.errors["small"] - 0.2
    assert sum(e ** 2 for e in even.errors.values()) < sum(e ** 2 for e in plain.errors.values())


@pytest.mark.parametrize("k", [1, 2])
def test_per_site_loses_less_energy_in_total_than_one_shared_set_of_coefficients(k):
    """Optimal per site, so optimal in the sum; one task alone may lose a little more."""
    ads = inputs()
    site, glob = merge_reversible(ads, k=k), merge_reversible(ads, k=k, per_site=False)
    norms = {a.name: sum((ref_delta(a, s) ** 2).sum() for s in SHAPES) for a in ads}
    lost = [sum(rev.errors[t] ** 2 * norms[t] for t in norms) for rev in (site, glob)]
    assert lost[0] < lost[1]


@pytest.mark.parametrize("per_site, normalize", [(True, False), (False, False), (True, True)])
def test_k_equals_n_recovers_every_task_exactly_after_a_save_and_load(tmp_path, per_site, normalize):
    ads = inputs()
    rev = merge_reversible(ads, k=3, name="rev", per_site=per_site, normalize=normalize)
    assert [b.name for b in rev.basis] == ["rev.basis0", "rev.basis1", "rev.basis2"]
    assert max(rev.errors.values()) < 1e-5
    assert max(e for per in rev.site_errors.values() for e in per.values()) < 1e-5
    rev.save(tmp_path / "rev")
    index = json.loads((tmp_path / "rev" / "reversible.json").read_text())
    assert (index["type"], index["format_version"], index["per_site"]) == ("adapterkit.reversible", 2, per_site)
    assert ("site_coefficients" in index) is per_site
    loaded = ReversibleMerge.load(tmp_path / "rev")
    assert loaded.per_site is per_site and loaded.errors == rev.errors and loaded.site_errors == rev.site_errors
    for a in ads:
        got = recover(loaded, a.name)
        assert got.name == a.name
        for site in SHAPES:
            close(out_delta(got, site) if site in got.tensors else np.zeros(SHAPES[site]), ref_delta(a, site), 1e-4)


def scaled_copies(multipliers):
    """One adapter per row of multipliers [n, sites]: ΔW_i(s) = m[i, s] · M_s (M_s shared by all tasks)."""
    g = torch.Generator().manual_seed(11)
    shared = {s: (torch.randn(2, SHAPES[s][1], generator=g), torch.randn(SHAPES[s][0], 2, generator=g)) for s in SHAPES}
    out = []
    for i, row in enumerate(multipliers):
        cfg = LoraConfig(r=2, alpha=2.0, target_modules=tuple(SHAPES))
        tensors = {s: {"lora_A": shared[s][0].clone(), "lora_B": m * shared[s][1]} for s, m in zip(SHAPES, row)}
        out.append(Adapter(f"t{i}", cfg, tensors, AdapterMeta(base_fingerprint="sha256:base-a")))
    return out


def test_per_site_k1_is_exact_for_tasks_identical_up_to_a_per_site_scale():
    """At every site all tasks are one matrix (times a per-site, per-task scale, signs included), so
    one basis ΔW per site holds them all; a shared coefficient cannot follow scales that change
    from site to site."""
    ads = scaled_copies([[1.0, 2.0, 0.5, 1.0], [-1.0, 0.5, 3.0, 2.0], [2.0, 2.0, -1.0, 0.25]])
    rev = merge_reversible(ads, k=1)
    assert max(rev.errors.values()) < 1e-6
    for a in ads:
        for site in SHAPES:
            close(recovered(rev, a.name, site), ref_delta_plain(a, site), 1e-5)
    assert min(merge_reversible(ads, k=1, per_site=False).errors.values()) > 0.05


def ref_delta_plain(a, site):
    p = a.tensors[site]
    return p["lora_B"].double().numpy() @ p["lora_A"].double().numpy()      # alpha = r: scale 1


@pytest.mark.parametrize("per_site", [True, False])
def test_the_runtime_row_is_the_least_squares_shared_row_with_its_error(per_site):
    ads = inputs()
    rev = merge_reversible(ads, k=2, per_site=per_site)
    # reference: min_c Σ_s ||ΔW_i(s) - Σ_j c_j basis_j(s)||², every basis adapter flattened over all sites
    basis = np.stack([np.concatenate([out_delta(b, s).ravel() for s in SHAPES]) for b in rev.basis], 1)
    for i, a in enumerate(ads):
        x = np.concatenate([ref_delta(a, s).ravel() for s in SHAPES])
        c = np.linalg.lstsq(basis, x, rcond=None)[0]
        np.testing.assert_allclose(rev.coefficients[i].numpy(), c, rtol=1e-4, atol=1e-6)
        y = np.concatenate([row_delta(rev, a.name, s).ravel() for s in SHAPES])
        assert np.linalg.norm(x - y) / np.linalg.norm(x) == pytest.approx(rev.row_errors[a.name], rel=1e-4)
    if per_site:       # the row cannot follow per-site coefficients: worse than recovery, here strictly
        assert all(rev.row_errors[t] >= rev.errors[t] - 1e-9 for t in rev.errors)
        assert sum(rev.row_errors.values()) > sum(rev.errors.values()) + 0.01
    else:
        assert rev.row_errors == rev.errors


@pytest.mark.parametrize("per_site", [True, False])
def test_compressed_basis_reports_its_extra_loss_measured_on_what_is_stored(per_site):
    ads = inputs()
    exact, small = merge_reversible(ads, k=2, per_site=per_site), merge_reversible(ads, k=2, rank=2, per_site=per_site)
    assert all(b.ranks() == [2] for b in small.basis)
    extra = [small.errors[a.name] - exact.errors[a.name] for a in ads]
    assert min(extra) > -1e-6 and max(extra) > 1e-3
    for a in ads:
        x = np.concatenate([ref_delta(a, s).ravel() for s in SHAPES])
        y = np.concatenate([recovered(small, a.name, s).ravel() for s in SHAPES])
        assert np.linalg.norm(x - y) / np.linalg.norm(x) == pytest.approx(small.errors[a.name], rel=1e-3)
        for s in a.sites:
            d = ref_delta(a, s)
            want = np.linalg.norm(d - recovered(small, a.name, s)) / np.linalg.norm(d)
            assert small.site_errors[a.name][s] == pytest.approx(want, rel=1e-3, abs=1e-6)


def test_a_task_without_a_site_has_zero_coefficients_there_and_the_basis_is_stored_as_factors():
    ads = inputs()                                              # b has no l0.v, c has no l1.q
    rev = merge_reversible(ads, k=3)
    assert rev.coefficients_at("l0.v")[1].abs().max() == 0 and rev.coefficients_at("l1.q")[2].abs().max() == 0
    assert rev.coefficients_at("l0.v")[:, 2].abs().max() == 0    # two tasks there: the third direction is 0
    for b in rev.basis:                         # rank = Σ r_i of the tasks present (exact, no SVD)
        assert b.tensors["big"]["lora_B"].shape == (48, 2 + 3 + 4)
        assert b.tensors["l0.v"]["lora_B"].shape == (4, 2 + 2)


def test_the_store_lineage_and_a_recipe_round_trip_the_per_site_coefficients(tmp_path):
    ads = inputs()
    st = AdapterStore(tmp_path / "store")
    for a in ads:
        st.put(a)
    recipe = parse_recipe({"method": "reversible", "parameters": {"k": 2}, "inputs": [{"adapter": a.name} for a in ads]})
    rev = run_recipe(recipe, "rev", store=st)
    assert rev.per_site
    for b in rev.basis:
        st.put(b)
    back = ReversibleMerge.from_store(st, "rev")
    assert back.per_site and back.errors == rev.errors and back.site_errors == rev.site_errors
    torch.testing.assert_close(back.coefficients, rev.coefficients)
    for a in ads:
        for site in SHAPES:
            close(recovered(back, a.name, site), recovered(rev, a.name, site), 1e-6)
    glob = run_recipe(parse_recipe({"method": "reversible", "parameters": {"k": 2, "per_site": False, "normalize": True},
                                    "inputs": [{"adapter": a.name} for a in ads]}), "g", store=st)
    assert not glob.per_site and glob.basis[0].meta.lineage[0]["params"]["normalize"] is True
    assert glob.errors == pytest.approx(merge_reversible(ads, k=2, per_site=False, normalize=True).errors, rel=1e-9)


def test_a_version_1_folder_still_loads_as_a_global_merge(tmp_path):
    ads = inputs()
    rev = merge_reversible(ads, k=2, per_site=False)
    rev.save(tmp_path / "old")
    index = tmp_path / "old" / "reversible.json"
    data = json.loads(index.read_text())
    v1 = {key: data[key] for key in ("type", "tasks", "coefficients", "errors", "eigenvalues", "basis")}
    index.write_text(json.dumps({**v1, "format_version": 1}))
    old = ReversibleMerge.load(tmp_path / "old")
    assert not old.per_site and old.row_errors == old.errors
    for a in ads:
        close(recovered(old, a.name, "big"), recovered(rev, a.name, "big"), 1e-6)


K_MESSAGE = ("reversible merge k must be an integer in [1, 3] (the number of basis adapters, at most the "
             "number of tasks), got {}")


@pytest.mark.parametrize("kwargs, message", [
    ({"k": 0}, K_MESSAGE.format("0")),
    ({"k": 4}, K_MESSAGE.format("4")),
    ({"k": True}, K_MESSAGE.format("True")),
    ({"k": 2.0}, K_MESSAGE.format("2.0")),
    ({"k": 2, "rank": 0}, "rank must be a positive integer (or None), got 0"),
    ({"k": 2, "per_site": "yes"}, "per_site must be true or false, got 'yes'"),
    ({"k": 2, "normalize": 1}, "normalize must be true or false, got 1"),
])
def test_bad_parameters_are_refused_with_an_exact_message(kwargs, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        merge_reversible(inputs(), **kwargs)


def test_an_unknown_recipe_parameter_is_refused(tmp_path):
    st = AdapterStore(tmp_path / "store")
    st.put(inputs()[0])
    recipe = parse_recipe({"method": "reversible", "parameters": {"k": 1, "persite": True},
                           "inputs": [{"adapter": "a"}]})
    with pytest.raises(ConfigError, match=re.escape("reversible merging takes parameters k (required: the number "
                                                    "of basis adapters), rank, per_site (default true) and normalize "
                                                    "(default false); got "
                                                    "['k', 'persite']")):
        run_recipe(recipe, "x", store=st)
