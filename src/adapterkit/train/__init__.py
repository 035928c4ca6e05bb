"""Training adapters over a frozen base (one method-agnostic trainer; objectives per task kind)."""

from .schedule import lr_factor

__all__ = ["lr_factor"]
