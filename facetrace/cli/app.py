"""The `facetrace` command line: each verb runs a flow or reads the catalog.

Start-up stays light: heavy modules (Prefect flows, TensorFlow, torch) are imported inside the verb
that needs them, so `facetrace --help`, `status` and `sql` never load TensorFlow or torch.
Exit status 0 on success; otherwise non-zero with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

VERBS: dict[str, Callable[[argparse.Namespace], int]] = {}
FLOW_VERBS: set[str] = set()  # verbs that run flows: they get a Prefect API first
PRECHECKS: dict[str, Callable[[argparse.Namespace], None]] = {}


def verb(name: str, *, runs_flows: bool = False, precheck: Callable[[argparse.Namespace], None] | None = None):
    """Register a verb's handler. ``runs_flows``: connect to a Prefect API before it runs, after
    ``precheck`` (cheap argument checks that must answer before any server starts)."""
    def register(fn: Callable[[argparse.Namespace], int]):
        VERBS[name] = fn
        if runs_flows:
            FLOW_VERBS.add(name)
        if precheck:
            PRECHECKS[name] = precheck
        return fn

    return register


def connect_prefect():
    """A context in which flows talk to the configured Prefect API or this data root's own server."""
    from facetrace.local_server import prefect_api
    from facetrace.settings import get_settings

    settings = get_settings()
    return prefect_api(settings.data_dir, enabled=settings.local_server, announce=announce_server)


def foreground(verb: str):
    """Flows this command runs in its own process skip Prefect's heartbeats (flows/common.py); `serve`
    hands its runs to Prefect's runner, which keeps them."""
    if verb == "serve":
        import contextlib

        return contextlib.nullcontext()
    from facetrace.flows.common import foreground_runs

    return foreground_runs()


def announce_server(state: dict) -> None:
    print(f"facetrace: started a Prefect server for this data root; UI at {state['ui_url']} "
          "(`facetrace server stop` stops it)", file=sys.stderr)


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


# ---------------------------------------------------------------- output helpers

# JSON numbers are IEEE doubles in most readers (JavaScript, jq): integers beyond 2^53 lose digits
# there, so they travel as strings. Everything else numeric stays a number.
JSON_SAFE_INTEGER = 2**53


def json_ready(value):
    """``value`` with JSON-safe types: numbers as numbers, big integers and unknown types as strings."""
    import datetime as dt
    import decimal
    import math

    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value) if abs(value) > JSON_SAFE_INTEGER else value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, decimal.Decimal):
        return json_ready(int(value)) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_ready(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return json_ready(value.item())
    return str(value)


def print_json(value) -> None:
    print(json.dumps(json_ready(value), indent=2))


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def print_table(columns: Sequence[str], rows: Sequence[Sequence], title: str | None = None, fmt: str = "table") -> None:
    """Rows as a table (default), CSV or JSON on stdout.

    A table never cuts a value: on a terminal long cells wrap; into a pipe or a file the table is as
    wide as its content (a terminal's width means nothing to ``cat`` or ``grep``).
    """
    if fmt == "json":
        print_json([dict(zip(columns, row)) for row in rows])
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
        table.add_column(str(column), overflow="fold")
    for row in rows:
        table.add_row(*[_cell(v) for v in row])
    if sys.stdout.isatty():
        console = Console()
    else:  # as wide as the content needs: rich measures the table, so this is an upper bound only
        console = Console(width=1_000_000, no_color=True, highlight=False, soft_wrap=True)
    console.print(table)


# ---------------------------------------------------------------- verbs

def check_ingest(args: argparse.Namespace) -> None:
    from facetrace.tasks.sources import check_source

    if args.kind in ("folder", "zip") and not args.path:
        raise CLIError(f"`facetrace ingest {args.kind}` needs a PATH")
    # Before any run starts: a missing path or missing Kaggle credentials is one line, not a failed run.
    check_source(args.kind, path=args.path if args.kind != "kaggle" else None,
                 slug=args.path if args.kind == "kaggle" else None)


@verb("ingest", runs_flows=True, precheck=check_ingest)
def cmd_ingest(args: argparse.Namespace) -> int:
    from facetrace.flows.ingest import ingest_faces

    if args.move_to and args.kind != "folder":
        raise CLIError("--move-to applies to `ingest folder` only")
    result = ingest_faces(kind=args.kind, path=args.path if args.kind != "kaggle" else None, label=args.label,
                          provenance=args.provenance, slug=args.path if args.kind == "kaggle" else None,
                          archive_dir=args.move_to)
    rows = [(k, result[k]) for k in ("seen", "new", "duplicate", "quarantined")]
    rows += [(f"quarantined: {r}", n) for r, n in result["quarantined_by_reason"].items()]
    rows += [(f"moved to {args.move_to}/{place}", n) for place, n in (result.get("moved") or {}).items() if n]
    print_table(["outcome", "files"], rows, title=f"ingest {args.kind} {result['source']}")
    if result["seen"] == 0:
        from facetrace.tasks.sources import IMAGE_SUFFIXES

        print(f"facetrace ingest: nothing to ingest: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) "
              f"in {result['source']}", file=sys.stderr)
        return 1
    if result["quarantined"] == result["seen"]:
        print(f"facetrace ingest: nothing catalogued: {nothing_catalogued(result['quarantined_by_reason'])}",
              file=sys.stderr)
        return 1
    return 0


# What to do about the usual reasons a whole source is quarantined (the others name a defect of the files).
QUARANTINE_HINTS = {
    "unknown_label": "pass --label real|synthetic or use Real/ and AI/ folders",
    "too_large": "raise FACETRACE_MAX_FILE_BYTES if these files are wanted",
    "decompression_bomb": "raise FACETRACE_MAX_IMAGE_PIXELS if these images are wanted",
    "too_small": "lower FACETRACE_MIN_IMAGE_SIDE if these images are wanted",
    "label_conflict": "the same pictures arrived with the other label: check the labels of this source",
}


def nothing_catalogued(by_reason: dict[str, int]) -> str:
    """One line: every file's quarantine reason, most common first, and the hint for the commonest."""
    ranked = sorted(by_reason.items(), key=lambda item: -item[1])
    line = f"all {sum(by_reason.values())} files quarantined (" + ", ".join(f"{r}: {n}" for r, n in ranked) + ")"
    hint = next((QUARANTINE_HINTS[r] for r, _ in ranked if r in QUARANTINE_HINTS), None)
    return f"{line}; {hint}" if hint else f"{line}; see `facetrace status`"


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


@verb("demo", runs_flows=True)
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
    from facetrace.tasks.store import ArtifactStore

    store = ArtifactStore.from_settings(settings)  # the catalog holds keys; print where they are
    docs = next((v.data_docs for v in validation if v.data_docs), None)
    if docs:
        site, found, _ = docs.partition("local_site")
        print(f"data docs: {store.url_for(site + found + '/index.html' if found else docs)}")
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
        print(f"champion: model {champion.id} ({champion.backbone}) at {store.url_for(champion.path)}")
        if champion.model_card:
            print(f"model card: {store.url_for(champion.model_card)}")
        from facetrace.tasks.registry import model_warnings

        for warning in model_warnings(champion.metrics):
            if warning.startswith("toy"):  # the confound audit has its own line above
                print(f"WARNING: {warning}")
    ft = shell_command()
    activate = Path(sys.executable).with_name("activate")
    print("\nWhere to look next" + ("" if ft == "facetrace" or not activate.exists() else
          f" (or first `source {shlex.quote(str(activate))}`, then plain `facetrace`)") + ":")
    if os.environ.get("FACETRACE_DATA_DIR"):
        print(f"  export FACETRACE_DATA_DIR={shlex.quote(str(root))}")
    print(f"""  {ft} status
  {ft} sql "SELECT * FROM images_by_source"
  {ft} sql "SELECT sha256, prompt, model_id, seed, steps FROM synthetic_images LIMIT 5"
  {ft} models
  {ft} predict path/to/face.jpg
  {ft} server status      # the Prefect UI with this demo's runs
  {ft} serve              # schedules: inbox scans, nightly validation, retraining on new faces
  reports and data docs: {root / 'reports'}  {root / 'validation'}""")
    from facetrace.local_server import configured_api_url, running_server

    api = configured_api_url()
    state = None if api else running_server(settings.data_dir)
    if state or api:
        print(f"  Prefect UI: {state['ui_url'] if state else api.removesuffix('/api')}")


def shell_command() -> str:
    """How to call this facetrace from the user's shell: plain `facetrace` when that is what PATH finds,
    else the virtual environment's script (relative to the current folder when under it)."""
    import shutil

    script = Path(sys.executable).with_name("facetrace")  # the venv's bin/, symlinks not resolved
    if not script.exists():
        return f"{shlex.quote(sys.executable)} -m facetrace.cli"
    found = shutil.which("facetrace")
    if found and Path(found).resolve() == script.resolve():
        return "facetrace"
    try:
        return shlex.quote(str(script.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(script))


def _fmt(value) -> str:
    return "" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


@verb("serve", runs_flows=True)
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
    add_global_flags(parser, top=True)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("ingest", help="ingest faces from a folder, zip, Kaggle dataset or the bundled sample")
    p.add_argument("kind", choices=["folder", "zip", "kaggle", "sample"])
    p.add_argument("path", nargs="?", help="folder or zip path; for kaggle the dataset slug "
                   "(default ashwingupta3012/human-faces)")
    p.add_argument("--label", choices=["real", "synthetic"], help="label for every file (default: from Real/ and AI/ folders)")
    p.add_argument("--provenance", metavar="CSV", help="CSV with columns prompt,image_name for synthetic images")
    p.add_argument("--move-to", metavar="DIR", help="folders only: move each catalogued file to DIR/processed/ and "
                   "each quarantined one to DIR/rejected/ (default: leave the folder untouched)")

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
    for subparser in sub.choices.values():
        add_global_flags(subparser, top=False)
    return parser


# Modules that add verbs: each defines add_parsers(sub) and registers handlers with @verb.
# They must stay light at import time (no TensorFlow, torch or diffusers).
VERB_MODULES: list[str] = ["facetrace.cli.prompts", "facetrace.cli.validate",
                           "facetrace.cli.synthesis", "facetrace.cli.train", "facetrace.cli.server",
                           "facetrace.cli.api"]


# Prefect's temporary server on a fresh PREFECT_HOME: its usage telemetry writes to the new SQLite
# database while migrations hold it, and on a loaded machine "database is locked" kills the server
# before the 20 s start-up timeout (seen on a first `facetrace ingest`). Both stay overridable.
PREFECT_DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
# Without --verbose, Prefect's console handler keeps quiet: a failed run's traceback (dozens of lines)
# still reaches the run log in the API and the UI, while the terminal gets the one-line reason.
QUIET_PREFECT = {"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL"}


def one_line(text: str) -> str:
    """A message on one line: a multi-line error (a server's log tail, say) joined with ' | '."""
    return " | ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "(no message)"


def add_global_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before or after the verb: `facetrace --verbose ingest ...` and `facetrace ingest ... -v`.
    parser.add_argument("-v", "--verbose", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show Prefect's logs and the full traceback of a failure")


def enable_crash_reports() -> None:
    """A crash in native code (a segfault in an extension module, say) prints every thread's Python
    stack on stderr before the process dies, instead of a bare exit status -11 with nothing said."""
    import faulthandler

    if sys.__stderr__ is not None and not faulthandler.is_enabled():
        faulthandler.enable(file=sys.__stderr__, all_threads=True)


def main(argv: Sequence[str] | None = None) -> int:
    enable_crash_reports()
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = args.verbose or os.environ.get("FACETRACE_DEBUG") == "1"
    wanted = {**PREFECT_DEFAULTS, **({} if verbose else QUIET_PREFECT)}
    added = {name: value for name, value in wanted.items() if name not in os.environ}
    os.environ.update(added)
    try:
        return run_verb(args, verbose)
    finally:  # called in-process (tests, scripts): leave the environment as it was
        for name in added:
            os.environ.pop(name, None)


def run_verb(args: argparse.Namespace, verbose: bool) -> int:
    try:
        if args.verb in PRECHECKS:
            PRECHECKS[args.verb](args)
        if args.verb not in FLOW_VERBS:
            return VERBS[args.verb](args)
        with connect_prefect(), foreground(args.verb):
            return VERBS[args.verb](args)
    except KeyboardInterrupt as exc:
        error, code, message = exc, 130, "interrupted"
    except BrokenPipeError:
        # The reader went away (`facetrace sql ... | head`): stop quietly, as Unix tools do. Point stdout
        # at /dev/null so the interpreter's final flush does not raise the same error again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the signal
    except CLIError as exc:
        error, code, message = exc, 2, str(exc)
    except (FileNotFoundError, PermissionError, ValueError) as exc:
        error, code, message = exc, 1, str(exc)
    except Exception as exc:  # noqa: BLE001 - one line for users; --verbose shows the traceback
        error, code, message = exc, 1, f"{type(exc).__name__}: {exc}"
    if verbose:
        import traceback

        traceback.print_exception(error)
    print(f"facetrace {args.verb}: {one_line(message)}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
