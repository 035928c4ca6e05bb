"""One naming of adapters across the CLI (a folder or a stored name), --version / python -m, sampling
flags on generate, listings that keep names whole at 80 columns (+ --json), merge's one-line summary."""

import json
import shutil
import subprocess
import sys
from importlib.metadata import version

import pytest
import yaml
from conftest import ATTN
from typer.testing import CliRunner

import adapterkit.core.base
from adapterkit import LoraConfig, create_adapter, load_base
from adapterkit.cli.main import app
from adapterkit.errors import ConfigError
from adapterkit.serve.requests import SamplingParams
from adapterkit.store import AdapterStore

runner = CliRunner()
PROMPT = "hello world the cat"


def json_rows(output):
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


@pytest.fixture
def world(tiny_llm_dir, tmp_path):
    """alpha and beta saved as folders and stored in tmp_path/store (names and folders name the same adapters)."""
    base = load_base(str(tiny_llm_dir))
    store = AdapterStore(tmp_path / "store")
    folders = {}
    for i, name in enumerate(["alpha", "beta"]):
        a = create_adapter(name, base.model, LoraConfig(r=4, target_modules=ATTN, init="nonzero", init_std=0.5),
                           seed=i, fingerprint=base.fingerprint, base_name=base.name)
        folders[name] = a.save(tmp_path / "folders" / name)
        store.put(a)
    return tiny_llm_dir, store, folders


@pytest.fixture
def no_base(monkeypatch):
    """Fails the test if a command loads the base (arguments must be checked before)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the base was loaded before the arguments were checked")
    monkeypatch.setattr(adapterkit.core.base, "load_base", refuse)


# ---------------------------------------------------------------- 1. a folder or a stored name, everywhere

def test_generate_takes_store_names_and_folders_alike(world):
    base, store, folders = world
    common = ["generate", PROMPT, "--base", str(base), "--max-tokens", "6", "--json"]
    by_name = runner.invoke(app, [*common, "--adapter", "alpha", "--compose", f"alpha=1.0,{folders['beta']}=0.5",
                                  "--store", str(store.root)])
    assert by_name.exit_code == 0, by_name.output
    by_folder = runner.invoke(app, [*common, "--adapter", str(folders["alpha"]), "--compose",
                                    f"{folders['alpha']}=1.0,{folders['beta']}=0.5"])
    assert by_folder.exit_code == 0, by_folder.output
    assert json_rows(by_name.output) == json_rows(by_folder.output)
    assert [r["adapter"] for r in json_rows(by_name.output)] == ["alpha", {"alpha": 1.0, "beta": 0.5}]


def test_default_store_is_adapterkit_home(world, monkeypatch, tmp_path):
    base, store, _ = world
    monkeypatch.setenv("ADAPTERKIT_HOME", str(store.root.parent))       # $ADAPTERKIT_HOME/store
    res = runner.invoke(app, ["generate", PROMPT, "--base", str(base), "--adapter", "beta", "--max-tokens", "3",
                              "--json"])
    assert res.exit_code == 0, res.output
    assert json_rows(res.output)[0]["adapter"] == "beta"


def test_inspect_and_export_merged_take_store_names(world, tmp_path):
    base, store, folders = world
    res = runner.invoke(app, ["adapter", "inspect", "alpha", "--store", str(store.root), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["name"] == "alpha" and info["path"] == str(store.path("alpha")) and info["rank"] == [4]
    folder = json.loads(runner.invoke(app, ["adapter", "inspect", str(folders["alpha"]), "--json"]).output)
    assert {k: v for k, v in folder.items() if k != "path"} == {k: v for k, v in info.items() if k != "path"}
    res = runner.invoke(app, ["adapter", "export-merged", "alpha", str(folders["beta"]), "--base", str(base),
                              "--store", str(store.root), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    assert load_base(str(tmp_path / "merged")).fingerprint != load_base(str(base)).fingerprint


@pytest.mark.parametrize("command", [
    ["generate", PROMPT, "--adapter", "{ref}"],
    ["generate", PROMPT, "--compose", "alpha=1,{ref}=0.5"],
    ["adapter", "inspect", "{ref}"],
    ["adapter", "export-merged", "alpha", "{ref}", "--out", "{tmp}/out"],
])
@pytest.mark.parametrize("ref, reason", [
    ("nope", "(no adapter named 'nope' in the store at {store}; stored: alpha, beta)"),
    ("{tmp}/missing/dir", "(not a valid adapter name)"),
])
def test_a_wrong_adapter_is_refused_before_the_base_loads(world, no_base, tmp_path, command, ref, reason):
    base, store, _ = world
    ref = ref.format(tmp=tmp_path)
    args = [a.format(ref=ref, tmp=tmp_path) for a in command] + ["--store", str(store.root)]
    if command[0] != "adapter" or command[1] != "inspect":
        args += ["--base", str(base)]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    want = (f"error: adapter '{ref}' is neither an adapter folder ({ref} does not exist) nor a stored adapter "
            f"{reason.format(store=store.root)}; give an existing adapter folder or the name of a stored adapter "
            "(`adapterkit ls` lists them; --store picks the store)")
    assert res.output.strip() == want
    assert not (tmp_path / "out").exists()


def test_a_missing_store_is_named_and_not_created(tiny_llm_dir, no_base, tmp_path):
    res = runner.invoke(app, ["adapter", "inspect", "alpha", "--store", str(tmp_path / "nostore")])
    assert res.exit_code == 2
    assert f"nor a stored adapter (there is no store at {tmp_path / 'nostore'})" in res.output
    assert not (tmp_path / "nostore").exists()


def test_two_folders_holding_one_name_are_refused_before_the_base(world, no_base, tmp_path):
    base, store, folders = world
    shutil.copytree(folders["alpha"], tmp_path / "copy")
    res = runner.invoke(app, ["generate", PROMPT, "--base", str(base), "--adapter", str(folders["alpha"]),
                              "--adapter", str(tmp_path / "copy")])
    assert res.output.strip() == (f"error: adapter '{tmp_path / 'copy'}' and the one in {folders['alpha']} are both "
                                  "named 'alpha'; one run attaches each name once: pass only one of them, or save "
                                  "one under another name")
    assert res.exit_code == 2
    same = runner.invoke(app, ["generate", PROMPT, "--base", str(base), "--compose",
                               f"{folders['alpha']}=1,{folders['alpha']}/=2"])
    assert same.exit_code == 2 and "names adapter 'alpha' twice" in same.output, same.output


# ---------------------------------------------------------------- 2. --version, python -m adapterkit

def test_version_flag_and_python_m():
    want = f"adapterkit {version('adapterkit')}\n"
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output == want
    proc = subprocess.run([sys.executable, "-m", "adapterkit", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout == want, proc.stderr


# ---------------------------------------------------------------- 3. sampling flags on generate

def test_generate_samples_reproducibly_with_a_seed(world):
    base, store, _ = world
    common = ["generate", PROMPT, "--base", str(base), "--store", str(store.root), "--max-tokens", "8", "--json"]

    def tokens(*extra):
        res = runner.invoke(app, [*common, *extra])
        assert res.exit_code == 0, res.output
        return [r["token_ids"] for r in json_rows(res.output)]
    greedy = tokens("--adapter", "alpha")
    assert tokens("--adapter", "alpha", "--temperature", "0", "--seed", "5") == greedy     # 0 = greedy, as before
    sampled = tokens("--adapter", "alpha", "--temperature", "1.0", "--seed", "7")
    assert sampled != greedy
    assert tokens("--adapter", "alpha", "--temperature", "1.0", "--seed", "7") == sampled
    assert tokens("--adapter", "alpha", "--temperature", "1.0", "--seed", "8") != sampled
    # one generator per row: the row's tokens do not depend on what else shares the batch
    mixed = tokens("--adapter", "beta", "--adapter", "alpha", "--temperature", "1.0", "--seed", "7")
    assert mixed[1] == sampled[0]
    # top-k 1 and a tiny top-p leave only the most likely token: greedy again
    assert tokens("--adapter", "alpha", "--temperature", "1.0", "--top-k", "1", "--seed", "7") == greedy
    assert tokens("--adapter", "alpha", "--temperature", "1.0", "--top-p", "1e-9", "--seed", "7") == greedy


def test_a_row_whose_sampling_fails_fails_alone(world):
    base, store, _ = world
    res = runner.invoke(app, ["generate", PROMPT, "--base", str(base), "--store", str(store.root), "--adapter",
                              "alpha", "--compose", "alpha=1e38", "--temperature", "1", "--seed", "1", "--json",
                              "--max-tokens", "4"])
    assert res.exit_code == 1, res.output
    ok, bad = json_rows(res.output)
    assert ok["adapter"] == "alpha" and len(ok["token_ids"]) > 0 and "error" not in ok
    assert bad == {"adapter": {"alpha": 1e38}, "text": "", "token_ids": [],
                   "error": "sampling failed: the model's output (logits) holds NaN or inf for this row"}


@pytest.mark.parametrize("flag, value, field", [
    ("--temperature", "1e-5", {"temperature": 1e-5}), ("--temperature", "101", {"temperature": 101.0}),
    ("--temperature", "-1", {"temperature": -1.0}), ("--top-p", "0", {"top_p": 0.0}),
    ("--top-p", "1.5", {"top_p": 1.5}), ("--top-k", "-1", {"top_k": -1}), ("--seed", "-3", {"seed": -3}),
])
def test_bad_sampling_values_get_the_servers_message(world, no_base, flag, value, field):
    base, store, _ = world
    with pytest.raises(ConfigError) as server:
        SamplingParams(max_tokens=32, **{"temperature": 0.0, **field})
    res = runner.invoke(app, ["generate", PROMPT, "--base", str(base), "--adapter", "alpha", "--store",
                              str(store.root), flag, value])
    assert res.exit_code == 2
    assert res.output.strip() == f"error: {server.value}"


# ---------------------------------------------------------------- 4. listings: names whole at 80 columns, --json

LONG = ["sentiment-product-reviews-classifier-v2", "topic-news-reuters-eight-classes-r16"]


def test_ls_keeps_long_names_whole_at_80_columns(world):
    base, store, _ = world
    b = load_base(str(base))
    for i, name in enumerate(LONG):
        a = create_adapter(name, b.model, LoraConfig(r=2), seed=i, fingerprint=b.fingerprint, base_name=b.name)
        a.meta.task, a.meta.metrics = "reuters-r8", {"accuracy": 0.912345, "macro_f1": 0.87654}
        store.put(a)
    res = runner.invoke(app, ["ls", "--store", str(store.root)], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    table = [line for line in res.output.splitlines() if line[:1] in "┏┃┡│└"]
    assert max(map(len, table)) <= 80
    for name in [*LONG, "alpha", "beta"]:
        assert any(f"│ {name} " in line for line in table), res.output
    # the columns that no longer fit are named, not squeezed to a few letters each; status always stays
    assert "┃ name " in table[1] and "┃ status ┃" in table[1]
    assert "(labels, metrics, size, base, created left out at 80 columns: widen the terminal, or use --json)" in res.output
    wide = runner.invoke(app, ["ls", "--store", str(store.root)], env={"COLUMNS": "250"})
    assert "left out" not in wide.output and "accuracy=0.9123, macro_f1=0.8765" in wide.output
    assert "│ lora r=2 alpha=16 " in wide.output         # the family's one-line summary, not a rank column


def test_route_ls_keeps_long_names_whole_at_80_columns(world, tmp_path):
    from adapterkit.route.api import fit_router

    base, store, _ = world
    examples = tmp_path / "ex.jsonl"
    examples.write_text("".join(json.dumps({"text": f"w{i} w{i + 1} cat", "adapter": a}) + "\n"
                                for a in ("alpha", "beta") for i in range(6)))
    for name in LONG:
        fit_router(store, ["alpha", "beta"], name + "-router", kind="retrieval", encoder="base",
                   examples_file=examples, n_held=2, lexical=False)
    res = runner.invoke(app, ["route", "ls", "--store", str(store.root)], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    for name in LONG:
        assert name + "-router" in res.output, res.output


def test_data_and_base_lists_keep_names_whole_and_print_json():
    from adapterkit.core.base import list_bases
    from adapterkit.data import list_tasks

    for command, names in [(["data", "list"], list_tasks()), (["base", "list"], [b["name"] for b in list_bases()])]:
        res = runner.invoke(app, command, env={"COLUMNS": "80"})
        assert res.exit_code == 0, res.output
        for name in names:
            assert name in res.output, res.output
        res = runner.invoke(app, [*command, "--json"])
        assert res.exit_code == 0, res.output
        assert [r["name"] for r in json.loads(res.output)] == names
    tasks = json.loads(runner.invoke(app, ["data", "list", "--json"]).output)
    assert all(set(t) >= {"labels", "sizes", "source", "licence"} for t in tasks if "error" not in t)


# ---------------------------------------------------------------- 5. merge: one line, the table with --verbose

def test_merge_prints_one_line_and_the_table_with_verbose(world, tmp_path):
    _, store, folders = world
    recipe = tmp_path / "m.yaml"
    recipe.write_text(yaml.safe_dump({"method": "ties", "inputs": [{"adapter": "alpha"},
                                                                   {"adapter": str(folders["beta"]), "name": "b2"}],
                                      "rank": 4}))
    res = runner.invoke(app, ["merge", str(recipe), "--name", "mixed", "--store", str(store.root)])
    assert res.exit_code == 0, res.output
    report = store.get("mixed").meta
    [line] = res.output.splitlines()
    assert line.startswith("stored mixed@v1: ties merge of alpha, b2; 8 sites, max rel. error ")
    assert f"; in the store at {store.root} (" in line and "site" not in line.split(";")[0]
    assert "┃" not in res.output and report.lineage[0]["method"] == "ties"
    res = runner.invoke(app, ["merge", str(recipe), "--name", "mixed", "--store", str(store.root), "--overwrite",
                              "--verbose", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["method"] == "ties"          # --json as before
    res = runner.invoke(app, ["merge", str(recipe), "--name", "mixed", "--store", str(store.root), "--overwrite",
                              "--verbose"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "rel. error" in res.output and "┃ site" in res.output
    assert res.output.count("layers.") == 8 and res.output.splitlines()[-1].startswith("stored mixed@v1: ties merge")
