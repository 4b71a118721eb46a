"""Compose params/ into params.yaml exactly as `dvc exp run` does (DVC's own compose_and_dump).

python scripts/compose_params.py [OUTPUT] [OVERRIDE ...]    # default OUTPUT: params.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

from dvc.utils.hydra import compose_and_dump

ROOT = Path(__file__).resolve().parent.parent


def compose(output: str | Path, overrides: list[str]) -> None:
    compose_and_dump(Path(output), str(ROOT / "params"), None, "config", str(ROOT), overrides)


if __name__ == "__main__":
    args = sys.argv[1:]
    out = args.pop(0) if args and "=" not in args[0] else str(ROOT / "params.yaml")
    compose(out, args)
    print(f"wrote {out}")
