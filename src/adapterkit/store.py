"""The adapter store: one folder per adapter plus a SQLite catalog.

    <root>/adapters/<name>/    the adapter (a PEFT folder + adapterkit.json), written atomically
    <root>/catalog.sqlite      name, method, base fingerprint, task, labels, metrics, created, lineage

The folder is written (atomically) before its catalog row, inside one catalog transaction, so the
catalog never names a half-written adapter; a folder without a row (a crash between the two) is
invisible and the next put overwrites it.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

from .adapter import Adapter, validate_name
from .base import adapterkit_home
from .errors import AdapterNameError, AdapterNotFoundError

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
    ranks TEXT NOT NULL,       -- JSON list
    parameters INTEGER NOT NULL,
    created TEXT NOT NULL
)
"""
_COLUMNS = ("name", "method", "base_fingerprint", "base_name", "task", "labels", "metrics", "lineage",
            "ranks", "parameters", "created")
_JSON = {"labels", "metrics", "lineage", "ranks"}


class AdapterStore:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else adapterkit_home() / "store"
        (self.root / "adapters").mkdir(parents=True, exist_ok=True)
        self._db = self.root / "catalog.sqlite"
        with closing(self._connect()) as conn, conn:
            conn.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._db, timeout=30)
        conn.row_factory = sqlite3.Row
        return conn

    def path(self, name: str) -> Path:
        return self.root / "adapters" / validate_name(name)

    def __contains__(self, name: str) -> bool:
        with closing(self._connect()) as conn:
            return conn.execute("SELECT 1 FROM adapters WHERE name = ?", (name,)).fetchone() is not None

    def check_free(self, name: str, overwrite: bool = False, conn: sqlite3.Connection | None = None) -> None:
        """Raise if `name` is stored and overwrite is off (callers check before long work)."""
        if overwrite:
            return
        if conn is None:
            taken = name in self
        else:
            taken = conn.execute("SELECT 1 FROM adapters WHERE name = ?", (name,)).fetchone() is not None
        if taken:
            raise AdapterNameError(
                f"an adapter named {name!r} is already in the store at {self.root}; "
                "choose another name or pass --overwrite to replace it"
            )

    def put(self, adapter: Adapter, *, overwrite: bool = False) -> Path:
        """Save `adapter` under its name; refuses an existing name unless overwrite."""
        name = validate_name(adapter.name)
        with closing(self._connect()) as conn, conn:
            conn.execute("BEGIN IMMEDIATE")          # one writer at a time, checked and written together
            self.check_free(name, overwrite, conn)
            path = adapter.save(self.path(name))
            meta = adapter.meta
            row = (name, adapter.config.type, meta.base_fingerprint, meta.base_name, meta.task,
                   json.dumps(meta.labels), json.dumps(meta.metrics), json.dumps(meta.lineage),
                   json.dumps(adapter.ranks()), adapter.num_parameters(), meta.created)
            conn.execute(f"INSERT OR REPLACE INTO adapters ({', '.join(_COLUMNS)}) "
                         f"VALUES ({', '.join('?' * len(_COLUMNS))})", row)
        return path

    def get(self, name: str) -> Adapter:
        self.show(name)                              # raises a clear error for an unknown name
        return Adapter.load(self.path(name), name=name)

    def list(self) -> list[dict[str, Any]]:
        with closing(self._connect()) as conn:
            return [self._row(r) for r in conn.execute("SELECT * FROM adapters ORDER BY name")]

    def show(self, name: str) -> dict[str, Any]:
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT * FROM adapters WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = [r["name"] for r in self.list()]
            shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "") if known else "the store is empty"
            raise AdapterNotFoundError(f"no adapter named {name!r} in the store at {self.root}; stored: {shown}")
        return {**self._row(row), "path": str(self.path(name))}

    def remove(self, name: str) -> None:
        import shutil

        self.show(name)
        with closing(self._connect()) as conn, conn:
            conn.execute("DELETE FROM adapters WHERE name = ?", (name,))
        shutil.rmtree(self.path(name), ignore_errors=True)

    @staticmethod
    def _row(row: sqlite3.Row) -> dict[str, Any]:
        return {k: (json.loads(row[k]) if k in _JSON else row[k]) for k in _COLUMNS}
