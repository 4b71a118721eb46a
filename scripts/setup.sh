#!/usr/bin/env bash
# Creates .venv with the pinned dependencies and installs the Debian packages the project needs.
# Idempotent: `make` calls it whenever pyproject.toml or constraints.txt is newer than the stamp.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install_system_deps.sh

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, found {sys.version}"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade "pip>=24"
# constraints.txt pins every package as tested (torch 2.14.1 + torchvision 0.29.1 run on CPU too).
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[dev]'
touch .venv/.installed
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'))"
