"""Two `fusar-edge eval` runs on the same rows, compared row by row: is B better than A?

    python benchmarks/compare_evals.py runs/shipped-eval runs/new-eval [--names shipped new] [--json]

Prints, per task and per counted class, each run's score, the rows only one of them gets right,
and the exact sign test's p on those rows (fusar_edge/evaluate/paired.py says why that, and not
the two scores' own error bars, decides). Detection is scored over all rows at once and is left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusar_edge.errors import InputError  # noqa: E402
from fusar_edge.evaluate.paired import compare, markdown, read_predictions  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="the baseline: an eval --out folder or its predictions.jsonl")
    p.add_argument("b", type=Path, help="the candidate, evaluated on the same manifest")
    p.add_argument("--names", nargs=2, metavar=("A", "B"), help="column names (default: A and B)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    a = p.parse_args(argv)
    name_a, name_b = a.names or ("A", "B")
    try:
        result = compare(read_predictions(a.a), read_predictions(a.b), where_a=str(a.a), where_b=str(a.b))
    except InputError as e:
        print(f"compare_evals: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if a.json else markdown(result, name_a, name_b))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
