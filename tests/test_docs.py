"""The README and docs/ only show commands that work: every `ijepa` command parses, every `-S key=value`
names a params key or a config group, every `make` target exists, every file and link they name is there."""

from __future__ import annotations

import csv
import json
import re
import shlex
from decimal import ROUND_HALF_UP, Decimal
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


def _metrics(name: str) -> dict:
    return json.loads((ROOT / "metrics" / f"{name}.json").read_text())


def _pct(x: float) -> str:
    """A fraction as the pages print it: a percent with one decimal, halves rounded up (0.8205 -> 82.1)."""
    return str((Decimal(repr(x)) * 100).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def committed_quotes() -> dict[str, list[str]]:
    """What the committed run's table in docs/results.md and the README's headline table must say, row by row,
    formatted from the committed metrics files as the pages print them."""
    pre, lin, att, low, knn = (_metrics(n) for n in ("pretrain", "linprobe", "attnprobe", "lowshot", "knn"))
    search, ft, seg = (_metrics(n) for n in ("search", "finetune", "seg_eval"))
    with (ROOT / "metrics/pretrain_monitor.csv").open() as f:
        first = next(csv.DictReader(f))
    k = knn["top1"]
    shot = {s: {m: _pct(low[s][m]["mean"]) for m in low[s]} for s in low}
    sd = {s: {m: _pct(low[s][m]["sd"]) for m in low[s]} for s in low}
    return {
        "| pretrain |": [
            f"loss {pre['first_epoch_loss']:.3f} (first epoch mean) -> {pre['final_loss']:.3f}",
            f"RankMe {pre['final_rankme']:.1f} ({float(first['rankme']):.1f} at initialisation)",
            f"feature spread {pre['final_feature_spread']:.3f} ({float(first['feature_spread']):.3f})",
            f"online k-NN {_pct(pre['final_knn_top1'])}% ({_pct(float(first['knn_top1']))}%)",
        ],
        "| linprobe ": [
            f"pretrained {_pct(lin['top1'])}%** (top-5 {_pct(lin['top5'])}%, head `{lin['best_head']}`)",
            f"random-init encoder {_pct(lin['random_init_top1'])}%",
            f"raw pixels {_pct(lin['pixels_top1'])}%",
        ],
        "| attnprobe ": [
            f"pretrained {_pct(att['top1'])}% (top-5 {_pct(att['top5'])}%)",
            f"random-init encoder {_pct(att['random_init_top1'])}%",
            f"raw-pixel patches {_pct(att['pixels_top1'])}%",
        ],
        "| lowshot ": [
            f"pretrained {shot['1shot']['pretrained']} +- {sd['1shot']['pretrained']}%**",
            *(
                f"{shot[s]['pretrained']} +- {sd[s]['pretrained']}%, {shot[s]['random_init']} +- "
                f"{sd[s]['random_init']}%, {shot[s]['pixels']} +- {sd[s]['pixels']}%"
                for s in ("5shot", "1pct", "10pct")
            ),
        ],
        "| knn ": [
            "pretrained " + " / ".join(_pct(k[n]) for n in ("k10", "k20", "k100", "k200")) + "%",
            "random-init " + " / ".join(_pct(knn["random_init_top1"][n]) for n in ("k10", "k20", "k100", "k200")),
        ],
        "| search ": [
            f"recall@1 {search['recall@1']:.3f}, recall@5 {search['recall@5']:.3f}, mAP {search['map']:.3f}",
        ],
        "| finetune ": [
            f"pretrained {_pct(ft['top1'])}%** (top-5 {_pct(ft['top5'])}%, val {_pct(ft['val_top1'])}%; "
            f"its LP-FT head before finetuning: val {_pct(ft['lp_val_top1'])}%)",
            f"random init {_pct(ft['random_init_top1'])}%** (val {_pct(ft['random_init_val_top1'])}%; its head "
            f"{_pct(ft['random_init_lp_val_top1'])}%): +{_pct(ft['gap_vs_random_init'])} points",
        ],
        "| segmentation ": [
            f"pretrained mIoU {_pct(seg['miou'])}%** (pixel acc {_pct(seg['pixel_acc'])}%), random-init encoder "
            f"{_pct(seg['random_init_miou'])}%",
        ],
        "Where the pretrained encoder wins": [
            f"linear probe\n+{_pct(lin['top1'] - lin['random_init_top1'])} points",
            f"k-NN +{_pct(k['k10'] - knn['random_init_top1']['k10'])}",
            f"1 image per class +{_pct(low['1shot']['pretrained']['mean'] - low['1shot']['random_init']['mean'])}",
            f"finetuning +{_pct(ft['gap_vs_random_init'])}",
            f"segmentation +{_pct(seg['miou'] - seg['random_init_miou'])} mIoU",
            f"the attentive\nprobe only +{_pct(att['gap_vs_random_init'])}",
            f"({shot['1shot']['pretrained']}% against {shot['1shot']['pixels']}%)",
            f"({_pct(lin['pixels_top1'])}% against {_pct(lin['top1'])}%)",
        ],
        "The committed\nrun is": [f"{pre['images_per_second']} images/s", f"{pre['monitor_seconds']:.1f} s"],
        "README | linear probe |": [
            f"| {_pct(lin['top1'])}% | {_pct(lin['random_init_top1'])}% | {_pct(lin['pixels_top1'])}% |"
        ],
        "README | attentive probe |": [
            f"| {_pct(att['top1'])}% | {_pct(att['random_init_top1'])}% | {_pct(att['pixels_top1'])}% |"
        ],
        "README | k-NN (k = 10) |": [f"| {_pct(k['k10'])}% |"],
        "README | 1% of the labels": [
            f"| {shot['1pct']['pretrained']}% | {shot['1pct']['random_init']}% | {shot['1pct']['pixels']}% |"
        ],
        "README | finetuning": [f"| {_pct(ft['top1'])}% | {_pct(ft['random_init_top1'])}% |"],
        "README | segmentation": [f"| {_pct(seg['miou'])}% | {_pct(seg['random_init_miou'])}% |"],
    }


def test_the_committed_runs_numbers_in_the_docs_equal_the_committed_metrics():
    """docs/results.md's committed-run table and its summary, and the README's headline table, quote the
    metrics files DVC committed: a rerun that changes a number fails here until the pages say the new one."""
    results = (ROOT / "docs/results.md").read_text().split("\n## Results (seed 0, the committed run)\n", 1)[1]
    pages = {"README": (ROOT / "README.md").read_text(), "results": results.split("\n## ", 1)[0]}
    for anchor, quotes in committed_quotes().items():
        page = "README" if anchor.startswith("README ") else "results"
        text, start = pages[page], anchor.removeprefix("README ")
        assert start in text, f"{page}: no passage starting {start!r}"
        passage = text[text.index(start) :]
        passage = passage[: passage.index("\n\n")] if "|" not in start else passage.split("\n", 1)[0]
        flat = " ".join(passage.split())
        for quote in quotes:
            assert " ".join(quote.split()) in flat, f"{page}, {start.strip()!r}: does not say {quote!r}"
