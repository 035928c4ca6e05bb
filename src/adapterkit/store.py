"""The adapter store: one folder per adapter version plus a SQLite catalog.

    <root>/adapters/<name>@<id>/   one version of an adapter (a PEFT folder + adapterkit.json);
                                   written once, never changed; <id> is random per put
    <root>/catalog.sqlite          name -> its folder, content digest, file sizes and digests, method,
                                   base fingerprint, task, labels, metrics, created, lineage

The catalog row names its folder, so a row and its files change together in one SQLite commit:
put() writes the new version's folder first (invisible: no row names it), then replaces the row,
then deletes the superseded folder. A crash before the commit leaves the old row and the old
folder (the new folder is an orphan the next put deletes); after it, the new pair. Rows of
stores made before versioned folders name `adapters/<name>` and keep working.

`show` re-hashes the files against the catalog and `list` compares sizes, so a truncated or
altered weights file is reported (status) instead of trusted; `get` refuses a damaged adapter.

Versions. Every put of a name makes a version: the first is NAME@v1 and is promoted; putting the
name again stores NAME@v2, NAME@v3 ... beside it, NOT promoted: the bare NAME (the `adapters` row)
stays an alias of the promoted version until `promote(NAME@vN)` switches it in one commit (readers
that resolve NAME then see a replaced adapter, as the serving cache and routers already handle).
`rollback(NAME)` promotes the version promoted before. put(..., overwrite=True) keeps its old
meaning for users who want no history: the promoted version is replaced in place. The `versions`
table holds one row per version (the same columns, plus its number and the comparison with the
version promoted when it was compared); `promotions` the order of promotions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import uuid
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ._atomic import recover_dir
from .core.adapter import Adapter, validate_name
from .core.base import adapterkit_home
from .errors import AdapterNameError, AdapterNotFoundError, CorruptAdapterError

# Added with versioned folders (ALTER TABLE on older catalogs; NULL there = adapters/<name>, unverified).
_ADDED = {"folder": "TEXT", "content": "TEXT", "files": "TEXT", "summary": "TEXT", "version": "INTEGER"}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    base_fingerprint TEXT,
    base_name TEXT,
    task TEXT,
    labels TEXT NOT NULL,      -- JSON list
    metrics TEXT NOT NULL,     -- JSON object
    lineage TEXT NOT NULL,     -- JSON list of {op, inputs, params}
    ranks TEXT NOT NULL,       -- JSON list: ranks of a low-rank family, else []
    parameters INTEGER NOT NULL,
    created TEXT NOT NULL,
    folder TEXT,               -- relative to the root (NULL: adapters/<name>, a store made before versions)
    content TEXT,              -- digest of the version's files
    files TEXT,                -- JSON {file: [size, sha256]}
    summary TEXT               -- the family's one line, e.g. "lora r=8 alpha=16" (NULL: stored before it)
)
"""
_VERSIONS = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL, method TEXT NOT NULL, base_fingerprint TEXT, base_name TEXT, task TEXT,
    labels TEXT NOT NULL, metrics TEXT NOT NULL, lineage TEXT NOT NULL, ranks TEXT NOT NULL,
    parameters INTEGER NOT NULL, created TEXT NOT NULL, folder TEXT, content TEXT, files TEXT, summary TEXT,
    version INTEGER NOT NULL,
    compare TEXT,              -- JSON: `adapterkit compare` of this version against the promoted one
    PRIMARY KEY (name, version)
)
"""
_PROMOTIONS = """
CREATE TABLE IF NOT EXISTS promotions (
    name TEXT NOT NULL, seq INTEGER NOT NULL, version INTEGER NOT NULL, at TEXT NOT NULL,
    PRIMARY KEY (name, seq)
)
"""
_SETTINGS = "CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)"  # values are JSON
_REF = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})@v(?P<version>[1-9][0-9]{0,8})$")
_TRIES = 5                     # reads that race a concurrent overwrite retry with the new row
_COLUMNS = ("name", "method", "base_fingerprint", "base_name", "task", "labels", "metrics", "lineage",
            "ranks", "parameters", "created", *_ADDED)          # "version": the promoted version's number
_JSON = {"labels", "metrics", "lineage", "ranks", "files"}
OK = "ok"


class AdapterStore:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else adapterkit_home() / "store"
        (self.root / "adapters").mkdir(parents=True, exist_ok=True)
        self._db = self.root / "catalog.sqlite"
        with closing(self._connect()) as conn, conn:
            conn.execute("BEGIN IMMEDIATE")          # two processes opening an old store migrate it once
            conn.execute(_SCHEMA)
            have = {r["name"] for r in conn.execute("PRAGMA table_info(adapters)")}
            for column, kind in _ADDED.items():
                if column not in have:
                    conn.execute(f"ALTER TABLE adapters ADD COLUMN {column} {kind}")
            for r in conn.execute("SELECT name FROM adapters WHERE folder IS NULL"):
                recover_dir(self.root / "adapters" / r["name"])   # an old-style swap cut by a crash
            conn.execute(_VERSIONS)
            conn.execute(_PROMOTIONS)
            conn.execute(_SETTINGS)
            # a store from before versions: each adapter becomes its own promoted v1
            for r in conn.execute("SELECT * FROM adapters WHERE version IS NULL").fetchall():
                conn.execute("UPDATE adapters SET version = 1 WHERE name = ?", (r["name"],))
                self._insert_version(conn, {**dict(r), "version": 1})
                conn.execute("INSERT OR REPLACE INTO promotions VALUES (?, 1, 1, ?)", (r["name"], r["created"]))

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._db, timeout=30)
        conn.row_factory = sqlite3.Row
        return conn

    def _fetch(self, ref: str, conn: sqlite3.Connection | None = None) -> sqlite3.Row | None:
        """The row of NAME (its promoted version) or of NAME@vN (that version)."""
        name, version = parse_ref(ref)
        sql, args = (("SELECT * FROM adapters WHERE name = ?", (name,)) if version is None else
                     ("SELECT * FROM versions WHERE name = ? AND version = ?", (name, version)))
        if conn is None:
            with closing(self._connect()) as own:
                return own.execute(sql, args).fetchone()
        return conn.execute(sql, args).fetchone()

    def path(self, name: str) -> Path:
        """The folder of the stored version of `name` (NAME: the promoted one, which changes when it is
        replaced or another is promoted; NAME@vN: that version)."""
        row = self._fetch(name)
        if row is None:
            self._missing(name)
        return self._folder(row)

    def _folder(self, row: Any) -> Path:
        return self.root / (row["folder"] or f"adapters/{row['name']}")

    def change_mark(self) -> tuple[int, bytes]:
        """Changes with every commit to the catalog: SQLite's file change counter (4 bytes at offset
        24 of the database header, bumped by each write transaction in rollback-journal mode) and
        the file's inode. One small read: cheap enough to call per request."""
        with open(self._db, "rb") as fh:
            fh.seek(24)
            return os.fstat(fh.fileno()).st_ino, fh.read(4)

    def row(self, name: str) -> dict[str, Any] | None:
        """The catalog row of `name` with its folder (`path`), or None; no file is checked."""
        if name not in self:
            return None
        row = self._fetch(name)
        return None if row is None else {**self._row(row), "path": str(self._folder(row))}

    def __contains__(self, name: str) -> bool:
        try:
            return self._fetch(name) is not None
        except AdapterNameError:                        # not a name (a folder path, say): not stored
            return False

    def check_free(self, name: str, overwrite: bool = False, conn: sqlite3.Connection | None = None) -> None:
        """Raise if `name` is a router's or reserved (callers check before long work). A stored name is free:
        putting it again stores its next version (or, with overwrite, replaces the promoted one)."""
        from .route.common import AUTO, ROUTER_JSON, router_path

        if name == AUTO:
            raise AdapterNameError(f"{AUTO!r} is reserved for the default router (model=\"auto\"); choose another "
                                   "adapter name")
        if (router_path(self, name) / ROUTER_JSON).is_file():
            raise AdapterNameError(f"{name!r} is a router in the store at {self.root}; adapters and routers share "
                                   "one model namespace: choose another adapter name")


    def put(self, adapter: Adapter, *, overwrite: bool = False) -> Path:
        """Save `adapter` under its name (put_version says which version it became); the folder."""
        return self.put_version(adapter, overwrite=overwrite).path

    def put_version(self, adapter: Adapter, *, overwrite: bool = False) -> "Stored":
        """Save `adapter` as a new version of its name: v1 (promoted) for a new name, else the next
        version, not promoted; overwrite: replace the promoted version in place (no history). Refuses
        tensors with NaN / inf. The old version stays whole until the new one is committed."""
        name = validate_name(adapter.name)
        adapter.check_finite()
        with closing(self._connect()) as conn:
            with conn:
                conn.execute("BEGIN IMMEDIATE")      # one writer at a time: check, write, commit together
                self.check_free(name, overwrite, conn)
                self._collect_orphans(conn)
                old = self._fetch(name, conn)
                folder = f"adapters/{name}@{uuid.uuid4().hex[:12]}"
                path = adapter.save(self.root / folder)
                try:
                    files = _digests(path)
                    meta = adapter.meta
                    row = dict(zip(_COLUMNS, (
                        name, adapter.config.type, meta.base_fingerprint, meta.base_name, meta.task,
                        json.dumps(meta.labels), json.dumps(meta.metrics), json.dumps(meta.lineage),
                        json.dumps(adapter.ranks()), adapter.num_parameters(), meta.created,
                        folder, _content(files), json.dumps(files), adapter.summary(), None)))
                    if old is None or overwrite:     # a new name, or the promoted version replaced in place
                        version = 1 if old is None else (old["version"] or 1)
                        row["version"] = version
                        conn.execute(f"INSERT OR REPLACE INTO adapters ({', '.join(_COLUMNS)}) "
                                     f"VALUES ({', '.join('?' * len(_COLUMNS))})", tuple(row.values()))
                        if old is None:
                            conn.execute("DELETE FROM versions WHERE name = ?", (name,))   # leftovers of a remove
                            conn.execute("DELETE FROM promotions WHERE name = ?", (name,))
                            conn.execute("INSERT INTO promotions VALUES (?, 1, 1, ?)", (name, _now()))
                    else:                            # the next version, beside the promoted one
                        version = 1 + conn.execute("SELECT MAX(version) FROM versions WHERE name = ?",
                                                   (name,)).fetchone()[0]
                        row["version"] = version
                    self._insert_version(conn, row)
                except BaseException:
                    shutil.rmtree(path, ignore_errors=True)
                    raise
            if old is not None and overwrite and self._folder(old) != path:   # committed: the old version goes
                shutil.rmtree(self._folder(old), ignore_errors=True)
        return Stored(name, version, path, old is None or overwrite)

    @staticmethod
    def _insert_version(conn: sqlite3.Connection, row: dict[str, Any]) -> None:
        cols = [*_COLUMNS, "compare"]
        conn.execute(f"INSERT OR REPLACE INTO versions ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                     tuple(row.get(c) for c in cols))

    def _collect_orphans(self, conn: sqlite3.Connection) -> None:
        """Delete folders no row names (a put or remove interrupted by a crash). Runs under the
        write lock, so no other put is writing one."""
        named = {self._folder(r).name for table in ("adapters", "versions")
                 for r in conn.execute(f"SELECT name, folder FROM {table}")}
        for entry in (self.root / "adapters").iterdir():
            if entry.name not in named:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def _stable(self, name: str, read: Any) -> Any:
        """read(row) on the current row of `name`. A concurrent overwrite deletes the folder being
        read: when read fails (or finds damage) and the row has moved on meanwhile, read the new one."""
        for attempt in range(_TRIES):
            row = self._fetch(name)
            if row is None:
                self._missing(name)
            try:
                return read(row)
            except (CorruptAdapterError, OSError):
                again = self._fetch(name)
                if attempt == _TRIES - 1 or again is None or again["folder"] == row["folder"]:
                    raise

    def get(self, name: str) -> Adapter:
        """The stored adapter (NAME: its promoted version; NAME@vN: that version, named NAME);
        CorruptAdapterError if its files no longer match the catalog, StaleSourceError
        for a composition whose source adapter was replaced or deleted since."""
        def read(row: Any) -> Adapter:
            status = self._status(row, hash_files=True)
            if status != OK:
                raise CorruptAdapterError(f"stored adapter {name!r} is damaged: {status}; re-train or re-merge it "
                                          "with --overwrite, or remove it")
            return Adapter.load(self._folder(row), name=parse_ref(name)[0])
        adapter = self._stable(name, read)
        from .train.compose import check_sources

        check_sources(adapter, self)        # a composition whose source was replaced or deleted: refused
        return adapter

    def list(self) -> list[dict[str, Any]]:
        """Every row with its folder (`path`) and `status` from a size check of its files (stats only)."""
        with closing(self._connect()) as conn:
            rows = list(conn.execute("SELECT * FROM adapters ORDER BY name"))
            counts = dict(conn.execute("SELECT name, COUNT(*) FROM versions GROUP BY name").fetchall())
        out = []
        for r in rows:
            status = self._status(r, hash_files=False)
            if status != OK:                             # overwritten since we read the rows?
                now = self._fetch(r["name"])
                if now is not None and now["folder"] != r["folder"]:
                    r, status = now, self._status(now, hash_files=False)
            out.append({**self._row(r), "versions": counts.get(r["name"], 1), "path": str(self._folder(r)),
                        "status": status})
        return out

    def show(self, name: str) -> dict[str, Any]:
        """One row, its folder and `status`: "ok", or what differs from the catalog (files re-hashed)."""
        def read(row: Any) -> dict[str, Any]:
            status = self._status(row, hash_files=True)
            if status != OK:
                raise _Damaged(row, status)
            return {**self._row(row), "path": str(self._folder(row)), "status": status}
        try:
            return self._stable(name, read)
        except _Damaged as d:
            return {**self._row(d.row), "path": str(self._folder(d.row)), "status": d.status}

    def _missing(self, ref: str) -> None:
        name, version = parse_ref(ref)
        with closing(self._connect()) as conn:
            known = [r["name"] for r in conn.execute("SELECT name FROM adapters ORDER BY name")]
            have = [r["version"] for r in conn.execute("SELECT version FROM versions WHERE name = ? ORDER BY version",
                                                       (name,))]
        if version is not None and have:
            raise AdapterNotFoundError(f"adapter {name!r} has no version {version}; its versions: "
                                       + ", ".join(f"v{v}" for v in have) + " (`adapterkit versions NAME`)")
        shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "") if known else "the store is empty"
        raise AdapterNotFoundError(f"no adapter named {name!r} in the store at {self.root}; stored: {shown}")

    def remove(self, ref: str) -> None:
        """Remove NAME with all its versions, or one version NAME@vN that is not the promoted one."""
        name, version = parse_ref(ref)
        with closing(self._connect()) as conn:
            with conn:
                conn.execute("BEGIN IMMEDIATE")          # not between another put's write and commit
                row = self._fetch(ref, conn)
                if row is None:
                    self._missing(ref)
                if version is None:
                    rows = conn.execute("SELECT * FROM versions WHERE name = ?", (name,)).fetchall() or [row]
                    for table in ("adapters", "versions", "promotions"):
                        conn.execute(f"DELETE FROM {table} WHERE name = ?", (name,))
                else:
                    promoted = self._fetch(name, conn)
                    if promoted is not None and promoted["version"] == version:
                        raise AdapterNameError(f"{ref} is the promoted version of {name!r}: promote another version "
                                               f"first, or remove {name!r} with all its versions")
                    rows = [row]
                    conn.execute("DELETE FROM versions WHERE name = ? AND version = ?", (name, version))
            for r in rows:
                shutil.rmtree(self._folder(r), ignore_errors=True)

    def versions(self, name: str) -> list[dict[str, Any]]:
        """Every version of `name`, oldest first: its row, `promoted` (the one NAME resolves to) and
        `compare` (its comparison with the version promoted when it was compared, or None)."""
        validate_name(name)
        with closing(self._connect()) as conn:
            rows = conn.execute("SELECT * FROM versions WHERE name = ? ORDER BY version", (name,)).fetchall()
            promoted = self._fetch(name, conn)
        if not rows:
            self._missing(name)
        return [{**self._row(r), "version": r["version"], "ref": f"{name}@v{r['version']}",
                 "promoted": promoted is not None and promoted["version"] == r["version"],
                 "compare": json.loads(r["compare"]) if r["compare"] else None, "path": str(self._folder(r))}
                for r in rows]

    def promote(self, ref: str) -> int:
        """Make NAME resolve to NAME@vN (one commit); returns the version promoted before."""
        name, version = parse_ref(ref)
        if version is None:
            raise AdapterNameError(f"promote names a version, NAME@vN (e.g. {name}@v2); `adapterkit versions "
                                   f"{name}` lists them")
        with closing(self._connect()) as conn:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                row = self._fetch(ref, conn)
                if row is None:
                    self._missing(ref)
                before = self._fetch(name, conn)
                self._switch(conn, row)
                seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM promotions WHERE name = ?", (name,)).fetchone()[0]
                conn.execute("INSERT INTO promotions VALUES (?, ?, ?, ?)", (name, seq + 1, version, _now()))
        return before["version"] if before is not None else 0

    def rollback(self, name: str) -> int:
        """Promote again the version promoted before the current one; returns it."""
        validate_name(name)
        with closing(self._connect()) as conn:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                history = conn.execute("SELECT seq, version FROM promotions WHERE name = ? ORDER BY seq",
                                       (name,)).fetchall()
                live = {r["version"] for r in conn.execute("SELECT version FROM versions WHERE name = ?", (name,))}
                if not live:
                    self._missing(name)
                current = self._fetch(name, conn)["version"]
                earlier = [h for h in history[:-1] if h["version"] in live and h["version"] != current]
                if not earlier:
                    raise AdapterNameError(f"{name!r} has no earlier promoted version to roll back to (v{current} "
                                           "is the first); `adapterkit versions` lists its versions")
                back = earlier[-1]
                self._switch(conn, self._fetch(f"{name}@v{back['version']}", conn))
                conn.execute("DELETE FROM promotions WHERE name = ? AND seq > ?", (name, back["seq"]))
        return back["version"]

    def set_compare(self, ref: str, numbers: dict[str, Any]) -> None:
        """Store a comparison with the version `ref` (NAME@vN)."""
        name, version = parse_ref(ref)
        with closing(self._connect()) as conn, conn:
            if not conn.execute("UPDATE versions SET compare = ? WHERE name = ? AND version = ?",
                                (json.dumps(numbers), name, version)).rowcount:
                self._missing(ref)

    def setting(self, key: str, default: Any = None) -> Any:
        """A store-wide setting (e.g. "promotion_gate"), JSON."""
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row is not None else default

    def set_setting(self, key: str, value: Any) -> None:
        """Set (None: clear) a store-wide setting."""
        with closing(self._connect()) as conn, conn:
            if value is None:
                conn.execute("DELETE FROM settings WHERE key = ?", (key,))
            else:
                conn.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, json.dumps(value)))

    @staticmethod
    def _switch(conn: sqlite3.Connection, version_row: sqlite3.Row) -> None:
        """The adapters row (the alias NAME) becomes a copy of `version_row`."""
        conn.execute(f"INSERT OR REPLACE INTO adapters ({', '.join(_COLUMNS)}) "
                     f"VALUES ({', '.join('?' * len(_COLUMNS))})", tuple(version_row[c] for c in _COLUMNS))

    def _status(self, row: Any, hash_files: bool) -> str:
        folder = self._folder(row)
        if not folder.is_dir():
            return f"its folder {folder.name} is missing"
        recorded = json.loads(row["files"]) if row["files"] else None
        if recorded is None:
            return OK                                   # a row from before digests were kept
        problems = []
        for file, (size, digest) in sorted(recorded.items()):
            p = folder / file
            try:
                have = p.stat().st_size if p.is_file() else None
                if have is None:
                    problems.append(f"{file} is missing")
                elif have != size:
                    problems.append(f"{file} has {have} bytes, the catalog recorded {size}")
                elif hash_files and _sha256(p) != digest:
                    problems.append(f"{file} was altered (its sha256 differs from the catalog's)")
            except OSError:                              # deleted while we looked (a concurrent overwrite)
                problems.append(f"{file} is missing")
        return "; ".join(problems) or OK

    @staticmethod
    def _row(row: sqlite3.Row) -> dict[str, Any]:
        out = {k: (json.loads(row[k]) if k in _JSON and row[k] is not None else row[k]) for k in _COLUMNS}
        # bytes on disk (weights, config, head; a low-bit adapter's packed size); None: stored before digests
        out["bytes"] = sum(size for size, _ in out["files"].values()) if out["files"] else None
        del out["folder"], out["files"]                 # layout details; `path` and `status` say it
        return out


@dataclass(frozen=True)
class Stored:
    """What a put made: NAME@v`version` in `path`, and whether NAME now resolves to it."""

    name: str
    version: int
    path: Path
    promoted: bool

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"


def parse_ref(ref: str) -> tuple[str, int | None]:
    """"sent" -> ("sent", None); "sent@v2" -> ("sent", 2); anything else: AdapterNameError."""
    m = _REF.match(ref) if isinstance(ref, str) else None
    if m:
        return m["name"], int(m["version"])
    if isinstance(ref, str) and "@" in ref:
        raise AdapterNameError(f"{ref!r} is not NAME or NAME@vN (a version number from 1, e.g. sent@v2)")
    return validate_name(ref), None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Damaged(CorruptAdapterError):
    """show(): the row's files differ from it (retried if the row moved on meanwhile)."""

    def __init__(self, row: Any, status: str) -> None:
        super().__init__(status)
        self.row, self.status = row, status


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digests(folder: Path) -> dict[str, list[Any]]:
    """{file name: [size, sha256]} of every file of an adapter folder."""
    return {p.name: [p.stat().st_size, _sha256(p)] for p in sorted(folder.iterdir()) if p.is_file()}


def _content(files: dict[str, list[Any]]) -> str:
    """One digest of a version's files: the stored adapter's content fingerprint."""
    h = hashlib.sha256(json.dumps(sorted((k, v[1]) for k, v in files.items())).encode())
    return "sha256:" + h.hexdigest()[:16]
