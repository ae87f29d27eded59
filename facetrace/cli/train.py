"""`facetrace train`, `facetrace models` and `facetrace predict`.

Light at import time: Prefect flows and TensorFlow load only inside the verb that needs them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facetrace.cli.app import CLIError, print_json, print_table, verb
from facetrace.tasks.sources import IMAGE_SUFFIXES



def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train and evaluate detectors on a leakage-safe snapshot; register the best")
    p.add_argument("--backbones", default="mobilenet_v2,xception",
                   help="comma-separated: mobilenet_v2, xception (default both)")
    p.add_argument("--epochs", type=int, help="epochs per backbone (default: each backbone's tuned default)")
    p.add_argument("--image-size", type=int, metavar="PX",
                   help="input size for every backbone, raised to a backbone's minimum "
                        "(default FACETRACE_IMAGE_SIZE)")
    p.add_argument("--seed", type=int, default=0, help="split and initialisation seed")
    p.add_argument("--time-budget", type=float, metavar="S",
                   help="wall-clock budget for all fits (default FACETRACE_TRAIN_TIME_BUDGET_S; 0 = none)")

    p = sub.add_parser("weights", help="fetch the backbones' ImageNet weights into the cache (for a later offline run)")
    p.add_argument("action", choices=["fetch"], help="fetch: from FACETRACE_WEIGHTS_MIRROR or Keras' origin")
    p.add_argument("--backbones", default="mobilenet_v2,xception",
                   help="comma-separated: mobilenet_v2, xception (default both)")
    p.add_argument("--image-size", type=int, metavar="PX",
                   help="the input size training will use (MobileNetV2's file depends on it; default FACETRACE_IMAGE_SIZE)")

    p = sub.add_parser("models", help="the model registry: candidates, champion, archived")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")

    p = sub.add_parser("predict", help="P(synthetic) and a decision per image, with the champion or a given model")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--model", default="champion", help="'champion' (default) or a model id from `facetrace models`")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--batch-size", type=int, default=32)


def _backbones(text: str) -> list[str]:
    from facetrace.tasks.training import BACKBONES

    backbones = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in backbones if b not in BACKBONES]
    if unknown or not backbones:
        raise CLIError(f"unknown backbone(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(BACKBONES)}")
    return backbones


@verb("weights")
def cmd_weights(args: argparse.Namespace) -> int:
    from facetrace.settings import get_settings
    from facetrace.tasks.training import backbone_spec
    from facetrace.tasks.weights import WeightsUnavailable, fetch_from_settings

    settings = get_settings()
    rows, failed = [], []
    for backbone in _backbones(args.backbones):
        size = max(args.image_size or settings.image_size, backbone_spec(backbone).min_size)
        try:
            found = fetch_from_settings(backbone, size)
        except WeightsUnavailable as exc:
            failed.append(f"{backbone}: {exc}")
            continue
        rows.append((backbone, found.name, found.sha256, "yes" if found.hash_checked else "no (Keras pins none)",
                     found.path))
    if rows:
        print_table(["backbone", "file", "sha256", "keras hash checked", "cached at"], rows,
                    title=f"ImageNet weights (from {settings.weights_mirror or 'Keras origin'})")
    if failed:
        raise CLIError("; ".join(failed))
    return 0


@verb("train", runs_flows=True)
def cmd_train(args: argparse.Namespace) -> int:
    from facetrace.flows.train import train_and_evaluate

    backbones = _backbones(args.backbones)
    if args.epochs is not None and args.epochs < 1:
        raise CLIError("--epochs must be at least 1")
    try:
        result = train_and_evaluate(backbones=tuple(backbones), epochs=args.epochs, image_size=args.image_size,
                                    seed=args.seed, time_budget_s=args.time_budget)
    except Exception as exc:
        if type(exc).__name__ == "CatalogInvalid":  # the validation gate refused the catalog
            raise CLIError(str(exc)) from None
        raise
    rows = []
    for backbone, m in result["models"].items():
        test = m["test"]
        rows.append((m["id"], backbone, m["version"], m["stage"], _f(test.get("roc_auc")),
                     _f(test.get("tpr_at_5pct_fpr")), _f(test.get("accuracy")), _f(m["threshold"]),
                     f"{m['seconds']:.0f}"))
    print_table(["id", "backbone", "version", "stage", "roc_auc", "tpr@5%fpr", "accuracy", "threshold", "train s"],
                rows, title=f"trained on snapshot {result['snapshot_id']}")
    print(f"registry: best candidate {result['best']} -> {'champion' if result['promoted'] else 'candidate'} "
          f"({result['decision']})")
    confound = result["confound_audit"]
    if confound.get("warning"):
        print(f"WARNING: file metadata alone separates the classes (ROC AUC {confound['roc_auc']:.3f}); "
              "see the model card", file=sys.stderr)
    return 0


def _f(value) -> str:
    return "" if value is None else f"{float(value):.4f}"


@verb("models")
def cmd_models(args: argparse.Namespace) -> int:
    from facetrace.db.engine import get_engine, session_scope
    from facetrace.settings import get_settings
    from facetrace.tasks.registry import registry_rows

    with session_scope(get_engine(get_settings().catalog_url)) as session:
        columns, rows = registry_rows(session, wide=args.format != "table")
    if not rows and args.format == "table":
        print("no models yet; run `facetrace train`")
        return 0
    print_table(columns, rows, title="model registry", fmt=args.format)
    return 0


def expand_paths(paths: list[str]) -> list[str]:
    """Files as given; folders replaced by the image files under them (sorted)."""
    out: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CLIError(f"{raw} holds no image files")
            out += found
        else:
            out.append(raw)
    return out


@verb("predict")
def cmd_predict(args: argparse.Namespace) -> int:
    from facetrace.db.engine import get_engine, session_scope
    from facetrace.settings import get_settings
    from facetrace.tasks.registry import model_warnings, resolve_model, serving_info

    settings = get_settings()
    paths = expand_paths(args.paths)
    if args.batch_size < 1:
        raise CLIError("--batch-size must be at least 1")
    with session_scope(get_engine(settings.catalog_url)) as session:
        try:
            row = resolve_model(session, args.model)
        except LookupError as exc:
            raise CLIError(str(exc)) from None
        model_info = serving_info(row) | {"warnings": model_warnings(row.metrics)}
    for warning in model_info["warnings"]:  # before loading TensorFlow: seen even if the user stops here
        print(f"facetrace predict: warning: model {model_info['id']}: {warning}", file=sys.stderr)

    from facetrace.tasks.prediction import predict_files
    from facetrace.tasks.training import TrainConfig, load_model

    model = load_model(model_info["path"], model_info["sha256"])
    config = TrainConfig.from_hyperparameters(model_info["hyperparameters"])
    predictions = predict_files(model, config.preprocess, model_info["threshold"], paths, batch_size=args.batch_size,
                                max_bytes=settings.max_file_bytes, max_pixels=settings.max_image_pixels,
                                threads=settings.train_threads, flip=config.test_time_flip)
    failed = [p for p in predictions if p.error]
    label = f"{model_info['backbone']} v{model_info['version']} (model {model_info['id']})"
    if args.format == "json":
        print_json({"model": {k: model_info[k] for k in ("id", "backbone", "version", "threshold", "warnings")},
                    "predictions": [{"path": p.path, "probability": p.probability, "decision": p.decision,
                                     "error": p.error} for p in predictions]})
    else:
        print_table(["path", "p(synthetic)", "decision", "error"],
                    [(p.path, "" if p.probability is None else f"{p.probability:.4f}", p.decision or "ERROR",
                      p.error or "") for p in predictions],
                    title=f"predictions by {label}, threshold {model_info['threshold']:.4f}")
    for p in failed:
        print(f"facetrace predict: {p.path}: {p.error}", file=sys.stderr)
    return 1 if failed else 0
