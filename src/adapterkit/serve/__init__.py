"""Serving: the adapter cache (disk -> RAM -> active slots) and, later, the engine and HTTP API."""

from .cache.adapter_cache import AdapterCache, AdapterHandle, NoFreeSlotError
from .cache.roots import AdapterPathError, AdapterRoots, Source

__all__ = ["AdapterCache", "AdapterHandle", "NoFreeSlotError", "AdapterPathError", "AdapterRoots", "Source"]
