"""The study scripts' tables, on rows as `scripts/seed_table.py` builds them from `dvc exp show --json`."""

from __future__ import annotations

from scripts.seed_table import COLUMNS, PROTOCOLS, table


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
