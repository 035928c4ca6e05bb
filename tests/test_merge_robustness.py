"""Merges refuse what they cannot compute honestly: non-finite inputs, parameters or results, failed
linear algebra (a typed error naming the site, never a traceback or a 'rel. error 0'); recipes read
YAML 1.2 floats, name inputs by the path given, and refuse unreadable files."""

import math

import pytest
import torch
import yaml
from test_merge import SHAPES, inputs, lora, out_delta
from test_merge_api import merge_app, write
from typer.testing import CliRunner

from adapterkit import ConfigError
from adapterkit.errors import NonFiniteError
from adapterkit.merge import load_recipe, merge, merge_reversible, merge_with_report, recover, run_recipe
from adapterkit.merge.svd import refactor_dense
from adapterkit.store import AdapterStore

METHODS = ["concat", "linear", "task_arithmetic", "ties", "magnitude_prune", "dare_linear", "dare_ties"]
FIX = "lower the input weights"


def poisoned(value=float("inf")):
    ads = inputs()
    ads[1].tensors["l1.q"]["lora_A"][0, 0] = value
    return ads


@pytest.mark.parametrize("method", METHODS + ["reversible"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_inputs_are_refused_naming_the_tensor(method, value):
    call = (lambda a: merge_reversible(a, k=2)) if method == "reversible" else (lambda a: merge(a, method))
    with pytest.raises(NonFiniteError, match=r"adapter 'b': tensor l1\.q\.lora_A has 1 non-finite value\(s\)"):
        call(poisoned(value))


def test_an_input_whose_weight_change_overflows_float32_is_refused():
    ads = inputs()
    ads[0].tensors["l0.v"]["lora_B"].fill_(1e30)
    ads[0].tensors["l0.v"]["lora_A"].fill_(1e30)               # each tensor finite, ΔW ~ 1e60
    with pytest.raises(NonFiniteError, match=r"adapter 'a': its weight change at l0\.v reaches"):
        merge(ads, "linear")


@pytest.mark.parametrize("method", METHODS)
def test_a_result_beyond_float32_is_refused_naming_the_site(method):
    with pytest.raises(ConfigError) as info:
        merge_with_report(inputs(), method, weights=[1e300, 1.0, 1.0])
    assert f"merge {method!r}: the merged weight change at site 'l0.q'" in str(info.value)
    assert "is not finite (NaN or inf) or beyond float32's range" in str(info.value) and FIX in str(info.value)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "magnitude_prune", "dare_linear", "dare_ties"])
def test_a_huge_lam_is_refused_naming_the_site(method):
    with pytest.raises(ConfigError, match=rf"merge '{method}': the merged weight change at site 'l0\.q'.*or lam"):
        merge(inputs(), method, lam=1e300)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_a_truncated_factor_merge_that_overflows_is_refused_before_the_svd(method):
    with pytest.raises(ConfigError, match=rf"merge '{method}': the merged weight change at site 'l0\.q'"):
        merge(inputs(), method, weights=[1e300, 1.0, 1.0], rank=2)


@pytest.mark.parametrize("params, message", [
    ({"weights": [float("inf"), 1, 1]}, "merge parameter weights must be a finite number, got inf"),
    ({"lam": float("nan")}, "merge parameter lam must be a finite number, got nan"),
    ({"density": float("nan")}, "merge parameter density must be a finite number, got nan"),
])
def test_non_finite_parameters_are_refused(params, message):
    with pytest.raises(ConfigError, match=message):
        merge(inputs(), "ties", **params)


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_ties"])
def test_large_finite_weights_merge_with_a_finite_error(method):
    # dense ΔW ~ 1e31: the randomized SVD's (M Mᵀ)² M once overflowed float32 (a raw LinAlgError).
    # These merges are linear in the weights (unweighted election, same masks), so big = 1e30 · small.
    ads = inputs()
    big, rep = merge_with_report(ads, method, weights=[1e30, 1.0, 1.0])
    small, ref = merge_with_report(ads, method, weights=[1.0, 1e-30, 1e-30])
    assert math.isfinite(rep.total_error) and rep.total_error == pytest.approx(ref.total_error, rel=1e-3)
    for site in SHAPES:
        got, want = out_delta(big, site), out_delta(small, site) * 1e30
        assert abs(got).max() > 1e29 and abs(got - want).max() <= 1e-3 * abs(want).max()


def test_refactor_dense_scales_exactly_and_refuses_non_finite():
    m = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    b, a, err = refactor_dense(m, 8)
    for c in (2.0 ** 100, 2.0 ** -100):          # far outside float32's comfortable range, still finite
        bc, ac, errc = refactor_dense(m * c, 8)
        torch.testing.assert_close(bc @ ac, (b @ a) * c, rtol=1e-5, atol=1e-5 * c)
        assert errc == pytest.approx(err, rel=1e-5)
    m[3, 4] = float("nan")
    with pytest.raises(ConfigError, match="the matrix to re-factor holds NaN or inf"):
        refactor_dense(m, 8)


def linalg_failure(*args, **kwargs):
    raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (error code: 7).")


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_a_failed_svd_is_a_typed_error_naming_the_site(monkeypatch, svd):
    monkeypatch.setattr(torch.linalg, "svd", linalg_failure)
    monkeypatch.setattr(torch.linalg, "eigh", linalg_failure)
    with pytest.raises(ConfigError) as info:
        merge(inputs(), "ties", svd=svd)
    msg = str(info.value)
    assert msg.startswith("merge 'ties': re-factoring site 'big' to rank 9 failed (linalg.svd: The algorithm "
                          "failed to converge (error code: 7).)") and "rank" in msg.split(";")[1]


def test_a_failed_eigen_decomposition_in_a_reversible_merge_is_a_typed_error(monkeypatch):
    monkeypatch.setattr(torch.linalg, "eigh", linalg_failure)
    with pytest.raises(ConfigError, match=r"reversible merge: the fit at site 'l0\.q' failed \(linalg\.svd: The"):
        merge_reversible(inputs(), k=2)


def test_recover_refuses_non_finite_coefficients():
    rev = merge_reversible(inputs(), k=2)
    rev.site_coefficients["l0.v"][0, 1] = float("nan")
    with pytest.raises(ConfigError, match=r"recovering 'a': the weight change at site 'l0\.v' is not finite"):
        recover(rev, "a")


# ----------------------------------------------------------------------------- recipes
def test_yaml_1_2_exponent_floats_are_numbers(tmp_path):
    text = ("method: ties\ninputs:\n  - adapter: a\n    weight: 2E3\n  - adapter: b\n    weight: -.5e-1\n"
            "parameters:\n  density: 1e-30\n  lam: +1.0e2\n  majority: 1e\n")
    recipe = load_recipe(write_text(tmp_path / "r.yaml", text))
    assert recipe.parameters == {"density": 1e-30, "lam": 100.0, "majority": "1e"}
    assert [i.weight for i in recipe.inputs] == [2000.0, -0.05]
    assert yaml.safe_load("x: 1e-30") == {"x": "1e-30"}            # the global SafeLoader is untouched


def test_recipes_stay_safe(tmp_path):
    evil = write_text(tmp_path / "r.yaml", "method: !!python/object/apply:os.system ['true']\ninputs: []\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_recipe(evil)


def write_text(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is not a text file (UTF-8)"),
    (b"method: ties\x00\n", "is not valid YAML"),
    (b"", "is empty"),
    (b"just some words\n", "a merge recipe is a YAML mapping (method, inputs, ...), got str"),
])
def test_unreadable_recipe_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "recipe.bin"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_cli_binary_recipe_exits_2_with_a_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\xf0\x00\x00\x00\x00\x00\x00\x00{\"__metadata__\":\xff\xfe}")
    res = CliRunner().invoke(merge_app(), ["merge", str(path), "--name", "m", "--store", str(tmp_path / "st")])
    assert res.exit_code == 2 and f"merge recipe {path} is not a text file (UTF-8)" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_non_finite_recipe_weights_name_the_input(tmp_path):
    path = write_text(tmp_path / "r.yaml", "method: linear\ninputs:\n  - adapter: a\n  - adapter: b\n    weight: .inf\n")
    with pytest.raises(ConfigError, match="inputs.1.weight: Input should be a finite number"):
        load_recipe(path)


@pytest.fixture
def twin_folders(tmp_path):
    """Two different adapters saved under the same name 'a1' in two folders."""
    lora("a1", 2, 4.0, 1).save(tmp_path / "x" / "a1")
    lora("a1", 2, 4.0, 2).save(tmp_path / "y" / "a1")
    return tmp_path


def test_colliding_saved_names_are_reported_by_the_paths_given(twin_folders):
    recipe = load_recipe(write(twin_folders / "r.yaml", {"method": "linear", "inputs": [
        {"adapter": "x/a1"}, {"adapter": "y/a1"}]}))
    with pytest.raises(ConfigError) as info:
        run_recipe(recipe, "m", base_dir=twin_folders)
    assert str(info.value) == (
        "merge inputs 'x/a1' and 'y/a1' are different adapters that share the name 'a1'; give each a "
        "distinct name in the recipe (`name:` next to `adapter:`, e.g. name: a1-2)")


def test_a_recipe_name_renames_an_input(twin_folders):
    recipe = load_recipe(write(twin_folders / "r.yaml", {"method": "linear", "inputs": [
        {"adapter": "x/a1"}, {"adapter": "y/a1", "name": "a1-2"}]}))
    out, rep = run_recipe(recipe, "m", base_dir=twin_folders)
    assert [i["name"] for i in rep.inputs] == ["a1", "a1-2"]
    with pytest.raises(ConfigError, match=r"inputs\.1\.name: Value error, adapter name 'a 1' is malformed"):
        load_recipe(write(twin_folders / "r.yaml", {"method": "linear", "inputs": [
            {"adapter": "x/a1"}, {"adapter": "y/a1", "name": "a 1"}]}))


def test_one_folder_under_two_paths_is_reported_by_the_paths_given(twin_folders):
    recipe = load_recipe(write(twin_folders / "r.yaml", {"method": "linear", "inputs": [
        {"adapter": "x/a1"}, {"adapter": "x/../x/a1"}, {"adapter": "x/a1"}]}))
    with pytest.raises(ConfigError, match=r"^merge inputs 'x/a1' and 'x/\.\./x/a1' are the same adapter "
                                          r"\(identical tensors, sha256:"):
        run_recipe(recipe, "m", base_dir=twin_folders)
    recipe = load_recipe(write(twin_folders / "r.yaml", {"method": "linear", "inputs": [
        {"adapter": "x/a1"}, {"adapter": "x/a1"}]}))
    with pytest.raises(ConfigError, match=r"^merge input 'x/a1' is given more than once; list each input once"):
        run_recipe(recipe, "m", base_dir=twin_folders)


def test_a_non_finite_folder_input_is_named_by_its_path(tmp_path):
    bad = lora("a1", 2, 4.0, 1)
    bad.tensors["l0.q"]["lora_B"][1, 1] = float("nan")
    try:
        bad.save(tmp_path / "x" / "a1")
    except NonFiniteError:                        # saving may refuse it already: nothing to merge then
        pytest.skip("Adapter.save refuses non-finite tensors")
    lora("b", 2, 4.0, 2).save(tmp_path / "b")
    recipe = load_recipe(write(tmp_path / "r.yaml", {"method": "linear", "inputs": [
        {"adapter": "x/a1"}, {"adapter": "b"}]}))
    with pytest.raises(NonFiniteError, match=r"^merge input 'x/a1': .*non-finite"):
        run_recipe(recipe, "m", base_dir=tmp_path)


def test_cli_overflowing_merge_exits_2_and_keeps_the_stored_adapter(tmp_path):
    st = AdapterStore(tmp_path / "store")
    ads = inputs()
    for a in ads:
        st.put(a)
    names = [{"adapter": a.name} for a in ads]
    ok = write(tmp_path / "ok.yaml", {"method": "linear", "inputs": names})
    runner = CliRunner()
    assert runner.invoke(merge_app(), ["merge", str(ok), "--name", "m", "--store", str(st.root)]).exit_code == 0
    before = out_delta(st.get("m"), "l0.q")
    bad = write(tmp_path / "bad.yaml", {"method": "ties", "inputs": [{**names[0], "weight": 1e300}, *names[1:]]})
    res = runner.invoke(merge_app(), ["merge", str(bad), "--name", "m", "--store", str(st.root), "--overwrite"])
    assert res.exit_code == 2, res.output
    assert "merge 'ties': the merged weight change at site '" in res.output and "rel. error" not in res.output
    assert (out_delta(st.get("m"), "l0.q") == before).all()


def test_cli_reversible_with_a_huge_k_is_refused_at_once(tmp_path):
    """k is checked against the inputs before the store is asked about k basis names (it used to
    build and check a billion names first)."""
    st = AdapterStore(tmp_path / "store")
    for a in inputs():
        st.put(a)
    recipe = write(tmp_path / "r.yaml", {"method": "reversible", "parameters": {"k": 1_000_000_000},
                                         "inputs": [{"adapter": a.name} for a in inputs()]})
    res = CliRunner().invoke(merge_app(), ["merge", str(recipe), "--name", "m", "--store", str(st.root)],
                             env={"COLUMNS": "300"})
    assert res.exit_code == 2, res.output
    assert "reversible merge k must be an integer in [1, 3]" in res.output


def test_cli_head_from_gives_the_merged_adapter_a_head(tmp_path):
    """A merged adapter classifies again: --head-from copies a stored (or folder) adapter's head, task
    and labels, and the lineage names where the head came from; refused for a donor without a head
    and for reversible merges."""
    from adapterkit.core.heads import ClassificationHead

    st = AdapterStore(tmp_path / "store")
    ads = inputs()
    ads[0].head = ClassificationHead.create(["pos", "neg"], 8, "last", seed=1)
    ads[0].meta.task, ads[0].meta.labels = "sentiment", ["pos", "neg"]
    for a in ads:
        st.put(a)
    recipe = write(tmp_path / "r.yaml", {"method": "linear", "inputs": [{"adapter": a.name} for a in ads]})
    runner = CliRunner()
    res = runner.invoke(merge_app(), ["merge", str(recipe), "--name", "m", "--store", str(st.root),
                                      "--head-from", "a"])
    assert res.exit_code == 0, res.output
    merged = st.get("m")
    assert merged.head.labels == ["pos", "neg"] and torch.equal(merged.head.weight, ads[0].head.weight)
    assert (merged.meta.task, merged.meta.labels) == ("sentiment", ["pos", "neg"])
    assert merged.meta.lineage[-1]["params"]["head_from"]["name"] == "a"
    res = runner.invoke(merge_app(), ["merge", str(recipe), "--name", "m2", "--store", str(st.root),
                                      "--head-from", "b"], env={"COLUMNS": "300"})
    assert res.exit_code == 2 and "--head-from 'b': adapter 'b' has no classification head to give" in res.output
    assert "m2" not in st
    rev = write(tmp_path / "rev.yaml", {"method": "reversible", "parameters": {"k": 2},
                                        "inputs": [{"adapter": a.name} for a in ads]})
    res = runner.invoke(merge_app(), ["merge", str(rev), "--name", "r", "--store", str(st.root),
                                      "--head-from", "a"], env={"COLUMNS": "300"})
    assert res.exit_code == 2 and "a reversible merge stores basis adapters" in res.output
