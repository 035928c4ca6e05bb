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


def read_runs(path, keys: tuple[str, ...]) -> dict[tuple, dict]:
    """The rows of a results/*_runs.jsonl file by the values of `keys` (the last row of a key counts: a
    --redo appends)."""
    import json
    from pathlib import Path

    runs = {}
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                runs[tuple(r[k] for k in keys)] = r
    return runs


def median_step_seconds(log_file, skip: int = 2) -> float | None:
    """Median seconds of one optimizer step in a train log (train_log.jsonl), the first `skip` steps left out."""
    import json
    import statistics
    from pathlib import Path

    if not Path(log_file).is_file():
        return None
    rows = [json.loads(x) for x in Path(log_file).read_text().splitlines() if x.strip()]
    secs = [r["seconds"] for r in rows if "seconds" in r and r.get("step", 0) > skip]
    return statistics.median(secs) if secs else None
