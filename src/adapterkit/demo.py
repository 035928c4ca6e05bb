"""`adapterkit demo`: the main job on the embedded defaults.

Loads the default base, attaches three example adapters and generates one mixed batch (one row
per adapter, one row with none), then checks every row against running that adapter alone.
Later stages (train -> merge -> serve with routing) grow this into the full pipeline.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from .adapter import create_adapter
from .base import load_base
from .generate import generate
from .methods.lora import LoraConfig
from .runtime import AdapterRuntime

PROMPT = "Give me one tip for writing clear code."


def run_demo(base_name: str, max_tokens: int, console: Console) -> None:
    t0 = time.perf_counter()
    base = load_base(base_name)
    console.print(f"base [bold]{base.name}[/] ({base.fingerprint}) loaded in {time.perf_counter() - t0:.1f} s")
    rt = AdapterRuntime.from_base(base)
    names = ["example-a", "example-b", "example-c"]
    for seed, name in enumerate(names):
        # Untrained example adapters with a small non-zero B, so each row visibly differs.
        cfg = LoraConfig(r=8, alpha=16, init="nonzero", init_std=0.01 * (seed + 1))
        rt.add(create_adapter(name, base.model, cfg, seed=seed, fingerprint=base.fingerprint, base_name=base.name))
    rows = [*names, None]
    t1 = time.perf_counter()
    mixed = generate(rt, base.tokenizer, [PROMPT] * len(rows), rows, max_new_tokens=max_tokens, chat=True)
    elapsed = time.perf_counter() - t1
    table = Table("row", "adapter", "output", "== alone")
    for i, res in enumerate(mixed):
        alone = generate(rt, base.tokenizer, [PROMPT], [res.adapter], max_new_tokens=max_tokens, chat=True)[0]
        same = "yes" if alone.token_ids == res.token_ids else "[red]NO[/]"
        table.add_row(str(i), res.adapter or "(base)", res.text.strip().replace("\n", " "), same)
    console.print(table)
    console.print(f"one mixed batch of {len(rows)} rows x {max_tokens} tokens in {elapsed:.2f} s")
