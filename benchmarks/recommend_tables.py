"""Regenerate the measured tables `fewshot recommend` ships (src/fewshot/recommend_tables/measured.json) from
the recorded benchmark outputs in BENCHMARKS.md (fewshot.recommend.tables_from_markdown). Run it after
recording new results; tests/test_recommend.py fails while the two disagree.

usage: python benchmarks/recommend_tables.py [--check]
"""
from __future__ import annotations

import argparse
import sys

from common import ROOT

from fewshot.recommend import TABLES, shipped_tables, tables_from_markdown, write_tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only say whether the shipped tables are in sync")
    a = ap.parse_args()
    md = ROOT / "BENCHMARKS.md"
    fresh = tables_from_markdown(md.read_text())
    if a.check:
        same = fresh == shipped_tables()
        print("in sync" if same else f"out of sync: run python {sys.argv[0]}")
        sys.exit(0 if same else 1)
    n = write_tables(md)
    print(f"wrote {n} entries to {TABLES}")


if __name__ == "__main__":
    main()
