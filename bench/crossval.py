"""Grouped K-fold cross-validation of the training defaults on the current catalog.

Folds are whole groups (exact duplicates, perceptual near-duplicates and shared prompts together),
stratified by label, exactly as the training snapshot splits them. Each fold is the test set once;
the rest is split again by group into train and validation (early stopping and threshold). Scores
of all folds are pooled for the headline ROC AUC and TPR at 5% FPR; per-fold mean and spread are
shown beside them, with the wall time of each fit.

    FACETRACE_DATA_DIR=/tmp/dev .venv/bin/python bench/crossval.py --folds 5 --seeds 0,1,2 [--backbones ...]

Every seed draws its own folds and initialisation. Per seed and fold it records ROC AUC, TPR at 1% and
5% FPR, and the realised test FPR at the threshold a registered model would get (the operating-point
rule of the settings, on the validation scores with the test-time flip), beside the target; then mean
and sd over the seeds, and the realised FPR pooled over every fold and seed (false positives over real
test faces, with its exact 95% interval: what says whether the rule holds). ``--members K`` fits each
backbone K times per fold from K initialisations, so the ensemble row of one backbone is a deep
ensemble of it, paired against each of its fits. Writes the tables to
stdout and a JSON record (``--out``, default ``bench/out/crossval.json``, not committed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facetrace.tasks.training import ENSEMBLE  # noqa: E402  (the registry's name for the backbones' mean)


def _release_memory() -> None:
    """Each fold builds a new graph; without this the process grows by hundreds of MB per fit."""
    import gc

    import keras

    keras.backend.clear_session()
    gc.collect()


def report(record: dict, out: str | None) -> None:
    """Print the table (with the ensemble row when several backbones ran) and write the JSON record."""
    from facetrace.tasks.evaluation import binary_metrics

    results, y = record["results"], np.array(record["labels"])
    if len(results) > 1:
        # The mean probability of every backbone (each with the test-time flip): the ensemble candidate.
        both = np.mean([(np.array(r["scores"]) + np.array(r["mirrored_scores"])) / 2 for r in results.values()],
                       axis=0)
        done = ~np.isnan(both)
        m = binary_metrics(y[done], both[done], 0.5)
        record["ensemble"] = {k: m[k] for k in ("roc_auc", "tpr_at_5pct_fpr", "tpr_at_1pct_fpr")}
    print(f"\nGrouped {record['folds']}-fold cross-validation on {record['images']} images "
          f"({record['seconds']:.0f} s in all)\n")
    print("| backbone | px | pooled ROC AUC | pooled TPR@5%FPR | pooled TPR@1%FPR | with test-time flip: ROC AUC "
          "/ TPR@5%FPR | fold ROC AUC mean ± sd | fold acc. at val threshold | s per fit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for backbone, r in results.items():
        print(f"| {backbone} | {r['config']['preprocess']['image_size']} | {r['pooled_roc_auc']:.3f} | "
              f"{r['pooled_tpr_at_5pct_fpr']:.3f} | {r['pooled_tpr_at_1pct_fpr']:.3f} | "
              f"{r['flip_roc_auc']:.3f} / {r['flip_tpr_at_5pct_fpr']:.3f} | "
              f"{r['mean_roc_auc']:.3f} ± {r['sd_roc_auc']:.3f} | {r['mean_accuracy_at_threshold']:.3f} | "
              f"{r['seconds_per_fit']:.0f} |")
    if record.get("ensemble"):
        e = record["ensemble"]
        print(f"| ensemble (mean, with flip) | | | | | {e['roc_auc']:.3f} / {e['tpr_at_5pct_fpr']:.3f} "
              f"(TPR@1% {e['tpr_at_1pct_fpr']:.3f}) | | | |")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(record, indent=2, default=float))


SPREAD_METRICS = ("roc_auc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "realised_fpr")
# The same metrics with every test-time view averaged (--test-time-views), where a run recorded them.
VIEW_METRICS = tuple(f"views_{k}" for k in SPREAD_METRICS)
# Realised test FPRs of the other thresholds, where a run recorded them (--threshold-holdout).
FPR_COLUMNS = {"realised_fpr": "validation split, settings' rule",
               "realised_fpr_empirical_rule": "validation split, empirical rule",
               "realised_fpr_holdout": "held-out share, settings' rule",
               "realised_fpr_holdout_empirical_rule": "held-out share, empirical rule"}


def score_fold(fold: int, val_y: np.ndarray, val_scores: np.ndarray, test_y: np.ndarray, test_scores: np.ndarray,
               target_fpr: float, rule: str) -> dict:
    """One fold's record from its registered validation and test scores: the threshold the rule sets on
    the validation scores (and the empirical rule's), the test metrics at it, and the scores themselves,
    kept so that other threshold rules can be scored later without refitting."""
    from facetrace.tasks.evaluation import binary_metrics
    from facetrace.tasks.registry import operating_point

    val_y, test_y = np.asarray(val_y), np.asarray(test_y)
    val_scores, test_scores = np.asarray(val_scores), np.asarray(test_scores)
    point = operating_point(val_y, val_scores, target_fpr, rule)
    empirical = operating_point(val_y, val_scores, target_fpr, "empirical")
    m = binary_metrics(test_y, test_scores, point["threshold"])
    return {"fold": fold, "roc_auc": m["roc_auc"], "tpr_at_1pct_fpr": m["tpr_at_1pct_fpr"],
            "tpr_at_5pct_fpr": m["tpr_at_5pct_fpr"], "accuracy": m["accuracy"],
            "threshold": point["threshold"], "threshold_rule": point["rule"], "target_fpr": target_fpr,
            "realised_fpr": m["fpr"], "expected_fpr_interval": point["fpr_interval"],
            "validation_reals": point["real_faces"], "test_reals": int(len(test_y) - test_y.sum()),
            "realised_fpr_empirical_rule": binary_metrics(test_y, test_scores, empirical["threshold"])["fpr"],
            "validation_labels": val_y.astype(int).tolist(), "validation_scores": val_scores.tolist(),
            "test_labels": test_y.astype(int).tolist(), "test_scores": test_scores.tolist()}


def ensemble_folds(backbone_folds: list[list[dict]]) -> list[dict]:
    """The ensemble candidate's folds, scored as the registry judges it: per fold, the mean of the
    backbones' registered scores (each with the test-time flip), the threshold set by the same rule on
    their mean validation scores, and the test metrics at it. Only folds every backbone ran."""
    by_fold = [{f["fold"]: f for f in folds} for folds in backbone_folds]
    out = []
    for fold in sorted(set.intersection(*(set(b) for b in by_fold))):
        members = [b[fold] for b in by_fold]
        first = members[0]
        if any(m["validation_labels"] != first["validation_labels"] or m["test_labels"] != first["test_labels"]
               for m in members[1:]):
            raise ValueError(f"fold {fold}: the backbones were not scored on the same images")
        out.append(score_fold(fold, first["validation_labels"], np.mean([m["validation_scores"] for m in members], axis=0),
                              first["test_labels"], np.mean([m["test_scores"] for m in members], axis=0),
                              first["target_fpr"], first["threshold_rule"]))
    return out


def fold_results(record: dict) -> dict[str, list[dict]]:
    """Per backbone its folds; with two or more backbones that kept their scores, the ensemble's too."""
    per = {backbone: r["per_fold"] for backbone, r in record["results"].items()}
    kept = [folds for folds in per.values() if folds and all("test_scores" in f for f in folds)]
    if len(kept) > 1 and len(kept) == len(per):
        per[ENSEMBLE] = ensemble_folds(kept)
    return per


def _recorded(per_record: list[dict[str, list[dict]]], backbone: str) -> list[str]:
    """The spread metrics and FPR columns every fold of every seed has."""
    folds = [f for folds in per_record for f in folds[backbone]]
    return [k for k in dict.fromkeys([*SPREAD_METRICS, *FPR_COLUMNS, *VIEW_METRICS]) if all(k in f for f in folds)]


def seed_summary(records: list[dict], per_record: list[dict[str, list[dict]]] | None = None) -> dict[str, dict]:
    """Per backbone: each seed's fold means of the spread metrics (and of every recorded realised FPR),
    how many folds went over the target at each threshold, and their mean and sd over seeds.
    ``per_record``: :func:`fold_results` of each record, where the caller has them already."""
    per_record = per_record or [fold_results(record) for record in records]
    summary: dict[str, dict] = {}
    for backbone in per_record[0]:
        metrics = _recorded(per_record, backbone)
        fprs = [k for k in metrics if k in FPR_COLUMNS]
        per_seed = []
        for record, results in zip(records, per_record):
            folds = results[backbone]
            per_seed.append({"seed": record.get("seed"),
                             **{k: float(np.nanmean([f[k] for f in folds])) for k in metrics},
                             "target_fpr": folds[0]["target_fpr"], "threshold_rule": folds[0]["threshold_rule"],
                             "folds_over_target": sum(f["realised_fpr"] > f["target_fpr"] for f in folds),
                             "over_target": {k: sum(f[k] > f["target_fpr"] for f in folds) for k in fprs},
                             "folds": len(folds)})
        summary[backbone] = {"per_seed": per_seed, **{
            k: {"mean": float(np.mean([s[k] for s in per_seed])),
                "sd": float(np.std([s[k] for s in per_seed], ddof=1)) if len(per_seed) > 1 else float("nan")}
            for k in metrics}}
        summary[backbone]["pooled_fpr"] = {
            k: pooled_fpr([f for results in per_record for f in results[backbone]], k) for k in fprs}
    return summary


def pooled_fpr(folds: list[dict], key: str = "realised_fpr") -> dict:
    """The false positives at one recorded threshold (``key``: the registered one by default) summed over
    folds (and seeds), over the real test faces they rest on, with the exact 95% interval of the rate and
    the target against it. Each fold's count is its realised FPR times its real test faces (exact: the
    rate was that count over them). One fold's ~50 real faces cannot tell a rule that holds from one that
    does not (a rule whose true FPR is exactly the target goes over it in about half the folds); the
    pooled count can."""
    from facetrace.tasks.registry import clopper_pearson

    false_positives = sum(round(f[key] * f["test_reals"]) for f in folds)
    reals = sum(f["test_reals"] for f in folds)
    target = folds[0]["target_fpr"]
    lower, upper = clopper_pearson(false_positives, reals)
    verdict = "over the target" if lower > target else "under the target" if upper < target else "consistent with it"
    return {"false_positives": false_positives, "reals": reals, "rate": false_positives / reals if reals else float("nan"),
            "interval": [lower, upper], "target_fpr": target, "verdict": verdict}


def report_seeds(records: list[dict], out: str | None) -> None:
    """Per fold (every seed) and mean ± sd over seeds of fold-mean ROC AUC, TPR at 1% and 5% FPR and
    the realised FPR at the registered threshold (and at every other recorded threshold); writes every
    seed's record and the summary."""
    per_record = [fold_results(record) for record in records]
    summary = seed_summary(records, per_record)
    print(f"\nPer fold ({len(records)} seeds): realised test FPR at the registered threshold vs the target\n")
    for backbone in summary:
        extra = [k for k in _recorded(per_record, backbone) if k in FPR_COLUMNS and k != "realised_fpr"]
        print("| backbone | seed | fold | test reals | ROC AUC | TPR@1%FPR | TPR@5%FPR | threshold rule | realised FPR "
              "| expected FPR (95%) | target | " + " | ".join(f"realised FPR, {FPR_COLUMNS[k]}" for k in extra) + " |")
        print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|" + "---:|" * len(extra))
        for record, results in zip(records, per_record):
            for f in results[backbone]:
                lo, hi = f["expected_fpr_interval"]
                print(f"| {backbone} | {record.get('seed')} | {f['fold']} | {f['test_reals']} | {f['roc_auc']:.3f} | "
                      f"{f['tpr_at_1pct_fpr']:.3f} | {f['tpr_at_5pct_fpr']:.3f} | {f['threshold_rule']} | "
                      f"{f['realised_fpr']:.3f} | {lo:.3f}-{hi:.3f} | {f['target_fpr']:.2f} | "
                      + " | ".join(f"{f[k]:.3f}" for k in extra) + " |")
    print(f"\nMean ± sd over seeds {', '.join(str(r.get('seed')) for r in records)} (each seed: the mean over "
          "its folds)\n")
    print("| backbone | ROC AUC | TPR@1%FPR | TPR@5%FPR | realised FPR at registered threshold | folds over target |")
    print("|---|---:|---:|---:|---:|---:|")
    for backbone, b in summary.items():
        over = sum(s["folds_over_target"] for s in b["per_seed"])
        total = sum(s["folds"] for s in b["per_seed"])
        print(f"| {backbone} | " + " | ".join(f"{b[k]['mean']:.3f} ± {b[k]['sd']:.3f}" for k in SPREAD_METRICS)
              + f" | {over} of {total} |")
    print("\nRealised test FPR pooled over every fold and seed: false positives / real test faces, the exact 95% "
          "interval, and the target against it\n")
    print("| backbone | threshold from | false positives / reals | realised FPR (95%) | target |\n|---|---|---:|---:|---|")
    for backbone, b in summary.items():
        for k, p in b["pooled_fpr"].items():
            lo, hi = p["interval"]
            print(f"| {backbone} | {FPR_COLUMNS[k]} | {p['false_positives']} / {p['reals']} | {p['rate']:.3f} "
                  f"({lo:.3f}-{hi:.3f}) | {p['target_fpr']:.2f}: {p['verdict']} |")
    for backbone, b in summary.items():
        fprs = [k for k in FPR_COLUMNS if k in b]
        if len(fprs) > 1:
            total = sum(s["folds"] for s in b["per_seed"])
            print(f"\n{backbone}: realised test FPR by where the threshold came from (target "
                  f"{b['per_seed'][0]['target_fpr']:.2f}; mean ± sd over seeds)\n")
            print("| threshold from | realised FPR | folds over target |\n|---|---:|---:|")
            for k in fprs:
                over = sum(s["over_target"][k] for s in b["per_seed"])
                print(f"| {FPR_COLUMNS[k]} | {b[k]['mean']:.3f} ± {b[k]['sd']:.3f} | {over} of {total} |")
    for backbone, b in summary.items():
        if all(k in b for k in VIEW_METRICS):
            folds = [f for results in per_record for f in results[backbone]]
            views = len(folds[0]["test_view_scores"])
            print_paired(f"{backbone}: image + mirror image (registered) vs {views} test-time views averaged, same "
                         "models; each with its own threshold from the validation split",
                         ("registered", "views"), b, {k: b[f"views_{k}"] for k in SPREAD_METRICS},
                         [(f, {k: f[f"views_{k}"] for k in SPREAD_METRICS}) for f in folds])
    if ENSEMBLE in summary:
        for backbone in [b for b in summary if b != ENSEMBLE]:
            pairs = [(f, ensembles[f["fold"]]) for results in per_record
                     for ensembles in [{e["fold"]: e for e in results[ENSEMBLE]}]
                     for f in results[backbone] if f["fold"] in ensembles]
            print_paired(f"{backbone} alone vs the ensemble of every backbone, the same fits; each with its own "
                         "threshold from the validation split", (backbone, ENSEMBLE), summary[backbone],
                         summary[ENSEMBLE], pairs)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"seeds": records, "summary": summary}, indent=2, default=float))


def print_paired(title: str, names: tuple[str, str], first: dict, second: dict,
                 pairs: list[tuple[dict, dict]]) -> None:
    """Two ways of scoring compared on the same folds (a paired comparison): each one's mean ± sd over
    seeds, and the per-fold difference (second minus first) with how many folds it favoured each way."""
    print(f"\n{title}\n")
    print(f"| metric | {names[0]} | {names[1]} | per-fold difference, mean [min, max] | folds better / worse |\n"
          "|---|---:|---:|---:|---:|")
    for k in SPREAD_METRICS:
        diff = np.array([b[k] - a[k] for a, b in pairs])
        # A lower realised FPR is better; every other metric higher.
        better, worse = (int((diff < 0).sum()), int((diff > 0).sum())) if k == "realised_fpr" else \
            (int((diff > 0).sum()), int((diff < 0).sum()))
        print(f"| {k} | {first[k]['mean']:.3f} ± {first[k]['sd']:.3f} | {second[k]['mean']:.3f} ± "
              f"{second[k]['sd']:.3f} | {diff.mean():+.3f} [{diff.min():+.3f}, {diff.max():+.3f}] | "
              f"{better} / {worse} |")


def combine(files: list[str], out: str | None) -> int:
    """Merge records of runs over the same catalog, folds and seeds (one backbone each) into one table."""
    loaded = []
    for file in files:
        data = json.loads(Path(file).read_text())
        loaded.append(data["seeds"] if "seeds" in data else [data])
    merged_seeds = []
    for per_seed in zip(*loaded):
        first = per_seed[0]
        for other in per_seed[1:]:
            if (other["sha256"], other["fold_of"]) != (first["sha256"], first["fold_of"]):
                raise SystemExit("these runs did not use the same images and folds; they cannot be combined")
        merged = {**{k: v for k, v in first.items() if k != "ensemble"}, "seconds": sum(r["seconds"] for r in per_seed),
                  "results": {k: v for r in per_seed for k, v in r["results"].items()}}
        report(merged, None)
        merged_seeds.append(merged)
    report_seeds(merged_seeds, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    from facetrace.db.engine import get_engine, session_scope
    from facetrace.settings import get_settings
    from facetrace.tasks.precision import PRECISIONS
    from facetrace.tasks.training import INPUT_FILTERS
    from facetrace.tasks.splits import group_items, load_split_items

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--backbones", default="mobilenet_v2,xception")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--jpeg-quality", type=int)
    parser.add_argument("--width", type=float, help="MobileNetV2 width multiplier (alpha)")
    parser.add_argument("--patience", type=int, help="early-stopping patience in epochs (large: train to the end)")
    parser.add_argument("--crop", type=int, help="train on random crops of this size (score whole images)")
    parser.add_argument("--input-filter", choices=INPUT_FILTERS,
                        help="what the backbone sees: the picture, a fixed high-pass residual of it, or both")
    parser.add_argument("--reencode-size", type=int, help="re-encode at this size, then resize to --image-size")
    parser.add_argument("--precision", choices=("auto", *PRECISIONS),
                        help="compute precision of the fits (default: the settings' train_precision)")
    parser.add_argument("--time-budget", type=float, help="seconds per fit")
    parser.add_argument("--no-format-neutral", action="store_true")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--threshold-holdout", type=float, default=0.0, metavar="SHARE",
                        help="also set the threshold on a share of each fold's training part that neither fitting "
                             "nor early stopping sees (e.g. 0.15), and report the realised FPR at it beside the "
                             "validation split's (which picked the epoch)")
    parser.add_argument("--test-time-views", action="store_true",
                        help="also score validation and test images averaged over TEST_TIME_VIEWS (small "
                             "rotations and zooms, each mirrored) and compare with the registered scoring, on the "
                             "same fitted models")
    parser.add_argument("--members", type=int, default=1, metavar="K",
                        help="fit each backbone K times per fold, each from its own initialisation (seed + "
                             "MEMBER_SEED_STEP x member), recorded as backbone@member; the ensemble row is the "
                             "mean of every fit, so with one backbone it is a deep ensemble of it")
    parser.add_argument("--only-folds", help="comma-separated fold numbers to run (quick checks)")
    parser.add_argument("--seed", type=int, default=0, help="one seed (see --seeds)")
    parser.add_argument("--seeds", default="0,1,2",
                        help="comma-separated seeds, each with its own folds and initialisation (default 0,1,2; "
                             "mean and sd over them are reported); empty: --seed only")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("FACETRACE_TRAIN_THREADS", "2")))
    parser.add_argument("--out", default=str(Path(__file__).with_name("out") / "crossval.json"))
    parser.add_argument("--combine", nargs="+", metavar="JSON",
                        help="no training: merge the records of earlier runs (same folds) into one table")
    args = parser.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out)

    settings = get_settings()
    with session_scope(get_engine(settings.catalog_url)) as session:
        items, images = load_split_items(session)
        paths = [str(settings.data_dir / images[item.image_id].path) for item in items]
    labels = [item.label for item in items]
    y = np.array([int(label == "synthetic") for label in labels], np.float32)
    groups = group_items(items, settings.near_duplicate_distance)
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    records = []
    for seed in seeds:
        record = run_seed(seed, args, settings, items, paths, labels, y, groups)
        report(record, None)
        records.append(record)
    report_seeds(records, args.out)
    return 0


def rule_thresholds(model, images: np.ndarray, labels: np.ndarray, flip: bool, settings) -> tuple[np.ndarray, dict]:
    """Scores of these images as a registered model gives them, and the threshold that the settings'
    rule and the empirical rule each set on them."""
    from facetrace.tasks import training
    from facetrace.tasks.registry import operating_point

    scores = training.predict_scores(model, images, flip=flip)
    return scores, {rule: operating_point(labels, scores, settings.target_fpr, rule)
                    for rule in (settings.threshold_rule, "empirical")}


# Test-time views beyond the mirror image: (degrees, zoom) pairs from inside the training augmentation's
# range (rotation up to 8 degrees, zoom-in up to 10%), each also mirrored.
TEST_TIME_VIEWS = ((0.0, 1.0), (5.0, 0.95), (-5.0, 0.95), (0.0, 0.92))


def scoring_views(images: np.ndarray, views=TEST_TIME_VIEWS) -> list[np.ndarray]:
    """Each view of prepared uint8 images (N, size, size, 3), as uint8 arrays of the same shape:
    per (degrees, zoom) pair the resampled images, then their mirror images."""
    import tensorflow as tf

    from facetrace.tasks import augment

    size = images.shape[1]
    x = tf.cast(tf.convert_to_tensor(images), tf.float32)
    count = tf.shape(x)[0]
    out = []
    for degrees, zoom in views:
        if degrees == 0.0 and zoom == 1.0:
            view = np.asarray(images)
        else:
            angle = tf.fill((count,), degrees * math.pi / 180.0)
            view = augment.affine_resample(x, angle, tf.fill((count,), zoom), tf.zeros((count, 2)), size)
            view = np.clip(np.rint(view.numpy()), 0, 255).astype(np.uint8)
        out += [view, np.ascontiguousarray(view[:, :, ::-1])]
    return out


def view_scores(model, val_images, val_labels, test_images, test_labels, settings) -> dict:
    """Validation and test scores averaged over every test-time view, the threshold the settings' rule
    sets on those validation scores, and the test metrics at it (keys prefixed ``views_``); each view's
    test scores are kept (the first two are the image and its mirror image: the registered scoring)."""
    from facetrace.tasks import training
    from facetrace.tasks.evaluation import binary_metrics
    from facetrace.tasks.registry import operating_point

    val = np.mean([training.predict_scores(model, v) for v in scoring_views(val_images)], axis=0)
    per_view = [training.predict_scores(model, v) for v in scoring_views(test_images)]
    test = np.mean(per_view, axis=0)
    point = operating_point(val_labels, val, settings.target_fpr, settings.threshold_rule)
    m = binary_metrics(test_labels, test, point["threshold"])
    return {"views_roc_auc": m["roc_auc"], "views_tpr_at_1pct_fpr": m["tpr_at_1pct_fpr"],
            "views_tpr_at_5pct_fpr": m["tpr_at_5pct_fpr"], "views_realised_fpr": m["fpr"],
            "views_threshold": point["threshold"], "test_view_scores": [v.tolist() for v in per_view]}


# Member m of a backbone (--members) starts from seed + MEMBER_SEED_STEP * m: far from the seeds of
# other runs, so no member repeats another run's initialisation.
MEMBER_SEED_STEP = 1000


def member_fits(backbones: list[str], members: int) -> list[tuple[str, int]]:
    """(backbone, member) for every fit of a fold, each backbone's members together."""
    if members < 1:
        raise SystemExit("--members must be at least 1")
    return [(backbone, member) for backbone in backbones for member in range(members)]


def member_name(backbone: str, member: int) -> str:
    """Member 0 is the backbone's usual fit and keeps its name; the others are backbone@member."""
    return backbone if member == 0 else f"{backbone}@{member}"


def run_seed(seed: int, args, settings, items, paths, labels, y, groups) -> dict:
    """One seed: its own grouped folds, a fit per fold and backbone; the record :func:`report` prints."""
    from facetrace.tasks import training
    from facetrace.tasks.evaluation import binary_metrics
    from facetrace.tasks.precision import resolve_precision
    from facetrace.tasks.splits import assign_groups, grouped_folds

    folds = np.array(grouped_folds(groups, labels, args.folds, seed))
    print(f"{len(items)} images ({int(y.sum())} synthetic) in {len(set(groups))} groups, {args.folds} folds: "
          + ", ".join(f"{int((folds == f).sum())}" for f in range(args.folds)), file=sys.stderr)

    results: dict[str, dict] = {}
    started_all = time.perf_counter()
    for backbone, member in member_fits(args.backbones.split(","), args.members):
        config = training.default_config(backbone, image_size=args.image_size, epochs=args.epochs,
                                         seed=seed + MEMBER_SEED_STEP * member)
        name = member_name(backbone, member)
        if args.learning_rate:
            config = replace(config, learning_rate=args.learning_rate)
        if args.width:
            config = replace(config, width_multiplier=args.width)
        if args.time_budget:
            config = replace(config, time_budget_s=args.time_budget)
        if args.precision:
            config = replace(config, precision=args.precision)
        if args.patience:
            config = replace(config, patience=args.patience)
        if args.crop:
            config = replace(config, crop_size=args.crop)
        if args.input_filter:
            config = replace(config, input_filter=args.input_filter)
        if args.reencode_size:
            config = replace(config, preprocess=replace(config.preprocess, reencode_size=args.reencode_size))
        if args.batch_size:
            config = replace(config, batch_size=args.batch_size)
        if args.jpeg_quality or args.no_format_neutral:
            config = replace(config, preprocess=replace(
                config.preprocess, jpeg_quality=args.jpeg_quality or config.preprocess.jpeg_quality,
                format_neutral=not args.no_format_neutral))
        if args.no_augment:
            config = replace(config, augment=training.AugmentConfig(False, 0, 0, 0, (60, 95), 0, 0))
        config = replace(config, precision=resolve_precision(config.precision, backbone))
        key = config.preprocess.key()
        tensors = training.cached_tensors(
            paths, [item.sha256 for item in items], config.preprocess,
            settings.data_dir / "cache" / "tensors" / f"crossval-{key}" / "all.npy", threads=args.threads)
        scores = np.full(len(items), np.nan)
        mirrored = np.full(len(items), np.nan)  # the same test images flipped left-right (test-time flip)
        per_fold = []
        run_folds = [int(f) for f in args.only_folds.split(",")] if args.only_folds else range(args.folds)
        for fold in run_folds:
            test = np.flatnonzero(folds == fold)
            rest = np.flatnonzero(folds != fold)
            shares = {"train": 0.85, "validation": 0.15}
            if args.threshold_holdout:  # a share of its own that neither fitting nor early stopping sees
                shares = {"train": 0.85 - args.threshold_holdout, "validation": 0.15, "holdout": args.threshold_holdout}
            inner = np.array(assign_groups([groups[i] for i in rest], [labels[i] for i in rest], shares, seed + fold))
            train, val, holdout = (rest[inner == part] for part in ("train", "validation", "holdout"))
            out_dir = settings.data_dir / "cache" / "crossval-models" / f"{name}-fold{fold}"
            fitted = training.train_backbone(tensors[train], y[train], tensors[val], y[val], config, out_dir,
                                             threads=args.threads)
            model = training.load_model(fitted.path, fitted.sha256)
            flip = config.test_time_flip
            # The threshold a registered model gets: the settings' rule on flipped validation scores.
            val_scores = training.predict_scores(model, tensors[val], flip=flip)
            # The threshold from faces the model never met: neither fitted on nor used to pick the epoch.
            held = rule_thresholds(model, tensors[holdout], y[holdout], flip, settings)[1] if len(holdout) else {}
            scores[test] = training.predict_scores(model, tensors[test])
            mirrored[test] = training.predict_scores(model, np.ascontiguousarray(tensors[test][:, :, ::-1]))
            registered = (scores[test] + mirrored[test]) / 2 if flip else scores[test]
            per_fold.append({**score_fold(fold, y[val], val_scores, y[test], registered, settings.target_fpr,
                                          settings.threshold_rule),
                             "n_train": len(train), "n_val": len(val), "n_test": len(test),
                             "seconds": fitted.seconds, "epochs": fitted.epochs_run, "best_epoch": fitted.best_epoch})
            f = per_fold[-1]
            if held:
                hr = held[settings.threshold_rule]
                f.update({
                    "holdout_reals": hr["real_faces"], "holdout_threshold": hr["threshold"],
                    "realised_fpr_holdout": binary_metrics(y[test], registered, hr["threshold"])["fpr"],
                    "expected_fpr_interval_holdout": hr["fpr_interval"],
                    "realised_fpr_holdout_empirical_rule": binary_metrics(
                        y[test], registered, held["empirical"]["threshold"])["fpr"]})
            if args.test_time_views:
                f.update(view_scores(model, tensors[val], y[val], tensors[test], y[test], settings))
            del model
            _release_memory()
            print(f"  {name} seed {seed} fold {fold}: AUC {f['roc_auc']:.3f} TPR@1% {f['tpr_at_1pct_fpr']:.3f} "
                  f"TPR@5% {f['tpr_at_5pct_fpr']:.3f} FPR {f['realised_fpr']:.3f} (target {settings.target_fpr}, "
                  f"{f['threshold_rule']}; empirical rule {f['realised_fpr_empirical_rule']:.3f}"
                  + (f"; from the held-out share: {f['realised_fpr_holdout']:.3f}, empirical "
                     f"{f['realised_fpr_holdout_empirical_rule']:.3f}, {len(holdout)} images" if held else "")
                  + ") "
                  + (f"views: AUC {f['views_roc_auc']:.3f} TPR@1% {f['views_tpr_at_1pct_fpr']:.3f} "
                     f"TPR@5% {f['views_tpr_at_5pct_fpr']:.3f} FPR {f['views_realised_fpr']:.3f} "
                     if args.test_time_views else "")
                  + f"({fitted.seconds:.0f} s, {fitted.epochs_run} epochs, best {fitted.best_epoch})", file=sys.stderr)
        done = ~np.isnan(scores)
        pooled = binary_metrics(y[done], scores[done], 0.5)
        flipped = binary_metrics(y[done], (scores[done] + mirrored[done]) / 2, 0.5)
        results[name] = {
            "config": config.hyperparameters(), "per_fold": per_fold,
            "pooled_roc_auc": pooled["roc_auc"], "pooled_tpr_at_5pct_fpr": pooled["tpr_at_5pct_fpr"],
            "pooled_tpr_at_1pct_fpr": pooled["tpr_at_1pct_fpr"],
            "flip_roc_auc": flipped["roc_auc"], "flip_tpr_at_5pct_fpr": flipped["tpr_at_5pct_fpr"],
            "scores": scores.tolist(), "mirrored_scores": mirrored.tolist(),
            "mean_roc_auc": float(np.mean([f["roc_auc"] for f in per_fold])),
            "sd_roc_auc": float(np.std([f["roc_auc"] for f in per_fold])),
            "mean_tpr_at_5pct_fpr": float(np.mean([f["tpr_at_5pct_fpr"] for f in per_fold])),
            "mean_accuracy_at_threshold": float(np.mean([f["accuracy"] for f in per_fold])),
            "seconds_per_fit": float(np.mean([f["seconds"] for f in per_fold])),
        }
    total = time.perf_counter() - started_all
    return {"folds": args.folds, "seed": seed, "images": len(items), "seconds": total,
            "sha256": [item.sha256 for item in items], "labels": y.tolist(), "fold_of": folds.tolist(),
            "results": results}


if __name__ == "__main__":
    sys.exit(main())
