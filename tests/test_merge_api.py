"""merge() edges: bad input (exact messages), lineage, the store, runtime equivalence, recipes, the CLI."""

import json

import pytest
import torch
import typer
import yaml
from conftest import ATTN, input_ids, tiny_llama
from test_merge import SHAPES, close, inputs, lora, out_delta, ref_delta
from typer.testing import CliRunner

from adapterkit import (AdapterRuntime, BaseMismatchError, ConfigError, LoraConfig,
                        UnsupportedError, create_adapter)
from adapterkit.cli.merge import merge_cmd
from adapterkit.merge import ReversibleMerge, load_recipe, merge, merge_reversible, recover
from adapterkit.store import AdapterStore


@pytest.mark.parametrize("call, error, message", [
    (lambda a: merge([]), ConfigError, "merge needs at least one adapter; the input list is empty"),
    (lambda a: merge([a[0], a[1], a[0]]), ConfigError, "adapter(s) ['a'] are given more than once"),
    (lambda a: merge(a, "average"), UnsupportedError,
     "unknown merge method 'average'; valid methods: concat, dare_linear, dare_ties, linear, "
     "magnitude_prune, task_arithmetic, ties"),
    (lambda a: merge(a, "reversible"), UnsupportedError, "use merge_reversible(adapters, k=...)"),
    (lambda a: merge(a, "ties", densty=0.5), ConfigError,
     "unknown parameter(s) ['densty'] for merge method 'ties'; valid parameters: density, elect_on, lam, "
     "majority, mean, rank, seed, svd, weights"),
    (lambda a: merge(a, "concat", rank=4), ConfigError,
     "unknown parameter(s) ['rank'] for merge method 'concat'; valid parameters: weights"),
    (lambda a: merge(a, "ties", density=0.0), ConfigError, "density must be in (0, 1] (the fraction of entries kept), got 0.0"),
    (lambda a: merge(a, "magnitude_prune", density=1.5), ConfigError, "density must be in (0, 1]"),
    (lambda a: merge(a, "dare_linear", p=1.0), ConfigError,
     "DARE p must be in [0, 1) (the probability of dropping an entry), got 1.0"),
    (lambda a: merge(a, "dare_ties", p=-0.1), ConfigError, "DARE p must be in [0, 1)"),
    (lambda a: merge(a, weights=[1, 2]), ConfigError, "2 weights for 3 input adapters; give one weight per input"),
    (lambda a: merge(a, "ties", mean="median"), ConfigError, "mean must be one of count, weight, none; got 'median'"),
    (lambda a: merge(a, "linear", rank=0), ConfigError, "rank must be a positive integer (or None), got 0"),
    (lambda a: merge_reversible(a, k=4), ConfigError, "reversible merge k must be an integer in [1, 3]"),
])
def test_bad_input_is_refused_with_a_helpful_message(call, error, message):
    with pytest.raises(error) as info:
        call(inputs())
    assert message in str(info.value)


def test_different_bases_are_refused_naming_both_fingerprints():
    a, b = lora("a", 2, 4.0, 1), lora("other", 2, 4.0, 2, base="sha256:base-b")
    with pytest.raises(BaseMismatchError) as info:
        merge([a, b])
    assert str(info.value) == ("cannot merge adapters of different bases: 'a' was made for base (sha256:base-a) "
                               "but 'other' for base (sha256:base-b); merge adapters of one base only")


def test_the_same_adapter_under_two_names_is_refused():
    a = lora("a", 2, 4.0, 1)
    twin = lora("twin", 2, 4.0, 1)
    with pytest.raises(ConfigError, match=r"inputs 'a' and 'twin' are the same adapter \(identical tensors"):
        merge([a, twin])


def test_lineage_and_store_round_trip(tmp_path):
    ads = inputs()
    out = merge(ads, "ties", name="multi", weights=[1, 2, 3], density=0.5)
    entry = out.meta.lineage[0]
    assert (entry["op"], entry["method"]) == ("merge", "ties")
    assert [(i["name"], i["weight"], i["base_fingerprint"]) for i in entry["inputs"]] == \
        [("a", 1.0, "sha256:base-a"), ("b", 2.0, "sha256:base-a"), ("c", 3.0, "sha256:base-a")]
    assert all(i["fingerprint"].startswith("sha256:") for i in entry["inputs"])
    assert entry["params"]["density"] == 0.5 and entry["params"]["elect_on"] == "unweighted"
    assert set(entry["site_errors"]) == set(SHAPES)
    assert out.meta.base_fingerprint == "sha256:base-a"
    st = AdapterStore(tmp_path / "store")
    st.put(out)
    back = st.get("multi")
    assert st.show("multi")["lineage"][0]["method"] == "ties"
    for site in SHAPES:
        close(out_delta(back, site), out_delta(out, site), 1e-6)


@torch.no_grad()
def test_concat_equals_all_inputs_active_together_in_the_runtime():
    model = tiny_llama()
    cfgs = [LoraConfig(r=2, alpha=4.0, target_modules=ATTN, init="nonzero", init_std=0.3),
            LoraConfig(r=4, alpha=3.0, target_modules=["q_proj", "v_proj", "gate_proj"], init="nonzero",
                       init_std=0.3, use_rslora=True),
            LoraConfig(r=3, alpha=6.0, target_modules=["o_proj", "down_proj"], init="nonzero", init_std=0.3,
                       rank_pattern={"down_proj": 5})]
    ads = [create_adapter(n, model, c, seed=i) for i, (n, c) in enumerate(zip("xyz", cfgs))]
    weights = {"x": 1.0, "y": 0.5, "z": -1.5}
    merged = merge(ads, "concat", weights=list(weights.values()), name="xyz")
    rt = AdapterRuntime(model)
    for a in [*ads, merged]:
        rt.add(a)
    ids = input_ids(2, 7)
    with rt.disabled():
        base = model(ids).logits
    for a in ads:
        with rt.batch([a.name] * 2):
            assert (model(ids).logits - base).abs().max() > 1e-2
    with rt.batch([weights] * 2):
        together = model(ids).logits
    with rt.batch(["xyz"] * 2):
        alone = model(ids).logits
    assert (together - base).abs().max() > 1e-2
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- recipes and the CLI
def write(path, data):
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_recipe_typo_names_the_path(tmp_path):
    bad = {"method": "ties", "inputs": [{"adapter": "a"}, {"adapter": "b", "wieght": 2}]}
    with pytest.raises(ConfigError) as info:
        load_recipe(write(tmp_path / "r.yaml", bad))
    assert "inputs.1.wieght: Extra inputs are not permitted" in str(info.value)
    with pytest.raises(ConfigError, match="methdo: Extra inputs are not permitted"):
        load_recipe(write(tmp_path / "r.yaml", {"methdo": "ties", "method": "ties", "inputs": [{"adapter": "a"}]}))
    with pytest.raises(ConfigError, match="method: Value error, unknown merge method 'tie'; valid methods: concat"):
        load_recipe(write(tmp_path / "r.yaml", {"method": "tie", "inputs": [{"adapter": "a"}]}))
    with pytest.raises(ConfigError, match="give each input's weight in inputs"):
        load_recipe(write(tmp_path / "r.yaml", {"method": "linear", "inputs": [{"adapter": "a"}],
                                                "parameters": {"weights": [1]}}))


@pytest.fixture
def store_setup(tmp_path):
    st = AdapterStore(tmp_path / "store")
    ads = inputs()
    st.put(ads[0])
    st.put(ads[1])
    ads[2].save(tmp_path / "folder" / "c")                      # one input read from a folder path
    return st, ads, merge_app()


def merge_app():
    """A temporary app as cli.py will have it: merge_cmd registered next to another command."""
    app = typer.Typer()
    app.command("merge")(merge_cmd)
    app.command("noop")(lambda: None)
    return app


def test_cli_merge_end_to_end(tmp_path, store_setup):
    st, ads, app = store_setup
    recipe = write(tmp_path / "m.yaml", {"method": "linear", "inputs": [
        {"adapter": "a", "weight": 1.0}, {"adapter": "b", "weight": 0.5}, {"adapter": "folder/c", "weight": 2.0}],
        "rank": 4})
    runner = CliRunner()
    res = runner.invoke(app, ["merge", str(recipe), "--name", "abc", "--store", str(st.root), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output.strip().splitlines()[-1])
    assert report["method"] == "linear" and report["max_error"] > 0 and set(report["site_errors"]) == set(SHAPES)
    stored = st.get("abc")
    assert stored.meta.lineage[0]["params"]["rank"] == 4
    assert [i["name"] for i in stored.meta.lineage[0]["inputs"]] == ["a", "b", "c"]
    want = merge(ads, "linear", weights=[1.0, 0.5, 2.0], rank=4)
    for site in SHAPES:
        close(out_delta(stored, site), out_delta(want, site), 1e-5)
    again = runner.invoke(app, ["merge", str(recipe), "--name", "abc", "--store", str(st.root)])
    assert again.exit_code == 0 and "stored abc@v2 (not promoted" in again.output.replace("\n", " ")
    table = runner.invoke(app, ["merge", str(recipe), "--name", "abc", "--store", str(st.root), "--overwrite"])
    assert table.exit_code == 0 and "rel. error" in table.output and "stored abc" in table.output
    missing = write(tmp_path / "x.yaml", {"method": "concat", "inputs": [{"adapter": "nope"}]})
    res = runner.invoke(app, ["merge", str(missing), "--name", "n", "--store", str(st.root)])
    assert res.exit_code == 2 and "merge input 'nope' is neither an adapter in the store" in res.output


def test_cli_reversible_stores_the_basis_and_recovers_tasks(tmp_path, store_setup):
    st, ads, app = store_setup
    recipe = write(tmp_path / "rev.yaml", {"method": "reversible", "parameters": {"k": 3},
                                           "inputs": [{"adapter": "a"}, {"adapter": "b"}, {"adapter": "folder/c"}]})
    res = CliRunner().invoke(app, ["merge", str(recipe), "--name", "rev", "--store", str(st.root)])
    assert res.exit_code == 0, res.output
    assert {"rev.basis0", "rev.basis1", "rev.basis2"} <= {r["name"] for r in st.list()}
    rev = ReversibleMerge.from_store(st, "rev")
    for a in ads:
        got = recover(rev, a.name)
        for site in a.sites:
            close(out_delta(got, site), ref_delta(a, site), 1e-4)


def test_cli_help_shows_an_example_recipe():
    res = CliRunner().invoke(merge_app(), ["merge", "--help"])
    assert res.exit_code == 0
    for line in ("Example recipe", "method: ties", "- adapter: sentiment", "density: 0.3", "rank: 32"):
        assert line in res.output
