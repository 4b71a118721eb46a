"""The README and docs/ only show commands that work: every `ijepa` command parses, every `-S key=value`
names a params key or a config group, every `make` target exists, every file and link they name is there."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from ijepa.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_lines(page: Path) -> list[str]:
    """Commands in the page's ```bash blocks, continuation lines joined, comments dropped."""
    out, block, joined = [], False, ""
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            block = line.strip() in ("```bash", "```sh")
            continue
        if not block:
            continue
        line = re.sub(r"\s+#.*$", "", line).rstrip()
        if line.endswith("\\"):
            joined += line[:-1] + " "
            continue
        if (joined + line).strip():
            out.append((joined + line).strip())
        joined = ""
    return out


def test_pages_exist_and_link_to_files_that_exist():
    assert len(PAGES) >= 8 and len((ROOT / "README.md").read_text()) < 12_000  # a README read in five minutes
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_ijepa_commands_parse(page):
    parser = build_parser()
    for line in shell_lines(page):
        if line.startswith("ijepa "):
            parser.parse_args(shlex.split(line)[1:])  # argparse exits on an unknown option or a bad value


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, f"{prefix}{k}.")
    return out


def test_dvc_set_params_make_targets_and_scripts_exist():
    params = _keys(yaml.safe_load((ROOT / "params.yaml").read_text()))
    groups = {p.name for p in (ROOT / "params").iterdir() if p.is_dir()}
    targets = set(re.findall(r"^([a-zA-Z_-]+):", (ROOT / "Makefile").read_text(), re.M))
    for page in PAGES:
        text = page.read_text()
        for key in re.findall(r"-S '?([a-zA-Z_.]+)=", text):
            assert key in params or key in groups, f"{page.name}: -S {key}= is neither a params key nor a group"
        for line in shell_lines(page):
            if line.startswith("make "):
                assert shlex.split(line)[1] in targets, f"{page.name}: {line}"
        for path in re.findall(r"`(?:python )?((?:scripts|benchmarks|stages|tests)/[\w/]+\.(?:py|sh))", text):
            assert (ROOT / path).is_file(), f"{page.name} names missing {path}"
