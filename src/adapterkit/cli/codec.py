"""`adapterkit adapter quantize` and `adapter export-peft`: how an adapter is stored (main.py registers them)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import ADAPTER_HELP, STORE_OPT, fail, load_adapter, open_store, out, print_record
from ..errors import AdapterkitError


def quantize_cmd(
    adapter: str = typer.Argument(..., help=f"ADAPTER: {ADAPTER_HELP}."),
    bits: int = typer.Option(..., "--bits", help="1, 2, 4 or 8 bits per value (1: sign x the group's scale)."),
    name: str = typer.Option(..., "--name", help="Name of the quantized adapter in the store."),
    group_size: int = typer.Option(64, "--group-size", help="Values per scale (a multiple of 8)."),
    store: Optional[Path] = STORE_OPT,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a stored adapter of the same name."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Store a low-bit copy of an adapter (post-training quantization): its float matrices packed at
    --bits with one float16 scale per --group-size values; vectors (biases, IA3 factors) and the task
    head stay float. `train --bits` trains at the low precision instead (quantization-aware), which
    keeps more accuracy at 1-2 bits."""
    from ..codecs import LowBit, quantize
    from ..merge.common import content_fingerprint

    try:
        codec = LowBit(bits, group_size)
        st = open_store(store)
        st.check_free(name, overwrite)
        src = load_adapter(adapter, store)
        q = quantize(src, codec, name)
        errors = [float((q.tensors[s][k] - src.tensors[s][k].float()).norm() / src.tensors[s][k].float().norm())
                  for s, k, _ in q.packed.layout if float(src.tensors[s][k].float().norm()) > 0]
        report = {"name": name, "source": src.name, "bits": bits, "group_size": group_size,
                  "summary": q.summary(), "bytes_before": src.stored_bytes(), "bytes_after": q.stored_bytes(),
                  "smaller": round(src.stored_bytes() / q.stored_bytes(), 2),
                  "tensors_packed": len(q.packed.layout),
                  "relative_error_mean": round(sum(errors) / len(errors), 5) if errors else 0.0,
                  "relative_error_max": round(max(errors), 5) if errors else 0.0}
        q.meta.lineage = [{"op": "quantize", "inputs": [{"name": src.name, "content": content_fingerprint(src)}],
                           "params": {"bits": bits, "group_size": group_size},
                           "relative_error_mean": report["relative_error_mean"]}]
        q.meta.metrics = {}                      # the source's scores are not the quantized adapter's
        stored = st.put_version(q, overwrite=overwrite)
    except AdapterkitError as exc:
        fail(exc)
    if as_json:
        print_record({**report, "version": stored.version, "promoted": stored.promoted, "path": str(stored.path)},
                     True)
        return
    from .versions import stored_line

    out.print(f"stored {stored_line(st, name)} ({report['summary']}): {report['bytes_before']:,} -> "
              f"{report['bytes_after']:,} bytes "
              f"({report['smaller']}x smaller); relative error of the {report['tensors_packed']} packed matrices: "
              f"mean {report['relative_error_mean']:.4f}, max {report['relative_error_max']:.4f}", highlight=False)


def export_peft_cmd(
    adapter: str = typer.Argument(..., help=f"ADAPTER: {ADAPTER_HELP}."),
    out_dir: Path = typer.Option(..., "--out", help="Folder to write (PEFT's adapter_config.json and "
                                 "adapter_model.safetensors)."),
    store: Optional[Path] = STORE_OPT,
) -> None:
    """Write an adapter as a plain PEFT folder (LoRA, IA3). A low-bit adapter is written dequantized:
    the float values its codes read back (PEFT has no low-bit adapters), so PEFT computes what adapterkit does."""
    from ..formats.peft import write_peft

    try:
        a = load_adapter(adapter, store)
        if a.method.peft_type is None:
            raise AdapterkitError(f"adapter {a.name!r} is {a.method.an_adapter}: PEFT has no such family, so it "
                                  "cannot be exported to PEFT's format; adapterkit's own folder is its format")
        if out_dir.exists() and any(out_dir.iterdir()):
            raise AdapterkitError(f"{out_dir} exists and is not empty; give a new folder")
        from .._atomic import atomic_write_dir
        from ..core.base import upstream_id

        base_model = a.meta.base_model or (upstream_id(a.meta.base_name) if a.meta.base_name else None)
        atomic_write_dir(out_dir, lambda folder: write_peft(folder, a.config, a.tensors, base_model))
    except AdapterkitError as exc:
        fail(exc)
    what = f"dequantized from {a.packed.codec.label()}" if a.packed is not None else "as stored"
    out.print(f"wrote {a.name} ({a.method.title}, {what}) to {out_dir} in PEFT's format", highlight=False)
