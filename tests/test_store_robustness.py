"""The versioned adapter store (store.py) under real crashes, damaged files, bad tensors, router
names, legacy catalogs and concurrent writers: a catalog row and the folder it names always change
together, damage is reported (list: sizes, show: sha256) and refused (get), orphans are collected.

Crashes are real: a child Python process runs a put and dies by os._exit at a chosen point (the
module function it calls there is replaced in the child only), then the parent inspects the store.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
import torch
from conftest import ATTN, save_tiny
from typer.testing import CliRunner

from adapterkit import AdapterNameError, LoraConfig, create_adapter, load_base
from adapterkit.core.adapter import Adapter
from adapterkit.cli.main import app
from adapterkit.errors import CorruptAdapterError, NonFiniteError
from adapterkit.store import AdapterStore, _content, _digests

WEIGHTS = "adapter_model.safetensors"

# The catalog schema before versioned folders (store.py's CREATE TABLE without folder, content,
# files), copied here so that the legacy test keeps meaning "an old catalog" if _SCHEMA changes.
LEGACY_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    base_fingerprint TEXT,
    base_name TEXT,
    task TEXT,
    labels TEXT NOT NULL,
    metrics TEXT NOT NULL,
    lineage TEXT NOT NULL,
    ranks TEXT NOT NULL,
    parameters INTEGER NOT NULL,
    created TEXT NOT NULL
)
"""

# Run by a child process: json argument {root, name, sources, op, crash, ready, start}.
CHILD = r'''
import json, os, sys, time
args = json.loads(sys.argv[1])
import adapterkit.store as store_mod
from adapterkit.core.adapter import Adapter

store = store_mod.AdapterStore(args["root"])
crash = args.get("crash")
if crash == "in-save":                  # the temporary folder is written, not yet renamed into place
    import adapterkit._atomic as atomic
    def _fsync_tree(root):
        print("CRASH in-save " + str(root), flush=True)
        os._exit(19)
    atomic._fsync_tree = _fsync_tree
elif crash == "before-commit":          # the new folder is complete and hashed; no row names it yet
    def _content(files):
        print("CRASH before-commit", flush=True)
        os._exit(17)
    store_mod._content = _content
elif crash == "after-commit":           # the new row is committed; the superseded folder is not deleted
    def rmtree(path, *a, **k):
        print("CRASH rmtree " + str(path), flush=True)
        os._exit(18)
    store_mod.shutil.rmtree = rmtree
if args.get("ready"):
    open(args["ready"], "w").close()
    while not os.path.exists(args["start"]):
        time.sleep(0.002)
if args.get("op") == "remove":
    store.remove(args["name"])
for src in args.get("sources", []):
    path = store.put(Adapter.load(src, name=args["name"]), overwrite=True)
    print("PUT " + os.path.basename(path), flush=True)
'''


# ---------------------------------------------------------------------------- helpers
@pytest.fixture
def base(tmp_path):
    return load_base(str(save_tiny("llama", tmp_path / "llama")))


def make(base, name: str, version: int, r: int = 4) -> Adapter:
    """A nonzero LoRA whose metrics and labels say which version it is (seed = version)."""
    a = create_adapter(name, base.model, LoraConfig(r=r, target_modules=ATTN, init="nonzero"), seed=version,
                       fingerprint=base.fingerprint, base_name="tiny", task="t")
    a.meta.labels = [f"neg-v{version}", f"pos-v{version}"]
    a.meta.metrics = {"accuracy": version / 10, "version": version}
    return a


def same_tensors(a: Adapter, b: Adapter) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(
        a.tensors[s].keys() == b.tensors[s].keys() and all(torch.equal(a.tensors[s][k], b.tensors[s][k])
                                                            for k in a.tensors[s])
        for s in a.tensors)


def folders(root: Path) -> set[str]:
    """Every entry under <root>/adapters (hidden ones too: temporaries of an interrupted save)."""
    return {p.name for p in (root / "adapters").iterdir()}


def folder_of(store: AdapterStore, name: str) -> str:
    return Path(store.row(name)["path"]).name


def row_folders(store: AdapterStore) -> set[str]:
    return {Path(r["path"]).name for r in store.list()}


def assert_consistent(store: AdapterStore, name: str, versions: dict[int, Adapter]) -> int:
    """show says ok; its metrics, labels, ranks and content belong to the files get() returns."""
    rec = store.show(name)
    assert rec["status"] == "ok"
    folder = Path(rec["path"])
    assert folder.is_dir() and rec["content"] == _content(_digests(folder))
    got = store.get(name)
    v = rec["metrics"]["version"]
    want = versions[v]
    assert same_tensors(got, want)
    assert (got.meta.metrics, got.meta.labels) == (rec["metrics"], rec["labels"]) == (want.meta.metrics,
                                                                                      want.meta.labels)
    assert rec["ranks"] == want.ranks()
    return v


def child(tmp_path: Path, **args) -> list:
    script = tmp_path / "child.py"
    if not script.exists():
        script.write_text(CHILD, encoding="utf-8")
    return [sys.executable, str(script), json.dumps({k: (str(v) if isinstance(v, Path) else
                                                         [str(x) for x in v] if isinstance(v, list) else v)
                                                     for k, v in args.items()})]


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_child(tmp_path: Path, **args) -> subprocess.CompletedProcess:
    return subprocess.run(child(tmp_path, **args), capture_output=True, text=True, timeout=300, env=child_env())


def run_together(tmp_path: Path, jobs: list[dict]) -> list[tuple[int, str, str]]:
    """Start every job, wait until all have imported and opened the store, release them at once."""
    start = tmp_path / "start"
    procs = []
    for i, job in enumerate(jobs):
        ready = tmp_path / f"ready{i}"
        procs.append((ready, subprocess.Popen(child(tmp_path, **job, ready=ready, start=start), text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())))
    deadline = time.monotonic() + 300
    while not all(r.exists() for r, _ in procs):
        assert all(p.poll() is None for _, p in procs), [p.communicate() for _, p in procs if p.poll() is not None]
        assert time.monotonic() < deadline, "children did not start"
        time.sleep(0.01)
    start.touch()
    out = []
    for _, p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append((p.returncode, stdout, stderr))
    return out


# ---------------------------------------------------------------------------- 1. crashes during a put
def test_crash_before_commit_keeps_the_old_pair_and_the_next_put_collects_the_new_folder(base, tmp_path):
    root = tmp_path / "s"
    store = AdapterStore(root)
    v1, v2 = make(base, "x", 1, r=4), make(base, "x", 2, r=2)
    store.put(v1)
    old, before = folder_of(store, "x"), store.show("x")

    res = run_child(tmp_path, root=root, name="x", sources=[v2.save(tmp_path / "v2")], crash="before-commit")
    assert (res.returncode, res.stdout) == (17, "CRASH before-commit\n"), res.stderr

    # the new folder is on disk, complete, but no row names it
    (orphan,) = folders(root) - {old}
    assert orphan.startswith("x@") and same_tensors(Adapter.load(root / "adapters" / orphan), v2)
    fresh = AdapterStore(root)                               # a process that starts after the crash
    assert fresh.show("x") == before
    assert assert_consistent(fresh, "x", {1: v1, 2: v2}) == 1
    assert [(r["name"], r["status"], r["ranks"]) for r in fresh.list()] == [("x", "ok", [4])]

    fresh.put(make(base, "y", 3))                            # any put collects the orphan
    assert folders(root) == {old, folder_of(fresh, "y")}
    assert assert_consistent(fresh, "x", {1: v1, 2: v2}) == 1


def test_crash_after_commit_gives_the_new_pair_and_the_next_put_collects_the_old_folder(base, tmp_path):
    root = tmp_path / "s"
    store = AdapterStore(root)
    v1, v2 = make(base, "x", 1, r=4), make(base, "x", 2, r=2)
    store.put(v1)
    old = folder_of(store, "x")

    res = run_child(tmp_path, root=root, name="x", sources=[v2.save(tmp_path / "v2")], crash="after-commit")
    assert (res.returncode, res.stdout) == (18, f"CRASH rmtree {root / 'adapters' / old}\n"), res.stderr

    fresh = AdapterStore(root)
    new = folder_of(fresh, "x")
    assert new != old and folders(root) == {old, new}        # the superseded folder survived the crash
    assert assert_consistent(fresh, "x", {1: v1, 2: v2}) == 2
    assert [(r["name"], r["status"], r["ranks"]) for r in fresh.list()] == [("x", "ok", [2])]

    fresh.put(make(base, "y", 3))
    assert folders(root) == {new, folder_of(fresh, "y")}
    assert assert_consistent(fresh, "x", {1: v1, 2: v2}) == 2


def test_crash_inside_the_folder_write_leaves_a_temporary_that_the_next_put_collects(base, tmp_path):
    root = tmp_path / "s"
    store = AdapterStore(root)
    v1, v2 = make(base, "x", 1), make(base, "x", 2, r=2)
    store.put(v1)
    old, before = folder_of(store, "x"), store.show("x")

    res = run_child(tmp_path, root=root, name="x", sources=[v2.save(tmp_path / "v2")], crash="in-save")
    assert res.returncode == 19 and res.stdout.startswith("CRASH in-save "), (res.stdout, res.stderr)
    (tmp,) = folders(root) - {old}
    assert tmp.startswith(".x@") and ".tmp-" in tmp
    assert store.show("x") == before and assert_consistent(store, "x", {1: v1, 2: v2}) == 1

    store.put(v2, overwrite=True)
    assert folders(root) == {folder_of(store, "x")} and assert_consistent(store, "x", {1: v1, 2: v2}) == 2


def test_crash_inside_remove_leaves_an_orphan_that_the_next_put_collects(base, tmp_path):
    root = tmp_path / "s"
    store = AdapterStore(root)
    store.put(make(base, "x", 1))
    old = folder_of(store, "x")
    res = run_child(tmp_path, root=root, name="x", op="remove", crash="after-commit")
    assert (res.returncode, res.stdout) == (18, f"CRASH rmtree {root / 'adapters' / old}\n"), res.stderr
    assert store.list() == [] and "x" not in store and folders(root) == {old}
    store.put(make(base, "y", 2))
    assert folders(root) == {folder_of(store, "y")}


# ---------------------------------------------------------------------------- 2. damaged files
def _damaged_store(base, tmp_path):
    root = tmp_path / "s"
    store = AdapterStore(root)
    store.put(make(base, "good", 1))
    store.put(make(base, "x", 2))
    return root, store, store.path("x") / WEIGHTS


def _refusal(name: str, status: str) -> str:
    return f"stored adapter {name!r} is damaged: {status}; re-train or re-merge it with --overwrite, or remove it"


def test_a_truncated_weights_file_is_reported_by_list_show_and_get(base, tmp_path):
    root, store, weights = _damaged_store(base, tmp_path)
    full = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: full // 2])
    status = f"{WEIGHTS} has {full // 2} bytes, the catalog recorded {full}"

    assert {r["name"]: r["status"] for r in store.list()} == {"good": "ok", "x": status}
    assert store.show("x")["status"] == status and store.show("good")["status"] == "ok"
    with pytest.raises(CorruptAdapterError) as exc:
        store.get("x")
    assert str(exc.value) == _refusal("x", status)
    assert same_tensors(store.get("good"), make(base, "good", 1))

    # an overwrite repairs it and collects the damaged folder
    damaged = weights.parent.name
    store.put(make(base, "x", 3), overwrite=True)
    assert damaged not in folders(root) and folders(root) == row_folders(store)
    assert assert_consistent(store, "x", {3: make(base, "x", 3)}) == 3


def test_the_cli_shows_a_truncated_weights_file(base, tmp_path):
    root, store, weights = _damaged_store(base, tmp_path)
    full = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: full // 2])
    status = f"{WEIGHTS} has {full // 2} bytes, the catalog recorded {full}"
    runner, wide = CliRunner(), {"COLUMNS": "400"}

    res = runner.invoke(app, ["ls", "--store", str(root), "--json"])
    assert res.exit_code == 0, res.output
    assert {r["name"]: r["status"] for r in json.loads(res.stdout)} == {"good": "ok", "x": status}
    res = runner.invoke(app, ["ls", "--store", str(root)], env=wide)
    assert res.exit_code == 0, res.output
    rows = {line.split("│")[1].strip(): line.split("│")[-2].strip() for line in res.stdout.splitlines()
            if line.startswith("│")}
    assert rows == {"good": "ok", "x": f"damaged: {status}"}, res.stdout
    assert "1 damaged adapter(s): x " in res.stderr

    res = runner.invoke(app, ["show", "x", "--store", str(root), "--json"])
    assert res.exit_code == 1 and json.loads(res.stdout)["status"] == status
    res = runner.invoke(app, ["show", "x", "--store", str(root)], env=wide)
    assert res.exit_code == 1 and re.search(rf"│ status +│ {re.escape(status)} +│", res.stdout), res.stdout
    assert res.stderr == f"damaged: {status}; re-train or re-merge it with --overwrite\n"
    res = runner.invoke(app, ["show", "good", "--store", str(root)], env=wide)
    assert res.exit_code == 0 and re.search(r"│ status +│ ok +│", res.stdout) and res.stderr == ""


def test_a_same_size_alteration_is_found_by_show_and_get_not_by_list(base, tmp_path):
    root, store, weights = _damaged_store(base, tmp_path)
    data = bytearray(weights.read_bytes())
    header = int.from_bytes(data[:8], "little")             # safetensors: u64 header length, header, data
    data[8 + header] ^= 0x01                                 # lowest mantissa byte of one float32: still finite
    weights.write_bytes(bytes(data))
    assert weights.stat().st_size == len(data)
    # the file really holds another adapter now: exactly one value differs
    raw, orig = Adapter.load(weights.parent), make(base, "x", 2)
    assert sum(int((raw.tensors[s][k] != orig.tensors[s][k]).sum()) for s in orig.tensors for k in orig.tensors[s]) == 1

    status = f"{WEIGHTS} was altered (its sha256 differs from the catalog's)"
    assert {r["name"]: r["status"] for r in store.list()} == {"good": "ok", "x": "ok"}   # documented: sizes only
    assert store.show("x")["status"] == status
    with pytest.raises(CorruptAdapterError) as exc:
        store.get("x")
    assert str(exc.value) == _refusal("x", status)


def test_a_missing_file_or_folder_is_reported(base, tmp_path):
    root, store, weights = _damaged_store(base, tmp_path)
    weights.unlink()
    status = f"{WEIGHTS} is missing"
    assert [r["status"] for r in store.list()] == ["ok", status] and store.show("x")["status"] == status
    folder = weights.parent
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    status = f"its folder {folder.name} is missing"
    assert [r["status"] for r in store.list()] == ["ok", status] and store.show("x")["status"] == status
    with pytest.raises(CorruptAdapterError) as exc:
        store.get("x")
    assert str(exc.value) == _refusal("x", status)


# ---------------------------------------------------------------------------- 3. non-finite tensors
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_tensor_is_refused_and_nothing_is_written(base, tmp_path, bad):
    root = tmp_path / "s"
    store = AdapterStore(root)
    v1 = make(base, "x", 1)
    store.put(v1)
    catalog = (root / "catalog.sqlite").read_bytes()
    listed, on_disk = store.list(), folders(root)

    for name, overwrite in (("x", True), ("fresh", False)):
        a = make(base, name, 2, r=2)
        site = sorted(a.tensors)[1]
        a.tensors[site]["lora_B"][3, 1] = bad
        with pytest.raises(NonFiniteError) as exc:
            store.put(a, overwrite=overwrite)
        assert str(exc.value) == (f"adapter {name!r}: tensor {site}.lora_B has 1 non-finite value(s) (NaN or inf); "
                                  "the adapter is corrupt: re-train or re-save it")

    assert (root / "catalog.sqlite").read_bytes() == catalog
    assert store.list() == listed and folders(root) == on_disk and "fresh" not in store
    assert assert_consistent(store, "x", {1: v1}) == 1


# ---------------------------------------------------------------------------- 4. router names, legacy catalogs
def test_a_router_name_is_refused(base, tmp_path):
    root = tmp_path / "s"
    store = AdapterStore(root)
    store.put(make(base, "keep", 1))
    (root / "routers" / "rt").mkdir(parents=True)
    (root / "routers" / "rt" / "router.json").write_text("{}", encoding="utf-8")
    catalog, on_disk = (root / "catalog.sqlite").read_bytes(), folders(root)
    for overwrite in (False, True):
        with pytest.raises(AdapterNameError) as exc:
            store.put(make(base, "rt", 2), overwrite=overwrite)
        assert str(exc.value) == (f"'rt' is a router in the store at {root}; adapters and routers share one model "
                                  "namespace: choose another adapter name")
    assert "rt" not in store and folders(root) == on_disk and (root / "catalog.sqlite").read_bytes() == catalog
    # a routers/ folder without router.json is not a router
    (root / "routers" / "half").mkdir()
    store.put(make(base, "half", 3))
    assert store.show("half")["status"] == "ok"


def _legacy_store(root: Path, adapters: list[Adapter]) -> None:
    """A store as adapterkit wrote it before versioned folders: adapters/<name> and the old schema."""
    (root / "adapters").mkdir(parents=True)
    with closing(sqlite3.connect(root / "catalog.sqlite")) as conn, conn:
        conn.execute(LEGACY_SCHEMA)
        for a in adapters:
            a.save(root / "adapters" / a.name)
            m = a.meta
            conn.execute("INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (a.name, a.config.type, m.base_fingerprint, m.base_name, m.task, json.dumps(m.labels),
                          json.dumps(m.metrics), json.dumps(m.lineage), json.dumps(a.ranks()),
                          a.num_parameters(), m.created))


def _columns(root: Path) -> list[str]:
    with closing(sqlite3.connect(root / "catalog.sqlite")) as conn:
        return [r[1] for r in conn.execute("PRAGMA table_info(adapters)")]


def test_a_legacy_catalog_is_migrated_and_keeps_working(base, tmp_path):
    root = tmp_path / "s"
    old1, old2, new = make(base, "old", 1), make(base, "old", 2, r=2), make(base, "other", 3)
    _legacy_store(root, [old1])
    assert "folder" not in _columns(root)

    store = AdapterStore(root)
    assert _columns(root)[-5:] == ["folder", "content", "files", "summary", "version"]
    (row,) = store.list()
    assert (row["name"], row["status"], row["path"], row["content"]) == ("old", "ok", str(root / "adapters" / "old"),
                                                                        None)
    assert (row["metrics"], row["labels"], row["ranks"]) == (old1.meta.metrics, old1.meta.labels, [4])
    assert store.show("old")["status"] == "ok"
    got = store.get("old")
    assert same_tensors(got, old1) and got.meta == old1.meta

    store.put(new)                                            # the legacy folder is not an orphan
    assert folders(root) == {"old", folder_of(store, "other")}
    assert same_tensors(store.get("old"), old1)

    store.put(old2, overwrite=True)                           # an overwrite moves it to a versioned folder
    assert folder_of(store, "old").startswith("old@")
    assert folders(root) == {folder_of(store, "old"), folder_of(store, "other")}      # adapters/old is gone
    assert assert_consistent(store, "old", {1: old1, 2: old2}) == 2
    assert [r["status"] for r in AdapterStore(root).list()] == ["ok", "ok"]            # reopening is a no-op
    assert _columns(root).count("folder") == 1


def test_a_legacy_row_is_unverified(base, tmp_path):
    """Documented: a row from before digests has no sizes to compare, so list/show say ok; get still
    fails (the safetensors reader) with a CorruptAdapterError naming the file."""
    root = tmp_path / "s"
    _legacy_store(root, [make(base, "old", 1)])
    store = AdapterStore(root)
    weights = root / "adapters" / "old" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    assert [r["status"] for r in store.list()] == ["ok"] and store.show("old")["status"] == "ok"
    with pytest.raises(CorruptAdapterError, match=f"{weights} is not a readable safetensors file"):
        store.get("old")


def test_a_legacy_folder_moved_aside_by_an_interrupted_swap_is_recovered(base, tmp_path):
    root = tmp_path / "s"
    old1 = make(base, "old", 1)
    _legacy_store(root, [old1])
    (root / "adapters" / "old").rename(root / "adapters" / ".old.old-1234abcd")
    store = AdapterStore(root)
    store.put(make(base, "other", 2))
    assert same_tensors(store.get("old"), old1)


class _PauseAt:
    """A sqlite3 connection that runs `hook` once, just before the first statement starting with `prefix`
    (or, with prefix None, when it is closed): it lets a test interleave another store at that point, as a
    second process could."""

    def __init__(self, conn, prefix, hook):
        self._conn, self._prefix, self._hook = conn, prefix, hook

    def _fire(self):
        hook, self._hook = self._hook, None
        if hook is not None:
            hook()

    def execute(self, sql, *args):
        if self._prefix is not None and sql.lstrip().startswith(self._prefix):
            self._fire()
        return self._conn.execute(sql, *args)

    def __enter__(self):
        self._conn.__enter__()
        return self

    def __exit__(self, *exc):
        return self._conn.__exit__(*exc)

    def close(self):
        self._conn.close()
        if self._prefix is None:
            self._fire()


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy-catalog", "new-store"])
def test_two_processes_opening_a_store_that_needs_the_new_columns(base, tmp_path, monkeypatch, legacy):
    """The first store pauses just before it alters the old table (a new store: before it reads the
    columns); another PROCESS opens the same store then. It must wait for the first (one migration,
    under the write lock) and then open cleanly; the old code let it add the columns first, and the
    first failed with 'duplicate column name'."""
    root = tmp_path / "s"
    if legacy:
        _legacy_store(root, [make(base, "old", 1)])
    connect, state = AdapterStore._connect, {"first": True}
    script = f"from adapterkit.store import AdapterStore; AdapterStore({str(root)!r}); print('opened')"
    other = {}

    def start_other():
        other["proc"] = subprocess.Popen([sys.executable, "-c", script], text=True, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=child_env())
        try:                                            # give it time to get ahead of us, if it can
            other["proc"].wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def paused(self):
        conn = connect(self)
        if state.pop("first", False):
            return _PauseAt(conn, "ALTER TABLE" if legacy else "PRAGMA", start_other)   # read the old columns
        return conn

    monkeypatch.setattr(AdapterStore, "_connect", paused)
    store = AdapterStore(root)
    out, err = other["proc"].communicate(timeout=60)
    assert other["proc"].returncode == 0 and out.strip() == "opened", err
    assert _columns(root).count("folder") == 1 and [r["status"] for r in store.list()] == (["ok"] if legacy else [])


# ---------------------------------------------------------------------------- 5. concurrent writers
def test_two_processes_putting_different_names(base, tmp_path):
    root = tmp_path / "s"
    store = AdapterStore(root)
    versions = {v: make(base, n, v, r=2 + v % 3) for v, n in ((1, "p"), (2, "p"), (3, "q"), (4, "q"))}
    src = {v: a.save(tmp_path / f"src{v}") for v, a in versions.items()}
    rounds = 6
    results = run_together(tmp_path, [
        {"root": root, "name": "p", "sources": [src[1 + i % 2] for i in range(rounds)]},
        {"root": root, "name": "q", "sources": [src[3 + i % 2] for i in range(rounds)]},
    ])
    puts = []
    for rc, stdout, stderr in results:
        assert rc == 0, stderr
        lines = stdout.splitlines()
        assert len(lines) == rounds and all(line.startswith("PUT ") for line in lines), stdout
        puts.append([line[4:] for line in lines])
    assert len(set(puts[0] + puts[1])) == 2 * rounds          # every put wrote its own folder

    assert [r["name"] for r in store.list()] == ["p", "q"]
    assert (folder_of(store, "p"), folder_of(store, "q")) == (puts[0][-1], puts[1][-1])
    assert assert_consistent(store, "p", versions) == 2 and assert_consistent(store, "q", versions) == 4
    assert [r["status"] for r in store.list()] == ["ok", "ok"]
    assert folders(root) == row_folders(store)                # each superseded folder was deleted by its put
    store.put(make(base, "z", 5))
    assert folders(root) == row_folders(store) and len(folders(root)) == 3


def test_two_processes_overwriting_the_same_name(base, tmp_path):
    root = tmp_path / "s"
    store = AdapterStore(root)
    versions = {v: make(base, "same", v, r=2 + v % 3) for v in (1, 2, 3, 4)}
    src = {v: a.save(tmp_path / f"src{v}") for v, a in versions.items()}
    store.put(versions[1])
    rounds = 6
    results = run_together(tmp_path, [
        {"root": root, "name": "same", "sources": [src[1 + i % 2] for i in range(rounds)]},   # ends on v2
        {"root": root, "name": "same", "sources": [src[3 + i % 2] for i in range(rounds)]},   # ends on v4
    ])
    last = []
    for rc, stdout, stderr in results:
        assert rc == 0, stderr
        lines = stdout.splitlines()
        assert len(lines) == rounds and all(line.startswith("PUT ") for line in lines), stdout
        last.append(lines[-1][4:])

    (row,) = store.list()
    assert row["status"] == "ok" and Path(row["path"]).name in last     # the last commit of one of them
    winner = assert_consistent(store, "same", versions)
    assert winner == (2 if Path(row["path"]).name == last[0] else 4)
    assert folders(root) == {folder_of(store, "same")}
    store.put(make(base, "z", 5))
    assert folders(root) == row_folders(store) and len(folders(root)) == 2


def test_get_during_an_overwrite_by_another_process(base, tmp_path, monkeypatch):
    root = tmp_path / "s"
    store = AdapterStore(root)
    v1, v2 = make(base, "x", 1), make(base, "x", 2, r=2)
    store.put(v1)
    other, load, state = AdapterStore(root), Adapter.load.__func__, {"first": True}

    def load_after_an_overwrite(cls, path, name=None, **kwargs):
        if state.pop("first", False):                   # get() has verified v1; now the other process commits v2
            other.put(v2, overwrite=True)
        return load(cls, path, name, **kwargs)

    monkeypatch.setattr(Adapter, "load", classmethod(load_after_an_overwrite))
    got = store.get("x")
    assert same_tensors(got, v1) or same_tensors(got, v2)


def test_list_during_an_overwrite_by_another_process(base, tmp_path, monkeypatch):
    root = tmp_path / "s"
    store = AdapterStore(root)
    store.put(make(base, "x", 1))
    other, connect, state = AdapterStore(root), AdapterStore._connect, {"first": True}
    v2 = make(base, "x", 2, r=2)

    def paused(self):
        conn = connect(self)
        if self is store and state.pop("first", False):   # list() has read the rows; the other process commits
            return _PauseAt(conn, None, lambda: other.put(v2, overwrite=True))
        return conn

    monkeypatch.setattr(AdapterStore, "_connect", paused)
    assert [r["status"] for r in store.list()] == ["ok"]
