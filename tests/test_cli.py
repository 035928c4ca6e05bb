"""The CLI contract later checks rely on: generate --json, adapter inspect --json, clear errors."""

import json

import pytest
import torch
from conftest import ATTN
from typer.testing import CliRunner

from adapterkit import Adapter, AdapterRuntime, LoraConfig, create_adapter, generate, load_base
from adapterkit.cli.main import app

runner = CliRunner()


@pytest.fixture
def adapters(tiny_llm_dir, tmp_path):
    base = load_base(str(tiny_llm_dir))
    paths = []
    for i, name in enumerate(["alpha", "beta"]):
        a = create_adapter(name, base.model, LoraConfig(r=4, target_modules=ATTN, init="nonzero", init_std=0.5),
                           seed=i, fingerprint=base.fingerprint, base_name=base.name)
        paths.append(a.save(tmp_path / name))
    return base, paths


def json_rows(output):
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_generate_json_mixed_batch_equals_each_adapter_alone(tiny_llm_dir, adapters):
    base, paths = adapters
    prompt = "hello world the cat"
    res = runner.invoke(app, ["generate", prompt, "--base", str(tiny_llm_dir), "--adapter", str(paths[0]),
                              "--adapter", str(paths[1]), "--max-tokens", "6", "--json"])
    assert res.exit_code == 0, res.output
    rows = json_rows(res.output)
    assert [r["adapter"] for r in rows] == ["alpha", "beta"]
    rt = AdapterRuntime.from_base(base)
    for row, path in zip(rows, paths):
        rt.add(Adapter.load(path))
        alone = generate(rt, base.tokenizer, [prompt], [row["adapter"]], max_new_tokens=6)[0]
        assert row["token_ids"] == alone.token_ids and row["text"] == alone.text
    plain = json_rows(runner.invoke(app, ["generate", prompt, "--base", str(tiny_llm_dir), "--max-tokens", "6",
                                          "--json"]).output)
    assert plain[0]["adapter"] is None
    assert plain[0]["token_ids"] != rows[0]["token_ids"]       # the adapters change the greedy path


def test_generate_compose_runs_weighted_adapters_on_one_row(tiny_llm_dir, adapters):
    base, paths = adapters
    prompt = "hello world the cat"
    spec = f"{paths[0]}=1.0,{paths[1]}=0.5"
    res = runner.invoke(app, ["generate", prompt, "--base", str(tiny_llm_dir), "--adapter", str(paths[0]),
                              "--compose", spec, "--max-tokens", "6", "--json"])
    assert res.exit_code == 0, res.output
    rows = json_rows(res.output)
    assert [r["adapter"] for r in rows] == ["alpha", {"alpha": 1.0, "beta": 0.5}]
    rt = AdapterRuntime.from_base(base)
    for path in paths:
        rt.add(Adapter.load(path))
    both = generate(rt, base.tokenizer, [prompt], [{"alpha": 1.0, "beta": 0.5}], max_new_tokens=6)[0]
    assert rows[1]["token_ids"] == both.token_ids
    assert rows[1]["token_ids"] != rows[0]["token_ids"]        # beta at 0.5 changes alpha's greedy path
    for bad, message in [("./a", "each item must be ADAPTER=WEIGHT"), ("./a=x", "each item must be ADAPTER=WEIGHT"),
                         (f"{paths[0]}=1,{paths[0]}=2", "names an adapter twice")]:
        res = runner.invoke(app, ["generate", prompt, "--base", str(tiny_llm_dir), "--compose", bad])
        assert res.exit_code == 2 and message in res.output, res.output


def test_adapter_inspect_json(adapters):
    _, paths = adapters
    res = runner.invoke(app, ["adapter", "inspect", str(paths[0]), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["method"] == "lora" and info["rank"] == [4] and info["targets"] == ATTN
    assert info["sites"] == 8 and info["parameters"] == 8 * 4 * 32 + 4 * (4 * 32) + 4 * (4 * 16)
    assert info["format"] == "adapterkit" and info["base_fingerprint"].startswith("sha256:")


def test_cli_errors_are_clear_and_exit_2(tiny_llm_dir, tmp_path):
    res = runner.invoke(app, ["generate", "hi", "--base", str(tiny_llm_dir), "--adapter", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert "error:" in res.output and "does not exist" in res.output
    res = runner.invoke(app, ["adapter", "create", "x", "--base", str(tiny_llm_dir), "--r", "0",
                              "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "LoRA r must be a positive integer, got 0" in res.output
    assert not (tmp_path / "x").exists()


def test_create_then_export_merged(tiny_llm_dir, tmp_path):
    res = runner.invoke(app, ["adapter", "create", "made", "--base", str(tiny_llm_dir), "--r", "2",
                              "--init", "nonzero", "--out", str(tmp_path / "made")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["adapter", "export-merged", str(tmp_path / "made"), "--base", str(tiny_llm_dir),
                              "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    merged = load_base(str(tmp_path / "merged"))
    assert merged.tokenizer is not None and merged.fingerprint != load_base(str(tiny_llm_dir)).fingerprint


@pytest.mark.parametrize("method, extra, summary", [
    ("ia3", [], "ia3"), ("bottleneck", ["--placement", "parallel", "--reduction-factor", "4"], "bottleneck parallel"),
    ("sparse", [], "sparse")])
def test_create_makes_every_family(tiny_llm_dir, tmp_path, method, extra, summary):
    """`adapter create --method`: the family's config for the base; --init default is the identity
    (the bare base's logits exactly), nonzero moves them; inspect names the family by its summary."""
    base = load_base(str(tiny_llm_dir))
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        bare = base.model(ids).logits
    for init in ("default", "nonzero"):
        out = tmp_path / f"{method}-{init}"
        res = runner.invoke(app, ["adapter", "create", "made", "--base", str(tiny_llm_dir), "--method", method,
                                  *extra, "--init", init, "--out", str(out)])
        assert res.exit_code == 0, res.output
        made = Adapter.load(out)
        assert made.config.type == method and made.summary().startswith(summary)
        rt = AdapterRuntime.from_base(base)
        rt.add(made)
        with torch.no_grad(), rt.batch(["made"]):
            got = base.model(ids).logits
        rt.remove("made")
        assert torch.equal(got, bare) == (init == "default")
    res = runner.invoke(app, ["adapter", "inspect", str(tmp_path / f"{method}-default"), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["method"] == method


def test_create_refuses_flags_of_another_family(tiny_llm_dir, tmp_path):
    res = runner.invoke(app, ["adapter", "create", "x", "--base", str(tiny_llm_dir), "--placement", "parallel",
                              "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--placement set a bottleneck adapter; this one is lora" in res.output
    res = runner.invoke(app, ["adapter", "create", "x", "--base", str(tiny_llm_dir), "--method", "loha",
                              "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no adapter family 'loha' to make here" in res.output
    assert not (tmp_path / "x").exists()


def test_merge_is_registered_with_its_example():
    res = runner.invoke(app, ["merge", "--help"])
    assert res.exit_code == 0 and "Example recipe (merge.yaml)" in res.output and "method: ties" in res.output


def test_train_rows_trains_on_a_seeded_sample(tmp_path):
    """Few-shot runs: --train-rows N takes a seeded sample (recorded as the run's example count)."""
    from typer.testing import CliRunner

    from adapterkit.cli import app
    from adapterkit.store import AdapterStore
    from conftest import classification_files

    path, data = classification_files(tmp_path)
    common = ["--base", str(path), "--train-file", str(data), "--store", str(tmp_path / "s"), "--no-progress",
              "--steps", "2"]
    res = CliRunner().invoke(app, ["train", "--name", "few", "--train-rows", "5", *common])
    assert res.exit_code == 0, res.output
    assert "on 5 examples" in res.output
    assert AdapterStore(tmp_path / "s").show("few")["lineage"][0]["params"]["train_examples"] == 5
    res = CliRunner().invoke(app, ["train", "--name", "many", "--train-rows", "13", *common])
    assert res.exit_code != 0 and "--train-rows 13 is more than the 12 training rows; give at most 12" in res.output
