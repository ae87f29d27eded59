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
    p = np.asarray(scores, float)
    real = np.sort(p[y == 0])[::-1]
    if len(real) == 0:
        return 0.5
    allowed = int(math.floor(target_fpr * len(real) + 1e-9))
    if allowed >= len(real):
        return 0.0
    boundary = real[allowed]
    above = p[p > boundary]
    if len(above):
        return float((boundary + above.min()) / 2.0)
    return float(min(1.0, np.nextafter(boundary, 2.0)))


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
         margin: float = 0.0, tiebreak: str = TIEBREAK_METRIC) -> GateDecision:
    """Should ``candidate`` replace ``champion`` (both measured on the same test images)?

    Promoted when its primary metric exceeds the champion's by at least ``margin``. When the primary
    metrics are equal (a tie), the tie-break metric decides, and only a strictly better one promotes:
    a tie cannot clear a positive margin, and with no margin an exact tie in both keeps the champion.
    """
    if champion is None:
        return GateDecision(True, "no current champion")
    c_primary, h_primary = _value(candidate, primary), _value(champion, primary)
    if c_primary == float("-inf"):
        return GateDecision(False, f"candidate has no {primary}")
    if h_primary == float("-inf"):
        return GateDecision(True, f"champion has no {primary} on these images")
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
    return model


def registry_rows(session: Session, wide: bool = True) -> tuple[list[str], list[tuple]]:
    """The registry, newest last; ``wide`` adds the creation time and artifact path."""
    columns = ["id", "backbone", "version", "stage", "snapshot", "image_px", "roc_auc", "tpr@1%fpr",
               "tpr@5%fpr", "threshold", "confound_auc", "created_at", "path"]
    rows = []
    for m in session.scalars(select(Model).order_by(Model.id)):
        metrics = m.metrics or {}
        test = metrics.get("test", {})
        confound = (metrics.get("confound_audit") or {}).get("roc_auc")
        # Numbers stay numbers (JSON readers, sorting); the table's printer rounds them for display.
        rows.append((m.id, m.backbone, m.version, m.stage, m.snapshot_id, m.image_size, _number(test.get("roc_auc")),
                     _number(test.get("tpr_at_1pct_fpr")), _number(test.get("tpr_at_5pct_fpr")), _number(m.threshold),
                     _number(confound), m.created_at.strftime("%Y-%m-%d %H:%M") if m.created_at else "", m.path))
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
    return warnings


def _fmt(value: Any) -> str:
    return "" if value is None else f"{float(value):.4f}"


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


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
        f"- backbone: `{backbone}`, input {preprocess.get('image_size')} px, weights: {training.get('weights', '?')}",
        f"- format-neutral inputs: {preprocess.get('format_neutral')} (centre square, JPEG quality "
        f"{preprocess.get('jpeg_quality')} at {preprocess.get('reencode_size') or preprocess.get('image_size')} px)",
        (f"- the mean P(synthetic) of {member_names} trained on this snapshot "
         f"(members: {', '.join(str(m.get('path', '?')) for m in members)}); "
         f"{training.get('seconds', 0):.0f} s of training in all" if members else
         f"- trained {training.get('epochs_run')} epochs (best {training.get('best_epoch')}) in "
         f"{training.get('seconds', 0):.0f} s ({hyperparameters.get('precision', 'float32')} compute); "
         "hyper-parameters in the catalog (`models.hyperparameters`)"),
        f"- test-time flip: {'on (each image scored with its mirror image)' if hyperparameters.get('test_time_flip') else 'off'}",
        f"- decision threshold {threshold:.4f}, chosen on the validation split for a false-positive rate "
        f"of at most {target_fpr:.0%}; output is P(synthetic)",
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
    confusion = test.get("confusion")
    if confusion:
        lines += ["", f"Confusion at the threshold: TN {confusion['tn']}, FP {confusion['fp']}, "
                      f"FN {confusion['fn']}, TP {confusion['tp']} (n = {test.get('n')})."]
    if metrics.get("per_source"):
        lines += ["", "### Per source", "",
                  *_table(metrics["per_source"], ["source", "label", "n", "accuracy", "mean_score"])]
    if metrics.get("robustness"):
        lines += ["", "### Robustness (same test images, transformed before prediction)", "",
                  *_table(metrics["robustness"], ["variant", "n", "roc_auc", "accuracy", "tpr_at_5pct_fpr", "fpr"])]
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


def write_model_card(directory: Path, markdown: str) -> Path:
    path = Path(directory) / "model_card.md"
    path.write_text(markdown)
    return path
