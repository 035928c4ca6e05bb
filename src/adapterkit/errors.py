"""Typed errors. Every message names the problem and the fix; the server maps types to HTTP codes."""

from __future__ import annotations


class AdapterkitError(Exception):
    """Base of every error adapterkit raises on purpose."""


class ConfigError(AdapterkitError, ValueError):
    """A config value is invalid (rank 0, negative alpha, unknown field...)."""


class UnsupportedError(AdapterkitError, ValueError):
    """The input asks for something adapterkit does not implement (a PEFT method, DoRA...)."""


class AdapterNotFoundError(AdapterkitError, KeyError):
    """An adapter name that is not attached / not stored. HTTP 404."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdapterNameError(AdapterkitError, ValueError):
    """A malformed adapter name, or one that clashes with an attached adapter."""


class BaseMismatchError(AdapterkitError, ValueError):
    """An adapter made for another base model (fingerprint or tensor shapes differ)."""


class CorruptAdapterError(AdapterkitError, ValueError):
    """An adapter file that cannot be read: truncated, not safetensors, missing tensors."""


class NonFiniteError(CorruptAdapterError):
    """Adapter tensors (or their ΔW) that hold NaN or inf, or overflow the dtype they run in."""


class TargetError(AdapterkitError, ValueError):
    """target_modules that match nothing in the base model."""


class BaseNotAvailableError(AdapterkitError, RuntimeError):
    """A built-in base whose asset package is not installed (the message has the pip command)."""


class StaleSourceError(AdapterkitError, ValueError):
    """A composition whose source adapter was replaced or deleted in the store since it was composed."""
