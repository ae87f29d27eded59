"""`make bench`: every benchmark row, each a ratio against a baseline measured in the same run.

Each module ``bench/bench_*.py`` defines ``rows(workdir: Path) -> list[dict]`` returning rows of
``{name, value, unit, baseline, ratio, target}``. The table is printed and written to
``bench/latest.json`` (not committed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_modules(only: list[str] | None):
    for path in sorted(HERE.glob("bench_*.py")):
        if only and path.stem.removeprefix("bench_") not in only:
            continue
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield path.stem, module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("only", nargs="*", help="benchmark modules to run (e.g. ingest validate); default all")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    for name, module in load_modules(args.only):
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"facetrace-{name}-") as workdir:
            for row in module.rows(Path(workdir)):
                rows.append(row)
                print(f"  {row['name']}: {row['value']:.4g} {row['unit']} (ratio {row['ratio']:.3g})", file=sys.stderr)
        print(f"[{name}] {time.perf_counter() - started:.1f}s", file=sys.stderr)
    (HERE / "latest.json").write_text(json.dumps(rows, indent=2))
    from rich.console import Console
    from rich.table import Table

    table = Table(title="facetrace benchmarks (ratios measured in this run)")
    for column in ("name", "value", "unit", "baseline", "ratio", "target", "met"):
        table.add_column(column)
    for row in rows:
        met = "" if row.get("target") is None else ("yes" if row["ratio"] >= row["target"] else "NO")
        table.add_row(row["name"], f"{row['value']:.4g}", row["unit"], f"{row['baseline']:.4g}",
                      f"{row['ratio']:.3g}", "" if row.get("target") is None else f">= {row['target']}", met)
    Console(width=160).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
