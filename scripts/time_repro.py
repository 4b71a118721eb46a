"""Run `dvc repro` (arguments passed through) and report each stage's wall time and the peak memory.

DVC's own output is passed through unchanged. A stage's time runs from DVC's "Running stage '<name>'" line to
the next stage's (or to the end), so it includes the stage's Python start-up and DVC's bookkeeping; stages
DVC skipped as unchanged are listed as cached. Peak memory is the largest resident set of any process of
the run (``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the biggest single stage, not their sum).

    python scripts/time_repro.py [--json FILE] [-- dvc repro arguments]

Each stage that ran is also recorded in ``outputs/stage_times.json`` under its run-cache key (the hash of its
command, deps and params in dvc.lock), where ``scripts/recipe_study.py`` finds the time of a stage that DVC
later restores from its run cache instead of running it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.experiments import dvc_command

TIMES = Path("outputs/stage_times.json")
START = re.compile(rb"Running stage '([^']+)'")
SKIP = re.compile(rb"Stage '([^']+)' didn't change, skipping")


def run(args: list[str], dvc: str = "dvc") -> tuple[int, dict]:
    """Run ``dvc *args`` (``repro ...``, or ``exp run ...``, which prints the same lines); returns (exit code,
    {"stages": {name: seconds or None}, "total_s", "peak_rss_mb"})."""
    t0 = time.perf_counter()
    # the stages' `python -m stages.<name>` must be this interpreter's, as with an activated .venv
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path}
    proc = subprocess.Popen([dvc, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    order: list[tuple[str, float]] = []
    seen = b""
    while chunk := os.read(proc.stdout.fileno(), 65536):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        seen += chunk
        now = time.perf_counter()
        order += [(name.decode(), now) for name in START.findall(seen)[len(order) :]]
    cached = [name.decode() for name in SKIP.findall(seen)]
    code = proc.wait()
    end = time.perf_counter()
    stages = {}
    for i, (name, begin) in enumerate(order):
        stages[name] = round((order[i + 1][1] if i + 1 < len(order) else end) - begin, 1)
    for name in cached:
        stages.setdefault(name, None)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return code, {"stages": stages, "total_s": round(end - t0, 1), "peak_rss_mb": round(peak_mb)}


def stage_keys(lock_text: str) -> dict[str, str]:
    """stage -> hash of its command, deps and params in a dvc.lock's text: what DVC's run cache is keyed on."""
    keys = {}
    for stage, entry in (yaml.safe_load(lock_text).get("stages") or {}).items():
        ident = {"cmd": entry.get("cmd"), "params": entry.get("params"),
                 "deps": [(d.get("path"), d.get("md5")) for d in entry.get("deps") or []]}  # fmt: skip
        keys[stage] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return keys


def record_times(stages: dict[str, float | None], lock_text: str, path: Path = TIMES) -> dict[str, float]:
    """Add the stages that ran (seconds not None) to the record at ``path``, keyed ``stage:run-cache key`` (the
    longest time seen for a key is kept); returns the whole record."""
    times = json.loads(path.read_text()) if path.exists() else {}
    keys = stage_keys(lock_text)
    for s, sec in stages.items():  # the longest run of a key: a stage re-entered after it finished (pretraining
        if sec is not None and s in keys:  # whose checkpoint is complete) takes seconds, not its real time
            times[f"{s}:{keys[s]}"] = max(sec, times.get(f"{s}:{keys[s]}", 0.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(times, indent=1, sort_keys=True))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the timings to this JSON file")
    ap.add_argument("dvc_args", nargs="*", help="passed to `dvc repro` (after --)")
    args = ap.parse_args()
    code, report = run(["repro", *args.dvc_args], dvc=dvc_command("run `make repro`, or activate the project's .venv"))
    ran = {k: v for k, v in report["stages"].items() if v is not None}
    print(f"\n{'stage':<14}{'seconds':>9}")
    for name, sec in report["stages"].items():
        print(f"{name:<14}{'cached' if sec is None else f'{sec:.1f}':>9}")
    print(
        f"{'stages':<14}{sum(ran.values()):>9.1f}   (dvc repro in all: {report['total_s']:.1f} s; "
        f"peak memory of one process {report['peak_rss_mb']} MB)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if code == 0 and Path("dvc.lock").exists():
        record_times(report["stages"], Path("dvc.lock").read_text())
    sys.exit(code)


if __name__ == "__main__":
    main()
