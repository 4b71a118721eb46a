"""Run several commands (``python -m <module> <args>``) one after another in this one interpreter, each as if it were
its own process: its working directory and environment, its exit code, and everything written to file
descriptors 1 and 2 while it ran (Python's streams, logging handlers, C libraries, tracebacks) captured in files
of its own. tests/test_errors.py uses it to start one interpreter per test instead of one per command.

    python tests/commands.py cases.json results.json

cases.json: [{"module": "ijepa.cli", "args": [...], "cwd": "...", "env": {...}}, ...];
results.json: [{"returncode": int, "stdout": str, "stderr": str}, ...], in the same order.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
import traceback


def run(case: dict) -> dict:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        code = _run_into(case, {1: out, 2: err})
        out.seek(0), err.seek(0)
        return {"returncode": code, "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode()}


def _run_into(case: dict, files: dict) -> int:
    env, cwd, argv = dict(os.environ), os.getcwd(), sys.argv
    saved = {fd: os.dup(fd) for fd in files}
    sys.stdout.flush(), sys.stderr.flush()
    for fd, f in files.items():
        os.dup2(f.fileno(), fd)
    try:
        os.environ.update(case.get("env") or {})
        os.chdir(case.get("cwd") or cwd)
        sys.argv = [case["module"], *case["args"]]
        runpy.run_module(case["module"], run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as e:  # what the interpreter does with it
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        for fd, old in saved.items():
            os.dup2(old, fd)
            os.close(old)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = argv


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    results = [run(case) for case in cases]
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
