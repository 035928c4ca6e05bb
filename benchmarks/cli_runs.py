"""What the benchmarks that drive the CLI share: timestamped log lines and one `adapterkit` command
run as a subprocess (as a user runs it), timed."""

from __future__ import annotations

import subprocess
import sys
import time


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cli(args: list[str], env: dict) -> tuple[str, float]:
    """(stdout, wall seconds) of `python -m adapterkit ARGS`; a failure stops the benchmark with its output."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "adapterkit", *args], capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"adapterkit {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res.stdout, time.perf_counter() - t0
