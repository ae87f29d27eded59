"""The `facetrace` command line: each verb runs a flow or reads the catalog.

Start-up stays light: heavy modules (Prefect flows, TensorFlow, torch) are imported inside the verb
that needs them, so `facetrace --help`, `status` and `sql` never load TensorFlow or torch.
Exit status 0 on success; otherwise non-zero with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

VERBS: dict[str, Callable[[argparse.Namespace], int]] = {}


def verb(name: str):
    def register(fn: Callable[[argparse.Namespace], int]):
        VERBS[name] = fn
        return fn

    return register


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


# ---------------------------------------------------------------- output helpers

def print_table(columns: Sequence[str], rows: Sequence[Sequence], title: str | None = None, fmt: str = "table") -> None:
    if fmt == "json":
        print(json.dumps([dict(zip(columns, row)) for row in rows], default=str, indent=2))
        return
    if fmt == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(str(column))
    for row in rows:
        table.add_row(*["" if v is None else str(v) for v in row])
    Console(width=max(120, Console().width)).print(table)


# ---------------------------------------------------------------- verbs

@verb("ingest")
def cmd_ingest(args: argparse.Namespace) -> int:
    from facetrace.flows.ingest import check_source, ingest_faces

    if args.kind in ("folder", "zip") and not args.path:
        raise CLIError(f"`facetrace ingest {args.kind}` needs a PATH")
    # Before any run starts: a missing path or missing Kaggle credentials is one line, not a failed run.
    check_source(args.kind, path=args.path if args.kind != "kaggle" else None,
                 slug=args.path if args.kind == "kaggle" else None)
    result = ingest_faces(kind=args.kind, path=args.path if args.kind != "kaggle" else None, label=args.label,
                          provenance=args.provenance, slug=args.path if args.kind == "kaggle" else None)
    rows = [(k, result[k]) for k in ("seen", "new", "duplicate", "quarantined")]
    rows += [(f"quarantined: {r}", n) for r, n in result["quarantined_by_reason"].items()]
    print_table(["outcome", "files"], rows, title=f"ingest {args.kind} {result['source']}")
    return 0


@verb("status")
def cmd_status(args: argparse.Namespace) -> int:
    from facetrace.db.catalog import status_counts
    from facetrace.db.engine import get_engine, session_scope
    from facetrace.settings import get_settings

    settings = get_settings()
    with session_scope(get_engine(settings.catalog_url)) as session:
        counts = status_counts(session)
    print(f"catalog: {settings.catalog_url}\ndata root: {settings.data_dir.resolve()}\n"
          f"artifact store: {settings.store_url or settings.data_dir.resolve()}")
    print_table(["label", "status", "images"], counts["by_label"], title="images by label")
    print_table(["source kind", "source", "label", "images"], counts["by_source"], title="images by source")
    print_table(["reason", "files"], counts["rejected"], title="quarantined files")
    return 0


@verb("sql")
def cmd_sql(args: argparse.Namespace) -> int:
    from facetrace.db.readonly import ReadOnlyViolation, run_readonly
    from facetrace.settings import get_settings

    try:
        columns, rows = run_readonly(get_settings().catalog_url, args.query)
    except ReadOnlyViolation as exc:
        raise CLIError(str(exc)) from None
    print_table(columns, rows, fmt=args.format)
    return 0


@verb("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    import time

    from facetrace.flows.pipeline import facetrace_pipeline

    started = time.perf_counter()
    facetrace_pipeline(faces=args.faces, epochs=args.epochs, synthetic_count=args.synthetic)
    print_demo_summary(time.perf_counter() - started)
    return 0


def print_demo_summary(elapsed_s: float) -> None:
    from sqlalchemy import select

    from facetrace.db.catalog import status_counts
    from facetrace.db.engine import get_engine, session_scope
    from facetrace.db.models import Model, ValidationRun
    from facetrace.settings import get_settings

    settings = get_settings()
    with session_scope(get_engine(settings.catalog_url)) as session:
        counts = status_counts(session)
        validation = session.scalars(select(ValidationRun).order_by(ValidationRun.id.desc()).limit(3)).all()
        models = session.scalars(select(Model).order_by(Model.id)).all()
    root = settings.data_dir.resolve()
    print(f"\nfacetrace demo finished in {elapsed_s:.0f} s. Data root: {root}")
    print_table(["source kind", "source", "label", "images"], counts["by_source"], title="images by label and source")
    print_table(["suite", "success", "critical failure"],
                [(v.suite, v.success, v.critical_failure) for v in validation], title="validation (latest run)")
    docs = next((v.data_docs for v in validation if v.data_docs), None)
    if docs:
        site, found, _ = docs.partition("local_site")
        from facetrace.tasks.store import ArtifactStore

        print(f"data docs: {ArtifactStore.from_settings(settings).url_for(site + found + '/index.html' if found else docs)}")
    metric_names = ("roc_auc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "accuracy", "f1", "ece")
    rows = []
    for m in models:
        test = (m.metrics or {}).get("test", {})
        rows.append((m.id, m.backbone, m.stage, *[_fmt(test.get(k)) for k in metric_names], _fmt(m.threshold)))
    print_table(["id", "backbone", "stage", *metric_names, "threshold"], rows, title="models (metrics on the test split)")
    audit = next(((m.metrics or {}).get("confound_audit") for m in reversed(models) if m.metrics), None)
    if audit and audit.get("roc_auc") is not None:
        print(f"confound audit: a classifier on file metadata alone reaches ROC AUC {audit['roc_auc']:.3f}"
              + (" -- WARNING: the classes can be told apart without looking at faces" if audit.get("warning") else ""))
    champion = next((m for m in models if m.stage == "champion"), None)
    if champion:
        print(f"champion: model {champion.id} ({champion.backbone}) at {champion.path}")
        if champion.model_card:
            print(f"model card: {champion.model_card}")
    print(f"""
Where to look next:
  facetrace status
  facetrace sql "SELECT * FROM images_by_source"
  facetrace sql "SELECT sha256, prompt, model_id, seed, steps FROM synthetic_images LIMIT 5"
  facetrace sql "SELECT id, backbone, stage, metrics FROM models" --format json
  facetrace predict path/to/face.jpg
  reports and data docs: {root / 'reports'}  {root / 'validation'}
  Prefect UI: `prefect server start`, open http://127.0.0.1:4200, then
              `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api` and `facetrace serve`.""")


def _fmt(value) -> str:
    return "" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


@verb("serve")
def cmd_serve(args: argparse.Namespace) -> int:
    from facetrace.deployments.serve import main as serve_main

    serve_main()
    return 0


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facetrace",
        description="Build and maintain detectors of AI-generated face images. "
        "Settings: FACETRACE_DATA_DIR (data root, default ./data), FACETRACE_DB_URL (catalog URL).",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("ingest", help="ingest faces from a folder, zip, Kaggle dataset or the bundled sample")
    p.add_argument("kind", choices=["folder", "zip", "kaggle", "sample"])
    p.add_argument("path", nargs="?", help="folder or zip path; for kaggle the dataset slug "
                   "(default ashwingupta3012/human-faces)")
    p.add_argument("--label", choices=["real", "synthetic"], help="label for every file (default: from Real/ and AI/ folders)")
    p.add_argument("--provenance", metavar="CSV", help="CSV with columns prompt,image_name for synthetic images")

    sub.add_parser("status", help="catalog counts by label, source and status")

    p = sub.add_parser("sql", help="run a read-only SQL query on the catalog")
    p.add_argument("query")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")

    import importlib

    for module in VERB_MODULES:
        importlib.import_module(module).add_parsers(sub)

    p = sub.add_parser("demo", help="run the whole pipeline offline on the embedded defaults, then summarise")
    p.add_argument("--faces", metavar="PATH", help="a folder (or zip) of your own real faces instead of the sample")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--synthetic", type=int, default=None, help="synthetic faces to generate (default: as many as real)")

    sub.add_parser("serve", help="serve all deployments (schedules, event-triggered retraining) from one process")
    return parser


# Modules that add verbs: each defines add_parsers(sub) and registers handlers with @verb.
# They must stay light at import time (no TensorFlow, torch or diffusers).
VERB_MODULES: list[str] = ["facetrace.cli.prompts", "facetrace.cli.validate",
                           "facetrace.cli.synthesis", "facetrace.cli.train"]


# Prefect's temporary server on a fresh PREFECT_HOME: its usage telemetry writes to the new SQLite
# database while migrations hold it, and on a loaded machine "database is locked" kills the server
# before the 20 s start-up timeout (seen on a first `facetrace ingest`). Both stay overridable.
PREFECT_DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def main(argv: Sequence[str] | None = None) -> int:
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return VERBS[args.verb](args)
    except CLIError as exc:
        print(f"facetrace {args.verb}: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, ValueError) as exc:
        print(f"facetrace {args.verb}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"facetrace {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for users; FACETRACE_DEBUG=1 shows the traceback
        if os.environ.get("FACETRACE_DEBUG") == "1":
            raise
        print(f"facetrace {args.verb}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
