"""Adapter folder formats: the native one (every family, native.py) and PEFT's (families PEFT has,
peft.py). Which one a folder holds is told by its files."""

from __future__ import annotations

from pathlib import Path

from .native import WEIGHTS_FILE as NATIVE_WEIGHTS
from .peft import CONFIG_FILE as PEFT_CONFIG
from .peft import WEIGHTS_FILE as PEFT_WEIGHTS

SIDE_FILE = "adapterkit.json"      # adapterkit's metadata beside either format (adapter.py writes it)


def is_adapter_folder(path: Path) -> bool:
    """Cheap check (a few stats): a PEFT folder (its config and weights) or a native one (adapterkit.json
    and its weights)."""
    return ((path / PEFT_CONFIG).is_file() and (path / PEFT_WEIGHTS).is_file()) or \
        ((path / SIDE_FILE).is_file() and (path / NATIVE_WEIGHTS).is_file())


def names_an_adapter(path: Path) -> bool:
    """Whether a folder says it is an adapter (a PEFT config or adapterkit.json), however broken the rest:
    loading it then names what is wrong."""
    return (path / PEFT_CONFIG).is_file() or (path / SIDE_FILE).is_file()
