#!/usr/bin/env python3
"""Writes "fresh" labelled iris data for the retraining example (standard library only).

    python3 examples/retrain/make_data.py --shift petal_length=1.76 > fresh.csv

Rows come from models/iris/reference.csv (the training data, in scikit-learn's order:
50 rows per species), with the given features shifted, plus a `species` label column.
In production this would be newly labelled data from a feature store.
"""
import argparse
import csv
import sys
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[2] / "models" / "iris" / "reference.csv"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shift", action="append", default=[], metavar="FEATURE=AMOUNT")
    args = ap.parse_args()
    with REFERENCE.open() as f:
        rows = list(csv.reader(f))
    header, data = rows[0], rows[1:]
    shifts = {}
    for s in args.shift:
        name, _, amount = s.partition("=")
        if name not in header:
            ap.error(f"unknown feature {name!r}; features: {', '.join(header)}")
        shifts[header.index(name)] = float(amount)
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(header + ["species"])
    for i, row in enumerate(data):
        values = [float(v) + shifts.get(j, 0.0) for j, v in enumerate(row)]
        out.writerow([f"{v:.2f}" for v in values] + [i // 50])
    return 0


if __name__ == "__main__":
    sys.exit(main())
