"""Is model B better than model A on the same rows? A paired comparison of two ``eval`` runs.

Two models scored on the same rows differ by a point or two again and again (the demo's recipes:
benchmarks/results/eval-demo-recipes-vm.md), and each score's own standard error (~0.9 points on
2,500 count rows) overstates the doubt, since both models get most rows right or wrong together.
What decides is the rows where exactly one of them is right: under "no difference" each such row
is equally likely to favour either model, so their split is Binomial(n, 1/2) (McNemar's exact
test, i.e. a two-sided sign test). Detection is scored over all rows at once, not per row, so it
is not compared here.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..errors import InputError
from .metrics import counted_label, row_right, row_task


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """``predictions.jsonl`` of ``fusar-edge eval`` (a file, or the run's ``--out`` folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "predictions.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected an `fusar-edge eval` output folder or its predictions.jsonl)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{line_no}: not a JSON row ({e.msg})") from None
            if not isinstance(row, dict) or "id" not in row or "gt" not in row or "question" not in row:
                raise InputError(f"{path}:{line_no}: expected a prediction row with id, question and gt")
            rows.append(row)
    return rows


def sign_test_p(wins_a: int, wins_b: int) -> float:
    """Two-sided exact p of a split ``wins_a`` : ``wins_b`` under Binomial(wins_a + wins_b, 1/2)."""
    n, k = wins_a + wins_b, min(wins_a, wins_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]], where_a: str = "A",
            where_b: str = "B") -> dict[str, dict[str, Any]]:
    """Per task (and per counted class for counting): rows, right in A, right in B, right only in A,
    right only in B, and the sign test's p. Rows are paired by ``id``; both runs must hold the same ids
    with the same ground truth."""
    a, b = _by_id(rows_a, where_a), _by_id(rows_b, where_b)
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        raise InputError(f"{where_a} and {where_b}: not the same rows ({len(set(a) - set(b))} ids only in {where_a}, "
                         f"{len(set(b) - set(a))} only in {where_b}; e.g. {only[0]!r}): evaluate both on one manifest")
    cells: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for row_id, ra in a.items():
        rb = b[row_id]
        if str(ra["gt"]) != str(rb["gt"]):
            raise InputError(f"{where_b}: row {row_id!r} has another ground truth than in {where_a} "
                             f"({rb['gt']!r} vs {ra['gt']!r}): evaluate both on one manifest")
        task = row_task(ra)
        right_a, right_b = row_right(task, ra), row_right(task, rb)
        if right_a is None:
            continue
        cells[task].append((right_a, right_b))
        if task == "count":
            cells[f"count: {counted_label(ra)}"].append((right_a, right_b))
    out = {}
    for key, pairs in sorted(cells.items()):
        only_a = sum(1 for x, y in pairs if x and not y)
        only_b = sum(1 for x, y in pairs if y and not x)
        n = len(pairs)
        out[key] = {"n": n, "a": sum(x for x, _ in pairs) / n, "b": sum(y for _, y in pairs) / n,
                    "only_a": only_a, "only_b": only_b, "p": sign_test_p(only_a, only_b)}
    return out


def _by_id(rows: list[dict[str, Any]], where: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["id"] in out:
            raise InputError(f"{where}: row id {row['id']!r} appears twice (expected one prediction per row)")
        out[row["id"]] = row
    return out


def markdown(result: dict[str, dict[str, Any]], name_a: str = "A", name_b: str = "B") -> str:
    lines = [f"| task | rows | {name_a} | {name_b} | right only in {name_a} | right only in {name_b} | sign test p |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, r in result.items():
        lines.append(f"| {key} | {r['n']} | {r['a']:.3f} | {r['b']:.3f} | {r['only_a']} | {r['only_b']} "
                     f"| {r['p']:.3g} |")
    return "\n".join(lines)
