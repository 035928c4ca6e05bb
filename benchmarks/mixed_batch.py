#!/usr/bin/env python
"""Mixed-batch step time vs the number of distinct adapters in the batch.

Systems (same base weights, threads, dtype and batch; alternated A B C ... in every repetition):
  adapterkit      AdapterRuntime over the base, the row routing built inside the timed step
  peft            PEFT mixed batch: the same adapters loaded into a PeftModel, adapter_names=rows
  base            the bare base model with no adapter (the upper bound)
  adapterkit_off  adapterkit with the adapters switched off (rt.disabled(); decode only): hook cost
  adapterkit[k]   adapterkit forced to kernel k (with --kernels): justifies the auto threshold
  adapterkit[gather-copy]  (with --copy-gather) the gather kernel copying every row's A and B, the span
                  kernel (a view of the stacks' slots lo..hi) turned off: what the span saves

Workloads, batch B (default 32), row i uses adapter a{i % U}:
  decode   one step of 1 new token per row on a KV cache of --ctx (128) tokens
  prefill  one forward of [B, --prefill-len (128)] tokens, no cache; like generate(), only the
           last position's logits are computed (logits_to_keep=1; --full-logits to change)

A correctness gate runs before any timing: at every U the decode-step logits of adapterkit (auto
and every forced kernel) equal PEFT's mixed batch (allclose atol=rtol=1e-4) with identical argmax
per row, adapterkit with adapters off equals the bare base, and the adapters change the output.
Prefill outputs are compared the same way on the warm-up pass before its timing.

    .venv/bin/python benchmarks/mixed_batch.py --quick --threads 1           # smoke run, ~40 s
    .venv/bin/python benchmarks/mixed_batch.py --kernels --threads 1         # full run, ~26 min

On a shared 2-core machine pass --threads 1 when anything else is running: two OpenMP threads
sharing a core with another process spin-wait and single steps slow down 10-20x at random.

Raw repetition times go to benchmarks/results/mixed_batch.json (rewritten after each U, so a cut
run keeps what it measured) and a plot to the same path with .png.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OUT = RESULTS / "mixed_batch.json"
QUICK_OUT = RESULTS / "mixed_batch_quick.json"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
KERNELS = ("dense", "gather", "segment")
ATOL = RTOL = 1e-4
# Targets this benchmark checks (README claims): decode at the largest U, decode at U=1, prefill.
TARGET_DECODE_PEFT_RATIO = 3.0      # PEFT / adapterkit at the largest U
TARGET_DECODE_OVER_BASE = 1.25      # adapterkit / base at the largest U
TARGET_PREFILL_OVER_BASE = 1.10     # adapterkit / base, every U


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=None, help="rows per batch B (default 32; 8 with --quick)")
    p.add_argument("--ranks", "--rank", dest="ranks", type=int_list, default=None,
                   help="LoRA rank(s), comma list (default 16)")
    p.add_argument("--us", type=int_list, default=None,
                   help="distinct adapters per batch, comma list (default 1,2,4,8,16,32; 1,8 with --quick)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per system for decode (default 5)")
    p.add_argument("--prefill-reps", type=int, default=None,
                   help="timed repetitions per system for prefill (default: --reps; a B=32 prefill takes "
                        "~20 s per forward on 2 cores)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per system before timing each U")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch.get_num_threads())")
    p.add_argument("--ctx", type=int, default=None, help="KV-cache length for decode (default 128; 32 with --quick)")
    p.add_argument("--prefill-len", type=int, default=None, help="prefill tokens per row (default 128; 32 with --quick)")
    p.add_argument("--workloads", default="decode,prefill", help="comma list of decode,prefill")
    p.add_argument("--kernels", action="store_true",
                   help="also time adapterkit forced to each kernel (dense/gather/segment)")
    p.add_argument("--kernel-workloads", default="decode",
                   help="workloads the --kernels sweep covers (default decode; prefill triples its cost)")
    p.add_argument("--copy-gather", action="store_true",
                   help="decode also times adapterkit[gather-copy]: the gather kernel with the span view off")
    p.add_argument("--full-logits", action="store_true", help="prefill computes logits for every position")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON path (default {DEFAULT_OUT.relative_to(ROOT)}; --quick: {QUICK_OUT.relative_to(ROOT)}); "
                        "the plot goes beside it with .png")
    p.add_argument("--quick", action="store_true", help="smoke run: B=8, U in {1,8}, 2 reps, lengths 32")
    a = p.parse_args(argv)
    q = a.quick
    a.batch = a.batch or (8 if q else 32)
    a.ranks = a.ranks or [16]
    a.us = a.us or ([1, 8] if q else [1, 2, 4, 8, 16, 32])
    a.reps = a.reps or (2 if q else 5)
    a.prefill_reps = a.prefill_reps or a.reps
    a.ctx = a.ctx or (32 if q else 128)
    a.prefill_len = a.prefill_len or (32 if q else 128)
    a.out = a.out or (QUICK_OUT if q else DEFAULT_OUT)
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    a.kernel_workloads = [w.strip() for w in a.kernel_workloads.split(",") if w.strip()] if a.kernels else []
    for w in a.workloads + a.kernel_workloads:
        if w not in ("decode", "prefill"):
            p.error(f"unknown workload {w!r}; use decode and/or prefill")
    if any(u > a.batch for u in a.us):
        p.error(f"every U must be <= the batch size {a.batch}: got {a.us}")
    if min(a.reps, a.prefill_reps) < 1 or a.warmup < 0:
        p.error("--reps/--prefill-reps must be >= 1 and --warmup >= 0")
    return a


# --------------------------------------------------------------------------- environment

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return head + ("+dirty-src" if dirty else "") if head else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import peft
    import transformers

    import adapterkit
    from adapterkit.core import batching

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "adapterkit": adapterkit.__version__,
        "git_commit": git_commit(),
        "dense_max_adapters": batching.DENSE_MAX_ADAPTERS,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


# --------------------------------------------------------------------------- timing

def timed(fn: Callable[[], Any], prepare: Callable[[], Any] | None = None) -> float:
    """Seconds for fn(prep) with GC off; prepare() (e.g. a fresh cache copy) runs outside the clock."""
    prep = prepare() if prepare is not None else None
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn(prep)
        return time.perf_counter() - t0
    finally:
        gc.enable()


def summary(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def paired_ratios(num: list[float], den: list[float]) -> list[float]:
    return [n / d for n, d in zip(num, den)]


# --------------------------------------------------------------------------- systems

class Systems:
    """The three models and the callables that run one step of each workload on each system."""

    def __init__(self, args: argparse.Namespace, rank: int, raw_base: Any, workdir: Path) -> None:
        import adapterkit
        from peft import PeftModel

        self.args = args
        self.raw = raw_base.model
        log(f"rank {rank}: loading the adapterkit and PEFT copies of the base")
        ak_base = adapterkit.load_base("smollm2-135m")
        peft_base = adapterkit.load_base("smollm2-135m")
        if not (ak_base.fingerprint == peft_base.fingerprint == raw_base.fingerprint):
            raise SystemExit("the three base copies have different fingerprints; the comparison would be unfair")
        self.rt = adapterkit.AdapterRuntime.from_base(ak_base)
        config = adapterkit.LoraConfig(r=rank, alpha=2 * rank, target_modules=list(TARGETS),
                                       init="nonzero", init_std=0.02)
        n = max(args.us)
        dirs = []
        for i in range(n):
            adapter = adapterkit.create_adapter(f"a{i}", ak_base.model, config, seed=i,
                                                fingerprint=ak_base.fingerprint, base_name=ak_base.name)
            self.rt.add(adapter)
            dirs.append(adapter.save(workdir / f"r{rank}" / f"a{i}"))
        log(f"rank {rank}: {n} adapters attached to adapterkit; loading them into PEFT")
        pm = PeftModel.from_pretrained(peft_base.model, str(dirs[0]), adapter_name="a0")
        for i in range(1, n):
            pm.load_adapter(str(dirs[i]), adapter_name=f"a{i}")
        pm.eval()
        self.peft = pm
        self.ak = ak_base.model
        self.vocab = self.raw.config.vocab_size
        # transformers 5.x renames past_key_values -> cache; use whichever this version takes.
        params = inspect.signature(self.raw.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def rows(self, u: int) -> list[str]:
        return [f"a{i % u}" for i in range(self.args.batch)]

    def auto_kernel(self, u: int, length: int) -> str:
        """The kernel auto picks for rows of `length` tokens (newer batches choose per call)."""
        batch = self.rt.make_batch(self.rows(u))
        pick = getattr(batch, "kernel_for", None)
        return pick(length) if pick is not None else batch.kernel

    def system_names(self, workload: str) -> list[str]:
        names = ["adapterkit", "peft", "base"]
        if workload == "decode":
            names.append("adapterkit_off")
        if workload in self.args.kernel_workloads:
            names += [f"adapterkit[{k}]" for k in KERNELS]
        if workload == "decode" and self.args.copy_gather:
            names.append("adapterkit[gather-copy]")
        return names

    def step(self, system: str, workload: str, u: int, inputs: dict[str, Any]) -> tuple[Callable, Callable | None]:
        """(fn(prep) -> logits, prepare) for one forward of `system` on `workload` at U."""
        rows = self.rows(u)
        if workload == "decode":
            tok, master = inputs["token"], inputs["cache"]
            kw = lambda c: {self.cache_kw: c, "use_cache": True}          # noqa: E731
            prepare = lambda: copy.deepcopy(master)                        # noqa: E731
            x = tok
        else:
            x = inputs["ids"]
            keep = {} if self.args.full_logits else {"logits_to_keep": 1}
            kw = lambda c: {"use_cache": False, **keep}                   # noqa: E731
            prepare = None
        rt, ak, pm, raw = self.rt, self.ak, self.peft, self.raw

        if system == "adapterkit[gather-copy]":
            from adapterkit.methods import kernels

            def fn(c):
                kept, kernels.SPAN_MAX_PADDING = kernels.SPAN_MAX_PADDING, -1.0    # span_of refuses every step
                try:
                    with rt.batch(rows, kernel="gather"):
                        return ak(x, **kw(c)).logits
                finally:
                    kernels.SPAN_MAX_PADDING = kept
        elif system == "adapterkit" or system.startswith("adapterkit["):
            kernel = "auto" if system == "adapterkit" else system[len("adapterkit["):-1]

            def fn(c):
                with rt.batch(rows, kernel=kernel):        # routing metadata built inside the clock
                    return ak(x, **kw(c)).logits
        elif system == "adapterkit_off":
            def fn(c):
                with rt.disabled():
                    return ak(x, **kw(c)).logits
        elif system == "peft":
            def fn(c):
                return pm(input_ids=x, adapter_names=rows, **kw(c)).logits
        elif system == "base":
            def fn(c):
                return raw(x, **kw(c)).logits
        else:  # pragma: no cover
            raise ValueError(system)
        return fn, prepare


# --------------------------------------------------------------------------- gate

def compare(name: str, got: torch.Tensor, want: torch.Tensor, *, argmax: bool = True) -> dict[str, Any]:
    got, want = got.float(), want.float()
    diff = (got - want).abs().max().item()
    ok = torch.allclose(got, want, atol=ATOL, rtol=RTOL)
    same_tokens = bool((got[:, -1].argmax(-1) == want[:, -1].argmax(-1)).all()) if argmax else True
    return {"check": name, "max_abs_diff": diff, "allclose": bool(ok), "argmax_equal": same_tokens,
            "passed": bool(ok and same_tokens)}


def gate_failed(checks: list[dict[str, Any]], where: str) -> None:
    bad = [c for c in checks if not c["passed"]]
    if bad:
        lines = "\n".join(f"  {c['check']}: max |diff| {c['max_abs_diff']:.3g}, allclose(atol={ATOL}, "
                          f"rtol={RTOL}) {c['allclose']}, argmax equal {c['argmax_equal']}" for c in bad)
        raise SystemExit(f"CORRECTNESS GATE FAILED ({where}); no timing was reported:\n{lines}")


def gate_checks(outs: dict[str, torch.Tensor], u: int) -> list[dict[str, Any]]:
    """adapterkit (every variant) == PEFT; adapterkit off == base; adapters change the output."""
    checks = []
    ref = outs["peft"]
    for name, out in outs.items():
        if name.startswith("adapterkit") and name != "adapterkit_off":
            checks.append(compare(f"U={u}: {name} vs PEFT mixed batch", out, ref))
    if "adapterkit_off" in outs:
        checks.append(compare(f"U={u}: adapterkit_off vs bare base", outs["adapterkit_off"], outs["base"]))
    effect = (outs["peft"] - outs["base"]).abs().max().item()
    checks.append({"check": f"U={u}: adapters change the logits (max |peft - base| > 1e-3)",
                   "max_abs_diff": effect, "allclose": effect > 1e-3, "argmax_equal": True,
                   "passed": effect > 1e-3})
    return checks


# --------------------------------------------------------------------------- run

def make_inputs(args: argparse.Namespace, systems: Systems, workloads: list[str]) -> dict[str, dict[str, Any]]:
    g = torch.Generator().manual_seed(args.seed)
    b = args.batch
    ctx_ids = torch.randint(0, systems.vocab, (b, args.ctx), generator=g)
    token = torch.randint(0, systems.vocab, (b, 1), generator=g)
    ids = torch.randint(0, systems.vocab, (b, args.prefill_len), generator=g)
    inputs: dict[str, dict[str, Any]] = {}
    if "decode" in workloads:
        # One cache, built once by a prefill of the bare base (the contents do not change the
        # cost of a step), deep-copied outside the clock for every forward: a forward appends to
        # a DynamicCache in place. Every system gets identical inputs, so the gate is exact.
        log(f"building the {args.ctx}-token KV cache for B={b} (one prefill of the bare base)")
        with torch.inference_mode():
            out = systems.raw(ctx_ids, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        if cache.get_seq_length() != args.ctx:
            raise SystemExit(f"cache length {cache.get_seq_length()} != {args.ctx}")
        inputs["decode"] = {"token": token, "cache": cache}
    if "prefill" in workloads:
        inputs["prefill"] = {"ids": ids}
    return inputs


def run_u(systems: Systems, workload: str, u: int, inputs: dict[str, Any], reps: int, warmup: int,
          gate: list[dict[str, Any]] | None) -> dict[str, Any]:
    names = systems.system_names(workload)
    steps = {s: systems.step(s, workload, u, inputs) for s in names}
    length = 1 if workload == "decode" else systems.args.prefill_len
    record: dict[str, Any] = {"workload": workload, "U": u, "auto_kernel": systems.auto_kernel(u, length),
                              "systems": names, "times": {s: [] for s in names}}
    with torch.inference_mode():
        if gate is None:
            # Prefill: the first warm-up pass doubles as the correctness check for this U.
            outs = {}
            for s in names:
                fn, prepare = steps[s]
                outs[s] = fn(prepare() if prepare else None)
            checks = gate_checks(outs, u)
            del outs
            gate_failed(checks, f"{workload}, U={u}")
            record["gate"] = checks
            warmup = max(0, warmup - 1)
        else:
            record["gate"] = gate
        for _ in range(warmup):
            for s in names:
                timed(*steps[s])
        for r in range(reps):
            for s in names:                                   # A B C ... A B C: drift hits all
                record["times"][s].append(timed(*steps[s]))
            log(f"  {workload} U={u} rep {r + 1}/{reps}: "
                + ", ".join(f"{s} {record['times'][s][-1]:.3f}s" for s in names))
    t = record["times"]
    record["summary"] = {s: summary(v) for s, v in t.items()}
    med = {s: record["summary"][s]["median"] for s in names}
    record["ratios"] = {
        "peft_over_adapterkit": med["peft"] / med["adapterkit"],
        "adapterkit_over_base": med["adapterkit"] / med["base"],
        "peft_over_adapterkit_paired": summary(paired_ratios(t["peft"], t["adapterkit"])),
        "adapterkit_over_base_paired": summary(paired_ratios(t["adapterkit"], t["base"])),
        # Under heavy contention the fastest repetition is the least disturbed one.
        "peft_over_adapterkit_min": min(t["peft"]) / min(t["adapterkit"]),
        "adapterkit_over_base_min": min(t["adapterkit"]) / min(t["base"]),
    }
    if "adapterkit_off" in t:
        record["ratios"]["adapterkit_off_over_base"] = med["adapterkit_off"] / med["base"]
    if "adapterkit[gather-copy]" in t:
        record["ratios"]["gather_copy_over_adapterkit_paired"] = summary(paired_ratios(t["adapterkit[gather-copy]"],
                                                                                      t["adapterkit"]))
        record["ratios"]["gather_copy_over_base"] = med["adapterkit[gather-copy]"] / med["base"]
    kern = {k: med[f"adapterkit[{k}]"] for k in KERNELS if f"adapterkit[{k}]" in med}
    if kern:
        record["fastest_kernel"] = min(kern, key=kern.get)
    return record


def decode_gate(systems: Systems, u: int, inputs: dict[str, Any]) -> list[dict[str, Any]]:
    names = list(dict.fromkeys(systems.system_names("decode") + [f"adapterkit[{k}]" for k in KERNELS]))
    outs = {}
    with torch.inference_mode():
        for s in names:
            fn, prepare = systems.step(s, "decode", u, inputs)
            outs[s] = fn(prepare())
    checks = gate_checks(outs, u)
    gate_failed(checks, f"decode, U={u}")
    return checks


def fmt_t(s: dict[str, float]) -> str:
    return f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f})"


def print_tables(records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=200)
    for rank in args.ranks:
        for workload in args.workloads:
            recs = [r for r in records if r["rank"] == rank and r["workload"] == workload]
            if not recs:
                continue
            extra = [s for s in recs[0]["systems"] if s not in ("adapterkit", "peft", "base")]
            title = (f"{workload}: B={args.batch}, rank {rank}, "
                     + (f"1 new token on a {args.ctx}-token cache" if workload == "decode"
                        else f"{args.prefill_len} tokens/row")
                     + f"; step seconds, median (min–max) of {len(recs[0]['times']['base'])}")
            table = Table(title=escape(title))
            for col in ("U", "auto", "adapterkit s", "PEFT s", "base s", "PEFT/ak", "ak/base",
                        *[f"{s} s" for s in extra]):
                table.add_column(escape(col), justify="right")
            for r in recs:
                sm, ra = r["summary"], r["ratios"]
                table.add_row(str(r["U"]), r["auto_kernel"], fmt_t(sm["adapterkit"]), fmt_t(sm["peft"]),
                              fmt_t(sm["base"]), f"{ra['peft_over_adapterkit']:.2f}x",
                              f"{ra['adapterkit_over_base']:.3f}", *[fmt_t(sm[s]) for s in extra])
            console.print(table)


def check_targets(records: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for rank in args.ranks:
        dec = {r["U"]: r for r in records if r["rank"] == rank and r["workload"] == "decode"}
        pre = [r for r in records if r["rank"] == rank and r["workload"] == "prefill"]
        if dec:
            top = dec[max(dec)]
            v = top["ratios"]["peft_over_adapterkit"]
            out.append({"rank": rank, "target": f"decode U={top['U']}: PEFT/adapterkit >= {TARGET_DECODE_PEFT_RATIO}",
                        "value": v, "met": v >= TARGET_DECODE_PEFT_RATIO})
            v = top["ratios"]["adapterkit_over_base"]
            out.append({"rank": rank, "target": f"decode U={top['U']}: adapterkit/base <= {TARGET_DECODE_OVER_BASE}",
                        "value": v, "met": v <= TARGET_DECODE_OVER_BASE})
            if 1 in dec:
                v = dec[1]["ratios"]["peft_over_adapterkit"]
                out.append({"rank": rank, "target": "decode U=1: no loss to PEFT (PEFT/adapterkit >= 1)",
                            "value": v, "met": v >= 1.0})
        for r in pre:
            v = r["ratios"]["adapterkit_over_base"]
            out.append({"rank": rank, "target": f"prefill U={r['U']}: adapterkit/base <= {TARGET_PREFILL_OVER_BASE}",
                        "value": v, "met": v <= TARGET_PREFILL_OVER_BASE})
    return out


def plot(records: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w for w in ("decode", "prefill") if any(r["workload"] == w for r in records)]
    fig, axes = plt.subplots(1, max(1, len(workloads)), figsize=(6.5 * max(1, len(workloads)), 4.8), squeeze=False)
    styles = {"adapterkit": dict(color="C0", marker="o", lw=2), "peft": dict(color="C3", marker="s", lw=2),
              "base": dict(color="k", marker="^", ls="--"), "adapterkit_off": dict(color="0.5", marker="v", ls=":"),
              "adapterkit[dense]": dict(color="C1", marker=".", ls="-."),
              "adapterkit[gather]": dict(color="C2", marker=".", ls="-."),
              "adapterkit[segment]": dict(color="C4", marker=".", ls="-.")}
    for ax, workload in zip(axes[0], workloads):
        for rank in args.ranks:
            recs = sorted((r for r in records if r["rank"] == rank and r["workload"] == workload), key=lambda r: r["U"])
            if not recs:
                continue
            for s in recs[0]["systems"]:
                us = [r["U"] for r in recs]
                med = [r["summary"][s]["median"] for r in recs]
                lo = [m - r["summary"][s]["min"] for m, r in zip(med, recs)]
                hi = [r["summary"][s]["max"] - m for m, r in zip(med, recs)]
                label = s if len(args.ranks) == 1 else f"{s} r={rank}"
                ax.errorbar(us, med, yerr=[lo, hi], capsize=3, label=label, **styles.get(s, {}))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("distinct adapters in the batch (U)")
        ax.set_ylabel("step time, s (median, min–max bars)")
        what = (f"decode: B={args.batch}, 1 token, {args.ctx}-token cache" if workload == "decode"
                else f"prefill: B={args.batch} x {args.prefill_len} tokens")
        ax.set_title(what)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M fp32, LoRA r={','.join(map(str, args.ranks))} on q,k,v,o, "
                 f"{torch.get_num_threads()} threads, {cpu_model()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import adapterkit

    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    env = environment(args)
    config = {"batch": args.batch, "ranks": args.ranks, "us": args.us, "reps": args.reps,
              "prefill_reps": args.prefill_reps, "warmup": args.warmup, "ctx": args.ctx,
              "prefill_len": args.prefill_len, "workloads": args.workloads, "kernel_sweep": args.kernel_workloads,
              "dtype": "float32", "base": "smollm2-135m", "target_modules": list(TARGETS), "alpha": "2*r",
              "init": "nonzero (init_std 0.02)", "prefill_logits_to_keep": None if args.full_logits else 1,
              "registered_adapters": max(args.us), "row_i_adapter": "a{i % U}",
              "gate": {"atol": ATOL, "rtol": RTOL}, "quick": args.quick}
    busy = os.getloadavg()[0]
    if busy + torch.get_num_threads() > (os.cpu_count() or 1) + 0.5:
        log(f"WARNING: load average {busy:.1f} + {torch.get_num_threads()} torch threads > "
            f"{os.cpu_count()} CPUs: oversubscribed OpenMP threads spin-wait and a step can slow "
            "10-20x at random; stop other CPU work or pass --threads 1")
    log(f"{env['cpu_model']}, {env['torch_threads']} threads; torch {env['torch']}, transformers "
        f"{env['transformers']}, peft {env['peft']}; config {config}")
    result: dict[str, Any] = {"benchmark": "mixed_batch", "environment": env, "config": config,
                              "records": [], "targets": []}

    def save() -> None:
        result["environment"]["loadavg_now"] = list(os.getloadavg())
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
        tmp.replace(args.out)

    t_start = time.perf_counter()
    raw_base = adapterkit.load_base("smollm2-135m")
    with tempfile.TemporaryDirectory(prefix="adapterkit-bench-") as tmp:
        for rank in args.ranks:
            systems = Systems(args, rank, raw_base, Path(tmp))
            inputs = make_inputs(args, systems, args.workloads)
            gates: dict[int, list[dict[str, Any]]] = {}
            if "decode" in args.workloads:
                log(f"rank {rank}: correctness gate on the decode step (every U, every kernel)")
                for u in args.us:
                    gates[u] = decode_gate(systems, u, inputs["decode"])
                    worst = max(c["max_abs_diff"] for c in gates[u] if "change" not in c["check"])
                    log(f"  U={u}: passed (max |diff| {worst:.2e})")
            for workload in args.workloads:
                reps = args.reps if workload == "decode" else args.prefill_reps
                for u in args.us:
                    length = 1 if workload == "decode" else args.prefill_len
                    log(f"rank {rank}: {workload} U={u} (auto kernel {systems.auto_kernel(u, length)})")
                    rec = run_u(systems, workload, u, inputs[workload], reps, args.warmup,
                                gates.get(u) if workload == "decode" else None)
                    rec["rank"] = rank
                    result["records"].append(rec)
                    save()
            del systems, inputs
            gc.collect()
    result["targets"] = check_targets(result["records"], args)
    result["environment"]["wall_s"] = time.perf_counter() - t_start
    save()
    plot(result["records"], args, png)
    print_tables(result["records"], args)
    for t in result["targets"]:
        print(f"{'MET ' if t['met'] else 'MISS'}  r={t['rank']}  {t['target']}: {t['value']:.3f}")
    print(f"raw results: {args.out}\nplot: {png}\nwall time: {result['environment']['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
