"""The study scripts' tables, on rows as `scripts/seed_table.py` builds them from `dvc exp show --json`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scripts.recipe_study import load_grid, overrides
from scripts.seed_table import COLUMNS, PROTOCOLS, table

ROOT = Path(__file__).resolve().parent.parent


def _row(seed: int, **values) -> dict:
    return {h: None for h, *_ in COLUMNS + PROTOCOLS} | {"name": f"e{seed}", "seed": seed, "objective": "x"} | values


def test_seed_table_leaves_the_spread_of_a_column_with_fewer_than_two_values_empty():
    """A group whose seeds did not all run a stage (e.g. an objective's comparison without finetuning) gets the
    mean +- sd of the columns it has and empty cells for the others (it used to end in a StatisticsError)."""
    rows = [_row(0, probe=80.0, **{"probe rand": 75.0, "finetune": 81.0}), _row(1, probe=82.0, **{"probe rand": 76.0})]
    lines = table(rows, "gate").splitlines()
    assert lines[2].startswith("| x | 0 | 80.0 | 75.0 | 5.00 |") and "| 81.0 |" in lines[2]
    assert lines[4].startswith("| **x mean +- sd** | 2 seeds | 81.0 +- 1.4 | 75.5 +- 0.7 | 5.50 +- 0.71 |")
    assert lines[4].endswith("|  |  |") and "81.0 +- " not in lines[4].split("5.50 +- 0.71")[1]


GRIDS = sorted(ROOT.glob("scripts/study_*.yaml"))


def _params_keys(d: dict, prefix: str = "") -> set[str]:
    return {prefix + k for k in d} | {
        key for k, v in d.items() if isinstance(v, dict) for key in _params_keys(v, f"{prefix}{k}.")
    }


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.name)
def test_every_committed_grid_names_its_recipe_in_params_that_exist(path):
    """A committed grid's variants each name the params of the recipe its table describes (none is an empty
    "whatever the defaults are today"), and every key they set is a key of the composed params or a group."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    keys, groups = _params_keys(params), {p.name for p in (ROOT / "params").iterdir() if p.is_dir()}
    grid = load_grid(path)
    for variant, sets in grid["variants"].items():
        assert sets, f"{path.name}: variant {variant} names no params"
        for s in sets:
            key = s.split("=", 1)[0]
            assert key in keys or key in groups, f"{path.name}: {variant} sets {key}, which is not a params key"


def test_a_variant_overrides_the_grids_common_recipe_key_by_key():
    assert overrides(["a.x=1", "a.y=2"], ["a.y=3", "b=4"]) == ["a.x=1", "a.y=3", "b=4"]


def _exp(name: str, steps: int, top1: float) -> dict:
    metrics = {
        "metrics/pretrain.json": {"steps": steps, "final_rankme": 20.0, "final_knn_top1": 0.6},
        "metrics/linprobe.json": {"top1": top1, "random_init_top1": 0.75, "pixels_top1": 0.83},
        "metrics/knn.json": {"top1": {"k10": top1 - 0.1}, "random_init_top1": {"k10": 0.5}},
    }
    return {"revs": [{"name": name, "data": {"metrics": {p: {"data": d} for p, d in metrics.items()}}}]}


def _exp_commit(runs: list[tuple[str, int, float]], rev: str = "abc") -> dict:
    return {"rev": rev, "experiments": [_exp(*r) for r in runs]}


def test_the_curve_table_and_figure_come_from_the_studys_experiments(tmp_path):
    """plot_curve groups a grid's experiments by variant (mean +- sd over seeds), prints what it draws and each
    run's gap to its own seed's baseline, and draws the protocols it has (empty panels for stages the runs lack)."""
    from scripts.plot_curve import plot, rows_by_variant, table

    grid = {"prefix": "curve", "variants": {"x1": [], "x2": [], "x8": []}}
    runs = [("curve-x1-s0", 100, 0.80), ("curve-x2-s0", 200, 0.82), ("curve-x2-s1", 200, 0.84), ("other-x2-s0", 1, 0)]
    show = [_exp_commit(runs)]
    rows = rows_by_variant(grid, show)
    assert list(rows) == ["x1", "x2"] and len(rows["x2"]) == 2
    lines = table(rows).splitlines()
    assert lines[2].startswith("| x1 | 1 | 100 | 80.0 | 70.0 |")
    assert lines[3].startswith("| x2 | 2 | 200 | 83.0 +- 1.4 | 73.0 +- 1.4 |")
    # a baseline counts each seed once (seed 0 ran at two lengths); a gap is taken within each run
    assert "| linear rand | 2 | 75.0 +- 0.0 |" in lines and "| seg rand | 0 |  |" in lines
    assert "| x1 | 1 | -3.0 |  |  |  |  |" in lines and "| x2 | 2 | 0.0 +- 1.4 |  |  |  |  |" in lines
    assert lines[-2:] == ["| x2 | 0 | -1.0 |  |  |  |  |", "| x2 | 1 | 1.0 |  |  |  |  |"]  # and each run's own
    assert plot(rows, tmp_path / "curve.png").stat().st_size > 10_000


def test_a_study_names_its_runs_prefix_variant_seed_and_reads_the_names_back():
    """One matcher for `recipe_study --record` and `plot_curve`: a variant that prefixes another stays apart, the
    seed is a number (so seed 10 sorts after seed 2), any other name is not the study's."""
    from scripts.experiments import study_run
    from scripts.plot_curve import rows_by_variant

    variants = ["x1", "x10"]
    assert study_run("curve-x10-s2", "curve", variants) == ("x10", 2)
    assert study_run("curve-x1-s10", "curve", variants) == ("x1", 10)
    for other in ("curve-x1-s", "curve-x1-sa", "curve-x1-s0-old", "curve-x2-s0", "seeds-x1-s0", "curve-x1"):
        assert study_run(other, "curve", variants) is None, other
    runs = [("curve-x1-s10", 100, 0.80), ("curve-x1-s2", 100, 0.82), ("curve-x10-s0", 1000, 0.9)]
    rows = rows_by_variant({"prefix": "curve", "variants": {v: [] for v in variants}}, [_exp_commit(runs)])
    assert [r["seed"] for r in rows["x1"]] == [2, 10] and [r["seed"] for r in rows["x10"]] == [0]


def test_a_studys_record_stands_in_for_the_experiments_a_clone_lacks(tmp_path):
    """write_record keeps what `dvc exp show` gave of a finished experiment; with_record lists it after the live
    ones, in their shape, unless a finished experiment of the same name is live (that one wins)."""
    from scripts.experiments import finished, read_record, with_record, write_record
    from scripts.plot_curve import rows_by_variant

    grid = {"prefix": "curve", "variants": {"x1": [], "x2": []}}
    runs = [("curve-x1-s0", 100, 0.80), ("curve-x2-s0", 200, 0.82)]
    show = [_exp_commit(runs)]
    path = tmp_path / "study_curve.runs.json"
    live = {name: rev | {"rev": name[-5:], "stage_times": {"pretrain": 9.0}} for name, rev in finished(show)}
    write_record(path, live)
    assert read_record(path)["curve-x2-s0"]["baseline"] == "abc" and not list(tmp_path.glob(".*.tmp"))
    assert rows_by_variant(grid, with_record([], path)) == rows_by_variant(grid, show)  # a clone: the record alone
    rerun = [_exp_commit([("curve-x2-s0", 200, 0.90)], "def")]
    merged = dict(finished(with_record(rerun, path)))
    assert merged["curve-x2-s0"]["baseline"] == "def" and merged["curve-x1-s0"]["stage_times"] == {"pretrain": 9.0}
    write_record(path, {"curve-x2-s0": merged["curve-x2-s0"] | {"rev": "e2", "stage_times": {}}})  # replaces one
    assert {n: r["baseline"] for n, r in read_record(path).items()} == {"curve-x1-s0": "abc", "curve-x2-s0": "def"}
    path.write_text("[1, 2]")
    with pytest.raises(SystemExit, match=r"study_curve.runs.json: not a study record \(TypeError"):
        read_record(path)


def test_a_grid_whose_common_recipe_is_malformed_exits_with_one_line_naming_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("common: [finetune.epochs]\nvariants:\n  x: []\n")
    with pytest.raises(
        SystemExit, match=r"bad.yaml: common must be a list of key=value strings, got \['finetune.epochs'\]"
    ):
        load_grid(bad)
