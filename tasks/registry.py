"""The model registry: decision threshold, candidate rows, the champion gate, model cards.

A model enters as a candidate. The best candidate of a run (by the primary metric, ties broken by
the secondary) replaces the champion only if it beats it, both scored on the same test images, by
at least the configured margin; the old champion is then archived. The database allows one champion
at most (a partial unique index), so the swap happens in one transaction, archive first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from facetrace.db.models import Model

PRIMARY_METRICS = ("roc_auc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "accuracy", "f1")
TIEBREAK_METRIC = "tpr_at_1pct_fpr"


# ---------------------------------------------------------------- threshold


def choose_threshold(labels: Sequence[int], scores: Sequence[float], target_fpr: float = 0.05) -> float:
    """The lowest threshold whose false-positive rate on these (validation) scores is <= ``target_fpr``.

    Placed half-way to the next score above the last real face it must reject, rather than just
    above it, so a real face scoring a hair higher on new data does not flip the decision.
    """
    y = np.asarray(labels, int)
    real = int((y == 0).sum())
    return threshold_allowing(labels, scores, int(math.floor(target_fpr * real + 1e-9)))


def threshold_allowing(labels: Sequence[int], scores: Sequence[float], allowed: int) -> float:
    """The lowest threshold that lets at most ``allowed`` of these real faces score at or above it."""
    y = np.asarray(labels, int)
    p = np.asarray(scores, float)
    real = np.sort(p[y == 0])[::-1]
    if len(real) == 0:
        return 0.5
    if allowed >= len(real):
        return 0.0
    boundary = real[max(0, allowed)]
    above = p[p > boundary]
    if len(above):
        return float((boundary + above.min()) / 2.0)
    return float(min(1.0, np.nextafter(boundary, 2.0)))


THRESHOLD_RULES = ("upper_bound", "empirical")
# The format-swapped robustness row may fall at most this far below the original's ROC AUC.
FORMAT_SWAP_TOLERANCE = 0.01


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided interval for a rate seen k times in n trials."""
    from scipy.stats import beta

    if n <= 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    lower = 0.0 if k <= 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    upper = 1.0 if k >= n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lower, upper


def fpr_upper_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided exact upper bound: the FPR is below it with ``confidence`` when k of n real faces passed."""
    from scipy.stats import beta

    return 1.0 if n <= 0 or k >= n else float(beta.ppf(confidence, k + 1, n - k))


def operating_point(labels: Sequence[int], scores: Sequence[float], target_fpr: float = 0.05,
                    rule: str = "upper_bound", confidence: float = 0.95) -> dict[str, Any]:
    """The decision threshold and what it rests on.

    ``upper_bound`` (default): the lowest threshold at which the exact one-sided upper confidence
    bound of the FPR, given the false positives among these real faces, is <= ``target_fpr``. On
    ~100 validation reals this lets through at most 1 of them (an empirical 5% would let 5), so the
    FPR on new faces from the same sources stays at or below the target with ``confidence``; with
    too few real faces for any bound (fewer than ~59 at 5%) it rejects every one seen and says so.
    ``empirical``: the lowest threshold whose FPR on these scores is <= the target (noisy).

    Returned: the threshold, the rule, the real faces it rests on, the false positives among them,
    and a two-sided exact interval for the FPR to expect on new faces.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; expected one of {', '.join(THRESHOLD_RULES)}")
    y = np.asarray(labels, int)
    n = int((y == 0).sum())
    if rule == "empirical":
        allowed = int(math.floor(target_fpr * n + 1e-9))
    else:
        allowed = 0
        while allowed + 1 < n and fpr_upper_bound(allowed + 1, n, confidence) <= target_fpr:
            allowed += 1
    threshold = threshold_allowing(y, scores, allowed) if n else 0.5
    false_positives = int(((np.asarray(scores, float) >= threshold) & (y == 0)).sum())
    lower, upper = clopper_pearson(false_positives, n, confidence)
    return {"rule": rule, "threshold": threshold, "target_fpr": target_fpr, "confidence": confidence,
            "real_faces": n, "false_positives": false_positives, "fpr": false_positives / n if n else None,
            "fpr_interval": [lower, upper], "fpr_upper_bound": fpr_upper_bound(false_positives, n, confidence),
            "bound_met": bool(n and fpr_upper_bound(false_positives, n, confidence) <= target_fpr)}


def operating_point_text(point: Mapping[str, Any] | None) -> str:
    """One line for the card and the CLI: the rule, the real faces it rests on, the FPR to expect."""
    if not point:
        return "chosen on the validation split (empirical FPR; no interval recorded)"
    lo, hi = point["fpr_interval"]
    rule = ("exact 95% upper bound of the FPR <= target" if point["rule"] == "upper_bound"
            else "empirical FPR <= target")
    note = "" if point.get("bound_met") or point["rule"] != "upper_bound" else (
        "; too few real faces for the bound: every one seen is rejected")
    return (f"{rule} ({point['target_fpr']:.0%}) on {point['real_faces']} real validation faces, "
            f"{point['false_positives']} above it; FPR to expect on new faces {lo:.1%}-{hi:.1%} (95%){note}")


# ---------------------------------------------------------------- the gate


def _value(metrics: Mapping[str, Any], name: str) -> float:
    value = metrics.get(name)
    return float("-inf") if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def rank_key(metrics: Mapping[str, Any], primary: str = "roc_auc",
             tiebreak: str = TIEBREAK_METRIC) -> tuple[float, float]:
    return _value(metrics, primary), _value(metrics, tiebreak)


def best_candidate(candidates: Sequence[tuple[int, Mapping[str, Any]]], primary: str = "roc_auc",
                   tiebreak: str = TIEBREAK_METRIC) -> int:
    """The id of the best (id, metrics) pair; equal keys keep the earliest (lowest id)."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    return max(sorted(candidates, key=lambda c: c[0]), key=lambda c: rank_key(c[1], primary, tiebreak))[0]


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str


def gate(candidate: Mapping[str, Any], champion: Mapping[str, Any] | None, primary: str = "roc_auc",
         margin: float = 0.0, tiebreak: str = TIEBREAK_METRIC, *,
         paired: Mapping[str, Any] | None = None) -> GateDecision:
    """Should ``candidate`` replace ``champion`` (both measured on the same test images)?

    With ``paired`` (:func:`facetrace.tasks.evaluation.paired_difference` of the primary metric on
    those images): promoted only when the difference meets ``margin`` and the lower end of its 95%
    paired bootstrap interval is above 0, so a difference inside the noise never promotes.
    Without it: promoted when its primary metric exceeds the champion's by at least ``margin``. When the
    primary metrics are equal (a tie), the tie-break metric decides, and only a strictly better one
    promotes: a tie cannot clear a positive margin, and with no margin an exact tie in both keeps the champion.
    """
    if champion is None:
        return GateDecision(True, "no current champion")
    c_primary, h_primary = _value(candidate, primary), _value(champion, primary)
    if c_primary == float("-inf"):
        return GateDecision(False, f"candidate has no {primary}")
    if h_primary == float("-inf"):
        return GateDecision(True, f"champion has no {primary} on these images")
    if paired is not None and paired.get("interval") is not None:
        return paired_gate(paired, c_primary, h_primary, margin)
    delta = c_primary - h_primary
    if math.isclose(delta, 0.0, abs_tol=1e-12):
        if margin > 0:
            return GateDecision(False, f"{primary} tied ({c_primary:.4f}); a tie does not clear margin {margin}")
        c_tie, h_tie = _value(candidate, tiebreak), _value(champion, tiebreak)
        if c_tie > h_tie:
            return GateDecision(True, f"{primary} tied ({c_primary:.4f}); {tiebreak} {c_tie:.4f} > {h_tie:.4f}")
        return GateDecision(False, f"{primary} tied ({c_primary:.4f}); {tiebreak} {c_tie:.4f} <= {h_tie:.4f}")
    if delta >= margin - 1e-12 and delta > 0:
        return GateDecision(True, f"{primary} {c_primary:.4f} beats champion {h_primary:.4f} "
                                  f"by {delta:.4f} >= {margin}")
    return GateDecision(False, f"{primary} {c_primary:.4f} vs champion {h_primary:.4f}: "
                               f"difference {delta:+.4f} below margin {margin}")


def paired_gate(paired: Mapping[str, Any], c_primary: float, h_primary: float, margin: float) -> GateDecision:
    """The noise-aware rule: the difference must meet the margin and its interval must exclude 0."""
    metric, delta = paired["metric"], float(paired["delta"])
    lo, hi = paired["interval"]
    evidence = (f"{metric} {c_primary:.4f} vs champion {h_primary:.4f}: difference {delta:+.4f}, "
                f"{paired.get('confidence', 0.95):.0%} paired bootstrap interval {lo:+.4f} to {hi:+.4f} on "
                f"{paired['n']} test images ({paired.get('real')} real, {paired.get('synthetic')} synthetic)")
    if delta < margin - 1e-12:
        return GateDecision(False, f"{evidence}; below margin {margin}")
    if lo <= 0:
        return GateDecision(False, f"{evidence}; the interval includes 0: within the noise, champion kept")
    return GateDecision(True, f"{evidence}; meets margin {margin} and the interval excludes 0")


# ---------------------------------------------------------------- catalog rows


def current_champion(session: Session) -> Model | None:
    return session.scalar(select(Model).where(Model.stage == "champion"))


def next_version(session: Session, backbone: str) -> int:
    return int(session.scalar(select(func.coalesce(func.max(Model.version), 0)).where(Model.backbone == backbone))) + 1


def add_candidate(session: Session, *, backbone: str, path: str, sha256: str, snapshot_id: int, image_size: int,
                  hyperparameters: dict[str, Any], metrics: dict[str, Any], threshold: float,
                  model_card: str | None = None, flow_run_id: str | None = None) -> Model:
    model = Model(backbone=backbone, version=next_version(session, backbone), path=path, sha256=sha256,
                  snapshot_id=snapshot_id, image_size=image_size, hyperparameters=hyperparameters,
                  metrics=metrics, threshold=threshold, stage="candidate", model_card=model_card,
                  flow_run_id=flow_run_id)
    session.add(model)
    session.flush()
    return model


def promote(session: Session, model_id: int) -> int | None:
    """Make ``model_id`` the champion and archive the previous one; returns the archived id."""
    previous = current_champion(session)
    if previous is not None and previous.id == model_id:
        return None
    # Archive first: the one-champion index would reject two champions even for an instant.
    session.execute(update(Model).where(Model.stage == "champion").values(stage="archived"))
    session.flush()
    session.execute(update(Model).where(Model.id == model_id).values(stage="champion"))
    session.flush()
    session.expire_all()
    return previous.id if previous is not None else None


def delete_artifact(path: str) -> bool:
    """Delete one model artifact; True when there was one. The only place artifacts are deleted.

    ``path``: a key of the artifact store (what the catalog holds), or an absolute path (a row from
    before keys)."""
    target = Path(path)
    if target.is_absolute():
        existed = target.is_file()
        target.unlink(missing_ok=True)
        return existed
    from facetrace.tasks.store import ArtifactStore

    store = ArtifactStore.from_settings()
    existed = store.exists(path)
    store.delete(path)
    return existed


def is_pruned(model: Model) -> bool:
    return bool((model.metrics or {}).get("pruned"))


def prune_models(session: Session, keep: int, *, reason: str = "retention") -> list[int]:
    """Keep the champion and the ``keep`` most recent other models on disk; delete older artifacts.

    The rows stay (stage unchanged, so the history and metrics remain queryable); each pruned row's
    metrics JSON gains ``pruned: {at, reason, path}``, which `facetrace models` shows. Returns their ids.
    """
    import datetime as dt

    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    others = [m for m in session.scalars(select(Model).where(Model.stage != "champion").order_by(Model.id.desc()))
              if not is_pruned(m)]
    pruned = []
    for model in others[keep:]:
        deleted = delete_artifact(model.path)
        model.metrics = {**(model.metrics or {}), "pruned": {
            "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "path": model.path,
            "reason": f"{reason}: the champion and the {keep} most recent other models are kept",
            "deleted": deleted}}
        pruned.append(model.id)
    session.flush()
    return pruned


def resolve_model(session: Session, which: str = "champion") -> Model:
    """``champion`` or a model id -> the row; a clear error when there is none."""
    if which == "champion":
        model = current_champion(session)
        if model is None:
            raise LookupError("there is no champion model yet; run `facetrace train` first")
        return model
    try:
        model_id = int(which)
    except ValueError:
        raise LookupError(f"--model must be 'champion' or a model id, got {which!r}") from None
    model = session.get(Model, model_id)
    if model is None:
        raise LookupError(f"no model with id {model_id}; see `facetrace models`")
    if is_pruned(model):
        raise LookupError(f"model {model_id} was pruned (its artifact deleted by the retention rule, "
                          "FACETRACE_KEEP_CANDIDATES); see `facetrace models`")
    return model


def serving_info(model: Model) -> dict[str, Any]:
    """What prediction needs of a registry row, detached from the session."""
    return {"id": model.id, "backbone": model.backbone, "version": model.version, "path": model.path,
            "sha256": model.sha256, "threshold": model.threshold if model.threshold is not None else 0.5,
            "hyperparameters": model.hyperparameters or {}, "metrics": model.metrics or {}}


def registry_rows(session: Session, wide: bool = True) -> tuple[list[str], list[tuple]]:
    """The registry, newest last; ``wide`` adds the creation time and artifact path."""
    columns = ["id", "backbone", "version", "stage", "snapshot", "image_px", "weights", "roc_auc", "roc_auc 95% CI",
               "tpr@1%fpr", "tpr@1%fpr 95% CI", "tpr@5%fpr", "tpr@5%fpr 95% CI", "test real/synth", "threshold",
               "expected fpr 95% CI (rule, real faces)", "confound_auc", "artifact", "created_at", "path"]
    rows = []
    for m in session.scalars(select(Model).order_by(Model.id)):
        metrics = m.metrics or {}
        test = metrics.get("test", {})
        confound = (metrics.get("confound_audit") or {}).get("roc_auc")
        weights = (metrics.get("training") or {}).get("weights", "")
        # Numbers stay numbers (JSON readers, sorting); the table's printer rounds them for display.
        # Beside each figure its 95% bootstrap interval and the counts it rests on (display strings).
        rows.append((m.id, m.backbone, m.version, m.stage, m.snapshot_id, m.image_size, weights,
                     _number(test.get("roc_auc")), _interval_text(test, "roc_auc"),
                     _number(test.get("tpr_at_1pct_fpr")), _interval_text(test, "tpr_at_1pct_fpr"),
                     _number(test.get("tpr_at_5pct_fpr")), _interval_text(test, "tpr_at_5pct_fpr"),
                     _test_counts(test), _number(m.threshold), _expected_fpr(metrics.get("operating_point")),
                     _number(confound), "pruned" if is_pruned(m) else "kept",
                     m.created_at.strftime("%Y-%m-%d %H:%M") if m.created_at else "", m.path))
    if not wide:
        return columns[:-2], [row[:-2] for row in rows]
    return columns, rows


def model_warnings(metrics: Mapping[str, Any] | None) -> list[str]:
    """What a user must know before trusting this model's answers (for `predict` and the API)."""
    metrics = metrics or {}
    warnings = []
    if metrics.get("demo_data"):
        warnings.append(f"toy model: {metrics['demo_data']}")
    confound = metrics.get("confound_audit") or {}
    if confound.get("warning"):
        auc = confound.get("roc_auc")
        warnings.append("confound: file metadata alone (format, size) separates real from synthetic in its training "
                        f"data{f' (ROC AUC {auc:.3f})' if isinstance(auc, (int, float)) else ''}; see its model card")
    swapped = next((row.get("roc_auc_vs_original") for row in metrics.get("robustness") or []
                    if row.get("variant") == "format_swapped"), None) or {}
    if swapped.get("delta") is not None and swapped.get("interval") and swapped["delta"] < -FORMAT_SWAP_TOLERANCE \
            and swapped["interval"][1] < 0:
        lo, hi = swapped["interval"]
        warnings.append(f"file history: with real faces as PNG and synthetic ones as JPEG its ROC AUC drops by "
                        f"{-swapped['delta']:.3f} (95% interval of the change {lo:+.3f} to {hi:+.3f}); it leans on the "
                        "file format, not only the face")
    return warnings


def _fmt(value: Any) -> str:
    return "" if value is None else f"{float(value):.4f}"


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _interval(metrics: Mapping[str, Any], name: str) -> list[float] | None:
    return ((metrics.get("intervals") or {}).get("metrics") or {}).get(name)


def _interval_text(metrics: Mapping[str, Any], name: str) -> str:
    """``0.9820-0.9970``: a figure's 95% bootstrap interval (empty when none was recorded)."""
    interval = _interval(metrics, name)
    return f"{interval[0]:.4f}-{interval[1]:.4f}" if interval else ""


def _test_counts(metrics: Mapping[str, Any]) -> str:
    if metrics.get("n") is None:
        return ""
    positives = int(metrics.get("positives") or 0)
    return f"{int(metrics['n']) - positives}/{positives}"


def _expected_fpr(point: Mapping[str, Any] | None) -> str:
    if not point:
        return ""
    lo, hi = point["fpr_interval"]
    return f"{lo:.3f}-{hi:.3f} ({point['rule']}, {point['real_faces']} real)"


# ---------------------------------------------------------------- model card


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            cells.append(f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


NETWORK_INPUTS = {  # TrainConfig.input_filter, in words
    "pixels": "the picture",
    "residual": "its fixed high-pass residual (SRM 3x3), not the picture",
    "both": "the picture and its fixed high-pass residual (SRM 3x3), 6 channels",
}


def model_card_markdown(*, backbone: str, version: int | None, stage: str, sha256: str, path: str,
                        snapshot: Mapping[str, Any], hyperparameters: Mapping[str, Any], metrics: Mapping[str, Any],
                        threshold: float, target_fpr: float, decision: str | None = None) -> str:
    """A readable card: what the model is, what it saw, how well it does, and where it fails."""
    test = metrics.get("test", {})
    training = metrics.get("training", {})
    confound = metrics.get("confound_audit") or {}
    preprocess = hyperparameters.get("preprocess", {})
    members = hyperparameters.get("members") or []
    member_names = ", ".join(f"`{m.get('backbone')}`" for m in members)
    lines = [f"# facetrace detector: {backbone} v{version if version is not None else '?'} ({stage})", ""]
    if metrics.get("demo_data"):
        lines += [f"> **Warning: toy model.** This detector was {metrics['demo_data']}.", ""]
    if confound.get("warning"):
        lines += [f"> **Warning: confound.** File metadata alone (format, width, height, file size) separates "
                  f"real from synthetic in this data with ROC AUC {confound.get('roc_auc'):.3f}. The data can be "
                  "told apart without looking at faces; rely on format-neutral results and the robustness table.", ""]
    lines += [
        "## Model",
        f"- artifact: `{path}` (sha256 `{sha256}`)",
        f"- backbone: `{backbone}`, input {preprocess.get('image_size')} px, weights: {weights_text(training)}",
        f"- the network sees: {NETWORK_INPUTS.get(hyperparameters.get('input_filter', 'pixels'), '?')}"
        + (f"; trained on random {hyperparameters['crop_size']} px crops, scores whole images"
           if hyperparameters.get("crop_size") else ""),
        f"- format-neutral inputs: {preprocess.get('format_neutral')} (centre square, JPEG quality "
        f"{preprocess.get('jpeg_quality')} at {preprocess.get('reencode_size') or preprocess.get('image_size')} px)",
        (f"- the mean P(synthetic) of {member_names} trained on this snapshot "
         f"(members: {', '.join(str(m.get('path', '?')) for m in members)}); "
         f"{training.get('seconds', 0):.0f} s of training in all" if members else
         f"- trained {training.get('epochs_run')} epochs (best {training.get('best_epoch')}) in "
         f"{training.get('seconds', 0):.0f} s ({hyperparameters.get('precision', 'float32')} compute); "
         "hyper-parameters in the catalog (`models.hyperparameters`)"),
        f"- test-time flip: {'on (each image scored with its mirror image)' if hyperparameters.get('test_time_flip') else 'off'}",
        f"- decision threshold {threshold:.4f} for a false-positive rate of at most {target_fpr:.0%}: "
        f"{operating_point_text(metrics.get('operating_point'))}; output is P(synthetic)",
    ]
    if decision:
        lines.append(f"- registry decision: {decision}")
    lines += ["", "## Data", f"- snapshot {snapshot.get('id')}: {snapshot.get('image_count')} images, split by "
              "group (exact duplicates, perceptual near-duplicates and shared prompts never straddle splits)"]
    counts = snapshot.get("counts", {})
    if counts:
        lines += ["", "| split | real | synthetic |", "|---|---:|---:|"]
        lines += [f"| {name} | {c.get('real', 0)} | {c.get('synthetic', 0)} |" for name, c in counts.items()]
    sources = snapshot.get("sources", [])
    if sources:
        lines += ["", *_table(sources, ["source", "label", "images", "provenance"])]
    lines += ["", "## Test metrics (held-out groups)", ""]
    headline = ["roc_auc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "accuracy", "precision", "recall", "f1", "ece", "fpr"]
    lines += _table([{k: test.get(k) for k in headline}], headline)
    intervals = test.get("intervals") or {}
    if intervals.get("metrics"):
        lines += ["", f"95% intervals ({intervals.get('method')}, {intervals.get('resamples')} resamples, seeded) "
                      f"over the {intervals.get('n')} test images: {intervals.get('real')} real, "
                      f"{intervals.get('synthetic')} synthetic. TPR at 1% FPR rests on the "
                      f"{max(1, int(0.01 * int(intervals.get('real') or 0)))} highest-scoring real face(s) of these.", "",
                  *_table([{"metric": k, "value": test.get(k), "95% low": v[0], "95% high": v[1]}
                           for k, v in intervals["metrics"].items()], ["metric", "value", "95% low", "95% high"])]
    confusion = test.get("confusion")
    if confusion:
        lines += ["", f"Confusion at the threshold: TN {confusion['tn']}, FP {confusion['fp']}, "
                      f"FN {confusion['fn']}, TP {confusion['tp']} (n = {test.get('n')})."]
    if metrics.get("per_source"):
        from facetrace.tasks.evaluation import per_source_lines

        lines += ["", "### Per source", "", "At the decision threshold; accuracy with its exact (Clopper-Pearson) "
                  "95% interval, mean score with a bootstrap one.", "", *per_source_lines(metrics["per_source"])]
    if metrics.get("robustness"):
        from facetrace.tasks.evaluation import robustness_lines

        lines += ["", "### Robustness (same test images, transformed before prediction)", "",
                  "95% bootstrap intervals; \"vs original\": the variant's ROC AUC minus the original's on the same "
                  "images, with a paired bootstrap interval.", "", *robustness_lines(metrics["robustness"])]
    if confound:
        lines += ["", "## Confound audit", "",
                  f"A {confound.get('classifier')} on file metadata only ({', '.join(confound.get('features', []))}), "
                  f"trained on the train split: test ROC AUC {_fmt(confound.get('roc_auc'))}"
                  + (" — **above 0.9: the classes are separable without the pixels.**"
                     if confound.get("warning") else ".")]
    lines += ["", "## Known limits",
              "- Trained on the catalog's generators and real-photo sources only; images from other generators, "
              "heavy edits, screenshots or faces far from the training distribution may be misjudged.",
              "- Small test sets give wide confidence intervals; a difference of a few hundredths in ROC AUC "
              "between models may be noise.",
              "- Without ImageNet weights the backbone learns from this data alone, which limits how far it "
              "generalises.",
              "- Scores are not calibrated probabilities beyond what the ECE above shows; use the threshold, "
              "not 0.5, for decisions."]
    return "\n".join(lines) + "\n"


def weights_text(training: Mapping[str, Any]) -> str:
    """Which weights a model started from: random, or ImageNet with the file's name, sha256 and origin."""
    kind = training.get("weights", "?")
    source = training.get("weights_source") or {}
    if not source:
        return "random initialisation (no ImageNet weights)" if kind == "random" else str(kind)
    checked = ", hash pinned by Keras checked" if source.get("hash_checked") else ""
    return (f"{kind} (`{source.get('name')}`, sha256 `{str(source.get('sha256'))[:16]}…`, "
            f"from {source.get('origin')}{checked}); frozen backbone, then the top layers fine-tuned")
