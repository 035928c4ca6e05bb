"""A summary of an adapter folder, for `adapterkit adapter inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.adapter import SIDE_FILE, Adapter


def describe(path: str | Path) -> dict[str, Any]:
    """The summary of the adapter folder at `path` (ours or PEFT's; a stored adapter's folder too)."""
    path = Path(path)
    adapter = Adapter.load(path)
    config = adapter.config
    targets = config.target_modules
    # a low-rank family's rank, alpha and rsLoRA flag; every family's one-line summary
    lowrank = {"rank": adapter.ranks(), "alpha": config.alpha, "rslora": config.use_rslora} if config.type == "lora" \
        else {}
    return {
        "name": adapter.name,
        "method": config.type,
        "format": "adapterkit" if (path / SIDE_FILE).is_file() else "peft",
        "weights": "PEFT's adapter_model.safetensors" if adapter.method.peft_type and adapter.packed is None
                   else "native adapter.safetensors",
        "summary": adapter.summary(),
        # a low-bit adapter's codec; the tensors' bytes as stored (packed codes and scales where packed)
        "bits": adapter.packed.codec.bits if adapter.packed is not None else None,
        "group_size": adapter.packed.codec.group_size if adapter.packed is not None else None,
        "tensor_bytes": adapter.stored_bytes(),
        **lowrank,
        "targets": targets if isinstance(targets, str) else list(targets),
        "sites": len(adapter.sites),
        "parameters": adapter.num_parameters(),
        "base": adapter.meta.base_name,
        "base_fingerprint": adapter.meta.base_fingerprint,
        "task": adapter.meta.task,
        "path": str(path),
    }
