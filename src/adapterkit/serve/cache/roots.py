"""Where served adapters come from, and the confinement of load-by-path requests.

Roots: the adapter store (names from its catalog; adapters made for another base are not listed)
and any number of `--adapters DIR` folders, where every immediate subfolder that is an
adapter folder (PEFT's format or adapterkit's native one, formats/) is served under the subfolder's
name. Discovery only lists folders and stats files: no tensor is read until the first request.

Name clashes: a name found in two roots is an error naming both folders (no precedence rule, so
no adapter is ever shadowed silently); the operator renames a folder or drops a root.

Confinement: a path given by a request (vLLM's `load_lora_adapter {lora_path}`) is served only if
its real path (every symlink resolved) lies strictly inside one of the roots, and so does every
file in the folder. `..` components are refused outright; a relative path is taken relative to
the roots. Paths outside the roots get the same answer whether or not they exist, so a request
cannot probe the file system.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ...core.adapter import validate_name
from ...errors import AdapterkitError, AdapterNameError, ConfigError
from ...formats import PEFT_CONFIG, SIDE_FILE, is_adapter_folder, names_an_adapter


class AdapterPathError(AdapterkitError, ValueError):
    """A load-by-path request for a path outside the adapter roots, or not an adapter folder. HTTP 400."""


@dataclass(frozen=True)
class Source:
    """Where one served name is read from, and which version of it (`version` changes whenever
    what is on disk does: the store's content digest and folder of the row, or a folder's stats)."""

    name: str
    path: Path     # the real (symlink-free) adapter folder
    origin: str    # "store", the root folder it was found in, or "load" (a load-by-path request)
    version: str = ""


def folder_version(path: Path) -> str:
    """A cheap identity of an adapter folder's contents: inode and mtime of the folder (a whole-folder
    swap, as atomic saves do, changes the inode) and size / mtime / inode of its files."""
    try:
        parts = [path.stat()] + [p.stat() for p in sorted(path.iterdir()) if p.is_file()]
    except OSError:
        return "missing"
    return ";".join(f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}" for st in parts)


RESERVED = "auto"      # model="auto" is the store's default router, never an adapter


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(path))


def _valid(name: str) -> bool:
    try:
        validate_name(name)
    except AdapterNameError:
        return False
    return True


class AdapterRoots:
    def __init__(self, store: Any = None, dirs: Iterable[str | os.PathLike] = (),
                 fingerprint: str | None = None) -> None:
        """store: an AdapterStore or None; dirs: `--adapters` folders; fingerprint: the served base's
        (store adapters recorded for another base are left out of `scan`)."""
        self.store = store
        self.fingerprint = fingerprint
        self.dirs: list[Path] = []
        for d in dirs:
            real = _real(d)
            if not real.is_dir():
                raise ConfigError(f"adapter root {d} is not a folder; pass an existing folder to --adapters")
            if real not in self.dirs:
                self.dirs.append(real)
        # Every root as given (absolute) and as resolved: a path lexically inside one of them whose
        # real path is outside is a symlink out.
        self.allowed: list[Path] = ([_real(store.root / "adapters")] if store is not None else []) + self.dirs
        self._lexical = ([Path(os.path.abspath(store.root / "adapters"))] if store is not None else []) + \
            [Path(os.path.abspath(d)) for d in dirs]
        self.skipped: dict[str, str] = {}   # name -> why it is not served (startup banner, 404 text)
        self._marks: dict[str, Any] = {}     # store adapter -> catalog change mark when last verified

    # ------------------------------------------------------------------ discovery
    def scan(self) -> dict[str, Source]:
        """Every served name -> Source. Raises AdapterNameError when a name is in two roots."""
        found: dict[str, Source] = {}
        self.skipped = {}
        if self.store is not None:
            for row in self.store.list():
                src = self._store_candidate(row)
                if src is not None:
                    _add(found, src)
        for root in self.dirs:
            for entry in sorted(os.scandir(root), key=lambda e: e.name):
                src = self._candidate(root, entry.name)
                if src is not None:
                    _add(found, src)
        return found

    def find(self, name: str) -> Source | None:
        """Look one name up in every root (lazy discovery of a folder added after startup)."""
        if not _valid(name):
            return None
        found: dict[str, Source] = {}
        row = self.store.row(name) if self.store is not None else None
        if row is not None:
            src = self._store_candidate(row)
            if src is not None:
                _add(found, src)
        for root in self.dirs:
            if os.path.lexists(root / name):
                src = self._candidate(root, name)
                if src is not None:
                    _add(found, src)
        return found.get(name)

    def _store_candidate(self, row: dict[str, Any]) -> Source | None:
        fp = row.get("base_fingerprint")
        if fp and self.fingerprint and fp != self.fingerprint:
            self.skipped[row["name"]] = f"a store adapter made for another base: {row.get('base_name')} ({fp})"
            return None
        return Source(row["name"], _real(row["path"]), "store", f"{row.get('content')}:{Path(row['path']).name}")

    def _candidate(self, root: Path, name: str) -> Source | None:
        path = root / name
        if not path.is_dir() or not is_adapter_folder(path):
            return None                       # any other file or folder in a root is not ours to judge
        if not _valid(name):
            self.skipped[name] = f"{path}: the folder name is not a valid adapter name"
            return None
        if name == RESERVED:
            self.skipped[name] = f"{path}: {RESERVED!r} is reserved for the default router; rename the folder"
            return None
        real = _real(path)
        if self._root_of(real) is None:
            self.skipped[name] = f"{path} links outside the adapter roots"
            return None
        return Source(name, real, str(root), folder_version(real))

    def current(self, src: Source) -> Source | None:
        """`src` itself if its name still maps to that version, the Source of the new version if the
        adapter was replaced on disk, None if it is gone. Cheap: the store's catalog is looked up
        only when its change mark moved (one 4-byte read); folders cost a few stats."""
        if src.origin == "load":
            version = folder_version(src.path)
            if version == src.version:
                return src
            return None if version == "missing" else Source(src.name, src.path, "load", version)
        if src.origin == "store":
            mark = self.store.change_mark()
            if self._marks.get(src.name) == mark:
                return src
            now = self.find(src.name)
            if now is not None:
                self._marks[now.name] = mark     # read before the lookup: a later commit moves it again
        else:
            now = self._candidate(Path(src.origin), src.name)
        return src if now == src else now

    # ------------------------------------------------------------------ confinement
    def _root_of(self, real: Path) -> Path | None:
        """The root strictly containing `real` (a resolved path), or None."""
        for root in self.allowed:
            if real != root and real.is_relative_to(root):
                return root
        return None

    def resolve(self, path: str | os.PathLike) -> Path:
        """The real adapter folder a load-by-path request names, or AdapterPathError."""
        raw = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
        if not isinstance(raw, str) or not raw or "\x00" in raw:
            raise AdapterPathError(f"adapter path {raw!r} is empty or malformed")
        try:
            return self._resolve(raw)
        except OSError as exc:                    # a name over the file system's limit, a loop, no access
            shown = raw if len(raw) <= 80 else raw[:77] + "..."
            raise AdapterPathError(f"adapter path {shown!r} cannot be used ({exc.strerror or type(exc).__name__}); "
                                   "give a folder inside the adapter roots") from None

    def _resolve(self, raw: str) -> Path:
        given = Path(raw)
        if ".." in given.parts:
            raise AdapterPathError(f"adapter path {raw!r} contains '..'; give a folder inside the adapter roots")
        if given.is_absolute():
            lexical = Path(os.path.abspath(given))
        else:
            # Relative to the roots, in order (store first); the first where it exists wins.
            tries = [root / given for root in self._lexical]
            lexical = next((t for t in tries if os.path.lexists(t)), tries[0] if tries else given)
        real = _real(lexical)
        if self._root_of(real) is None:
            if any(lexical != r and lexical.is_relative_to(r) for r in self._lexical + self.allowed):
                raise AdapterPathError(f"adapter path {raw!r} is a symlink out of the adapter roots; "
                                       "copy the adapter into a root instead")
            raise AdapterPathError(f"adapter path {raw!r} is outside the adapter roots "
                                   f"({', '.join(map(str, self.allowed)) or 'none configured'})")
        if not real.exists():
            raise AdapterPathError(f"adapter path {raw!r} does not exist")
        if not real.is_dir():
            raise AdapterPathError(f"adapter path {raw!r} is a file, not an adapter folder")
        self.check_folder(real)
        if not names_an_adapter(real):
            raise AdapterPathError(f"adapter path {raw!r} is not an adapter folder (no {PEFT_CONFIG} or {SIDE_FILE})")
        return real

    def check_folder(self, folder: Path) -> None:
        """Every file of an adapter folder must resolve inside the roots (a weights file that is a
        symlink to /etc/... is refused before anything reads it)."""
        for entry in folder.iterdir():
            if self._root_of(_real(entry)) is None:
                raise AdapterPathError(f"{entry.name} in adapter folder {folder.name!r} links outside the "
                                       "adapter roots; copy the file into the folder instead")


def _add(found: dict[str, Source], src: Source) -> None:
    other = found.get(src.name)
    if other is not None and other.path != src.path:
        raise AdapterNameError(
            f"adapter name {src.name!r} is in two roots: {other.path} and {src.path}; "
            "rename one of the folders or drop one root"
        )
    found[src.name] = src
