"""The README's commands in a new shell after its one set-up line (`source .venv/bin/activate`): nothing else on
PATH, no variable of this session."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from .helpers import official_checkpoint

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parent.parent
ACTIVATE = "source .venv/bin/activate"


@pytest.mark.skipif(not (ROOT / ".venv/bin/activate").is_file(), reason="needs the project's .venv (make setup)")
def test_readme_commands_run_in_a_fresh_shell_after_activating_the_venv(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert f"```bash\n{ACTIVATE}\n" in readme
    ckpt = official_checkpoint(tmp_path / "jepa-latest.pth.tar")
    commands = {  # each as the README writes it (the checkpoint path aside)
        "dvc status": "dvc status",
        "ijepa --help": "ijepa --help",
        "ijepa inspect models/pretrain/jepa-latest.pth.tar": f"ijepa inspect {shlex.quote(str(ckpt))}",
        "mlflow --version": "mlflow --version",
    }
    for written, run in commands.items():
        assert written in readme, written
        r = subprocess.run(
            ["env", "-i", f"HOME={tmp_path}", "PATH=/usr/bin:/bin", "bash", "--noprofile", "--norc", "-c",
             f"{ACTIVATE} && {run}"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, (run, r.stdout[-2000:], r.stderr[-2000:])
        assert "command not found" not in r.stderr
    # and without that line the same shell finds none of them
    r = subprocess.run(
        ["env", "-i", "PATH=/usr/bin:/bin", "bash", "--noprofile", "--norc", "-c", "command -v ijepa"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode != 0 and r.stdout == ""
