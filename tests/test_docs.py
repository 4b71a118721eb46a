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


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.+)$", page.read_text(), re.M)}


def test_every_anchor_resolves():
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)#:]*)#([^)]+)\)", page.read_text()):
            linked = (page.parent / target) if target else page
            assert anchor in anchors(linked), (
                f"{page.name} links to #{anchor} of {linked.name}, which has no such heading"
            )


SECTIONS_NAMED = r"`((?:{})(?:\.\w+)+)(?:=[^`]*)?`"


def test_every_params_key_the_pages_name_exists():
    """`section.key` (or `section.key=value`) in backticks names a key of the composed params."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    keys = _keys(params)
    pattern = re.compile(SECTIONS_NAMED.format("|".join(params)))
    for page in PAGES:
        for key in pattern.findall(page.read_text()):
            if key.rsplit(".", 1)[1] in ("safetensors", "json", "yaml", "pt", "pth"):
                continue  # a file name (`model.safetensors`), not a key
            assert key in keys, f"{page.name}: `{key}` is not a params key"


def test_every_make_target_and_ijepa_command_the_prose_names_exists():
    """`make target ...` and `ijepa command --flag ...` in backticks, outside the bash blocks too."""
    targets = set(re.findall(r"^([a-zA-Z_-]+):", (ROOT / "Makefile").read_text(), re.M))
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # the subcommands and their parsers
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"`make ([a-zA-Z_-]+)", text):
            assert target in targets, f"{page.name}: `make {target}` is not a Makefile target"
        for command, rest in re.findall(r"`ijepa ([a-z-]+)([^`]*)`", text):
            assert command in commands, f"{page.name}: `ijepa {command}` is not a command"
            flags = {s for a in commands[command]._actions for s in a.option_strings}
            for flag in re.findall(r"(?<!\S)(--?[a-z][\w-]*)", rest):
                assert flag in flags, f"{page.name}: `ijepa {command}` has no {flag}"
