"""`facetrace validate`: run the validation flow, print its summary and the data docs' location.

Light at import time: Great Expectations and the flow load only when the verb runs.
"""

from __future__ import annotations

import argparse
import sys

from facetrace.cli.app import print_table, verb


def add_parsers(sub) -> None:
    p = sub.add_parser("validate", help="validate the catalog and its files (Great Expectations); "
                       "exit 1 on a critical failure")
    p.add_argument("--suite", action="append", choices=["catalog", "intake", "splits", "files", "predictions"],
                   help="run only this suite (repeatable; default all)")
    p.add_argument("--file-sample", type=int, metavar="N",
                   help="check N random files on disk (0 = all; default FACETRACE_VALIDATION_FILE_SAMPLE)")
    p.add_argument("--all", action="store_true", help="list passing expectations too (default: failures only)")


def print_summary(summary: dict, show_all: bool) -> None:
    rows = summary["rows"] if show_all else [r for r in summary["rows"] if r["result"] == "FAIL"]
    columns = ["suite", "severity", "expectation", "observed", "result"]
    passed = sum(r["result"] == "pass" for r in summary["rows"])
    title = f"validation: {passed} of {len(summary['rows'])} expectations passed"
    if rows:
        print_table(columns, [[r[c] for c in columns] for r in rows], title=title)
    else:
        print(title)
    for suite, info in summary["suites"].items():
        print(f"  {suite}: {'ok' if info['success'] else ('CRITICAL' if info['critical_failure'] else 'warnings')}"
              f"  ({info['statistics'].get('rows', 0)} rows)")
    print(f"data docs: {summary['data_docs'] or 'not built'}")


@verb("validate", runs_flows=True)
def cmd_validate(args: argparse.Namespace) -> int:
    from facetrace.flows.validate import CriticalValidationFailure, validate_catalog

    try:
        summary = validate_catalog(suites=args.suite, file_sample=args.file_sample)
    except CriticalValidationFailure as failure:
        print_summary(failure.summary, args.all)
        print(f"facetrace validate: {failure}", file=sys.stderr)
        return 1
    print_summary(summary, args.all)
    return 0
