"""Evaluation on the held-out test split: metrics, per-source breakdown, robustness, plots,
Grad-CAM, and the confound audit (can file metadata alone tell the classes apart?).

Synthetic is the positive class; a score is P(synthetic). Threshold-dependent metrics use the
decision threshold chosen on the validation split (never on test).
"""

from __future__ import annotations

import io
import math
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from facetrace.tasks.storage import open_rgb

if TYPE_CHECKING:
    from facetrace.tasks.splits import SnapshotSplit
    from facetrace.tasks.training import TrainedModel

ROBUSTNESS_VARIANTS = ("original", "jpeg90", "jpeg75", "jpeg50", "half", "format_swapped")
CONFOUND_WARNING_AUC = 0.9


# ---------------------------------------------------------------- metrics


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    return roc_curve(labels, scores, drop_intermediate=False)


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, target_fpr: float) -> float:
    """The best true-positive rate whose false-positive rate does not exceed ``target_fpr``."""
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return float("nan")
    fpr, tpr, _ = roc_points(labels, scores)
    allowed = fpr <= target_fpr + 1e-12
    return float(tpr[allowed].max()) if allowed.any() else 0.0


def expected_calibration_error(labels: np.ndarray, scores: np.ndarray, bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    labels = np.asarray(labels, float)
    scores = np.asarray(scores, float)
    if len(scores) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            error += mask.mean() * abs(labels[mask].mean() - scores[mask].mean())
    return float(error)


def binary_metrics(labels: Sequence[int], scores: Sequence[float], threshold: float = 0.5) -> dict[str, Any]:
    """Every headline number for one set of scores; NaN where a metric is undefined (one class)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels, int)
    p = np.asarray(scores, float)
    decided = (p >= threshold).astype(int)
    tp = int(((decided == 1) & (y == 1)).sum())
    tn = int(((decided == 0) & (y == 0)).sum())
    fp = int(((decided == 1) & (y == 0)).sum())
    fn = int(((decided == 0) & (y == 1)).sum())
    both = len(set(y.tolist())) == 2
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "n": int(len(y)),
        "positives": int(y.sum()),
        "threshold": float(threshold),
        "accuracy": (tp + tn) / len(y) if len(y) else float("nan"),
        "accuracy_at_0_5": float(((p >= 0.5).astype(int) == y).mean()) if len(y) else float("nan"),
        "roc_auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "tpr_at_1pct_fpr": tpr_at_fpr(y, p, 0.01) if both else float("nan"),
        "tpr_at_5pct_fpr": tpr_at_fpr(y, p, 0.05) if both else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "fpr": fp / (fp + tn) if fp + tn else float("nan"),
        "ece": expected_calibration_error(y, p),
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


INTERVAL_METRICS = ("roc_auc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "accuracy", "precision", "recall", "f1",
                    "fpr", "ece")


def _auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Mann-Whitney ROC AUC (ties count one half)."""
    negative = np.sort(negative)
    below = np.searchsorted(negative, positive, side="left")
    at_or_below = np.searchsorted(negative, positive, side="right")
    return float((below + at_or_below).sum() / (2.0 * len(positive) * len(negative)))


def _tpr_at(positive: np.ndarray, negative_desc: np.ndarray, target_fpr: float) -> float:
    """As :func:`tpr_at_fpr`: positives above the highest real score that must be rejected."""
    allowed = int(math.floor(target_fpr * len(negative_desc) + 1e-9))
    if allowed >= len(negative_desc):
        return 1.0
    return float((positive > negative_desc[allowed]).mean())


def resample_metrics(positive: np.ndarray, negative: np.ndarray, threshold: float) -> dict[str, float]:
    """The headline metrics of one (re)sample given as positive and negative scores (both non-empty)."""
    tp = int((positive >= threshold).sum())
    fp = int((negative >= threshold).sum())
    tn = len(negative) - fp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / len(positive)
    negative_desc = np.sort(negative)[::-1]
    labels = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    return {"roc_auc": _auc(positive, negative), "tpr_at_1pct_fpr": _tpr_at(positive, negative_desc, 0.01),
            "tpr_at_5pct_fpr": _tpr_at(positive, negative_desc, 0.05), "accuracy": (tp + tn) / len(labels),
            "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "fpr": fp / len(negative), "ece": expected_calibration_error(labels, np.r_[positive, negative])}


def bootstrap_intervals(labels: Sequence[int], scores: Sequence[float], threshold: float, *, resamples: int = 1000,
                        seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """Percentile bootstrap intervals of every headline metric over these (test) images.

    Stratified: each resample draws the real and the synthetic faces separately with replacement,
    so every resample has the split's class counts. Seeded: the same scores give the same intervals.
    Returned with the counts they rest on (real faces set how fine the FPR-based figures can be:
    on 98 real faces, "TPR at 1% FPR" rests on a single real face).
    """
    y = np.asarray(labels, int)
    p = np.asarray(scores, float)
    positive, negative = p[y == 1], p[y == 0]
    counts = {"n": int(len(y)), "synthetic": int(len(positive)), "real": int(len(negative)),
              "resamples": int(resamples), "confidence": confidence, "method": "stratified percentile bootstrap"}
    if len(positive) == 0 or len(negative) == 0 or resamples < 1:
        return {**counts, "metrics": {}}
    rng = np.random.default_rng(seed)
    draws = {name: np.empty(resamples) for name in INTERVAL_METRICS}
    for r in range(resamples):
        values = resample_metrics(positive[rng.integers(0, len(positive), len(positive))],
                                  negative[rng.integers(0, len(negative), len(negative))], threshold)
        for name in INTERVAL_METRICS:
            draws[name][r] = values[name]
    tail = (1 - confidence) / 2 * 100
    return {**counts, "metrics": {name: [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
                                  for name, values in draws.items()}}


def paired_difference(labels: Sequence[int], candidate: Sequence[float], champion: Sequence[float],
                      metric: str = "roc_auc", *, threshold_candidate: float = 0.5, threshold_champion: float = 0.5,
                      resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """Candidate minus champion on ``metric``, scored on the same images, with a paired bootstrap
    interval: each resample draws images (stratified by class) and scores both models on the same draw,
    so what the two share (easy and hard faces) cancels out of the difference."""
    y = np.asarray(labels, int)
    a, b = np.asarray(candidate, float), np.asarray(champion, float)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) == 0 or len(neg) == 0:
        return {"metric": metric, "delta": None, "interval": None, "n": int(len(y)), "resamples": 0}

    def value(scores: np.ndarray, p: np.ndarray, n: np.ndarray, threshold: float) -> float:
        return resample_metrics(scores[p], scores[n], threshold)[metric]

    delta = value(a, pos, neg, threshold_candidate) - value(b, pos, neg, threshold_champion)
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for r in range(resamples):
        p, n = pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))]
        diffs[r] = value(a, p, n, threshold_candidate) - value(b, p, n, threshold_champion)
    tail = (1 - confidence) / 2 * 100
    return {"metric": metric, "delta": float(delta),
            "interval": [float(np.percentile(diffs, tail)), float(np.percentile(diffs, 100 - tail))],
            "n": int(len(y)), "real": int(len(neg)), "synthetic": int(len(pos)), "resamples": int(resamples),
            "confidence": confidence}


def per_source(sources: Sequence[str], labels: Sequence[int], scores: Sequence[float],
               threshold: float, *, resamples: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Accuracy and mean score per (source, label): where the errors come from, each with its 95%
    interval (accuracy: exact Clopper-Pearson for k correct of n; mean score: percentile bootstrap)."""
    from facetrace.tasks.registry import clopper_pearson

    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for index, (source, label) in enumerate(zip(sources, labels)):
        groups[(source, int(label))].append(index)
    rows = []
    scores = np.asarray(scores, float)
    rng = np.random.default_rng(seed)
    for (source, label), index in sorted(groups.items()):
        s = scores[index]
        correct = (s >= threshold) == bool(label)
        means = s[rng.integers(0, len(s), (max(resamples, 1), len(s)))].mean(axis=1)
        rows.append({"source": source, "label": "synthetic" if label else "real", "n": len(index),
                     "accuracy": float(correct.mean()),
                     "accuracy_interval": list(clopper_pearson(int(correct.sum()), len(index))),
                     "mean_score": float(s.mean()),
                     "mean_score_interval": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]})
    return rows


def clean_json(value: Any) -> Any:
    """NaN and numpy types -> JSON-safe values (NaN -> None) for the catalog's JSON columns."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


# ---------------------------------------------------------------- robustness


def encode(image: Image.Image, fmt: str, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def variant_bytes(path: str | os.PathLike, label: str, variant: str) -> bytes:
    """The file at ``path`` transformed as a robustness variant would arrive at prediction time."""
    if variant == "original":
        return Path(path).read_bytes()
    image = open_rgb(Path(path))
    if variant.startswith("jpeg"):
        return encode(image, "JPEG", int(variant.removeprefix("jpeg")))
    if variant == "half":
        half = image.resize((max(1, image.width // 2), max(1, image.height // 2)), Image.Resampling.LANCZOS)
        with Image.open(path) as original:
            fmt = original.format if original.format in ("JPEG", "PNG", "WEBP") else "PNG"
        return encode(half, fmt)
    if variant == "format_swapped":
        return encode(image, swapped_format(label))
    raise ValueError(f"unknown robustness variant {variant!r}")


def swapped_format(label: str) -> str:
    """The original data's formats crossed over: synthetic faces as JPEG, real ones as PNG."""
    return "JPEG" if label == "synthetic" else "PNG"


def build_format_swapped(items: Sequence[tuple[str, str]], out_dir: Path) -> list[tuple[str, str, str]]:
    """Write each (path, label) with its format swapped; returns (new path, label, format) per item."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (path, label) in enumerate(items):
        fmt = swapped_format(label)
        target = out_dir / f"{index:06d}-{label}.{'jpg' if fmt == 'JPEG' else 'png'}"
        target.write_bytes(variant_bytes(path, label, "format_swapped"))
        written.append((str(target), label, fmt))
    return written


ROBUSTNESS_METRICS = ("roc_auc", "accuracy", "tpr_at_5pct_fpr", "fpr")


def robustness_table(paths: Sequence[str], labels: Sequence[str], threshold: float,
                     score_bytes: Callable[[list[bytes]], np.ndarray],
                     variants: Sequence[str] = ROBUSTNESS_VARIANTS, *, resamples: int = 1000) -> list[dict[str, Any]]:
    """Metrics per variant: the same test images re-encoded, downscaled and format-swapped.

    Each row carries 95% bootstrap intervals of its metrics with the counts they rest on, and every
    variant after the original its ROC AUC difference from the original with a paired bootstrap
    interval (the same images scored both ways): a detector that learned file history shows it in
    the format-swapped row's difference, not in noise."""
    y = np.array([int(label == "synthetic") for label in labels])
    rows, original = [], None
    for variant in variants:
        data = [variant_bytes(path, label, variant) for path, label in zip(paths, labels)]
        scores = score_bytes(data)
        m = binary_metrics(y, scores, threshold)
        bootstrap = bootstrap_intervals(y, scores, threshold, resamples=resamples)
        row = {"variant": variant, "n": m["n"], "real": bootstrap["real"], "synthetic": bootstrap["synthetic"],
               **{k: m[k] for k in ROBUSTNESS_METRICS},
               "intervals": {k: v for k, v in bootstrap["metrics"].items() if k in ROBUSTNESS_METRICS}}
        if variant == "original":
            original = scores
        elif original is not None:
            row["roc_auc_vs_original"] = paired_difference(y, scores, original, "roc_auc", resamples=resamples)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- confound audit


@dataclass
class ConfoundAudit:
    roc_auc: float
    classifier: str
    features: list[str]
    n_train: int
    n_test: int

    @property
    def warns(self) -> bool:
        return not math.isnan(self.roc_auc) and self.roc_auc > CONFOUND_WARNING_AUC

    def as_dict(self) -> dict[str, Any]:
        return {"roc_auc": self.roc_auc, "classifier": self.classifier, "features": self.features,
                "n_train": self.n_train, "n_test": self.n_test, "warning": self.warns}

    def message(self) -> str:
        if self.warns:
            return (f"WARNING: file metadata alone (format, width, height, file size) separates the classes "
                    f"with ROC AUC {self.roc_auc:.3f} > {CONFOUND_WARNING_AUC}: the data can be told apart "
                    "without looking at faces; trust only format-neutral results and the robustness table.")
        return f"File metadata alone reaches ROC AUC {self.roc_auc:.3f} (no strong confound)."


def metadata_features(formats: Sequence[str], widths: Sequence[int], heights: Sequence[int],
                      sizes: Sequence[int], known_formats: Sequence[str]) -> np.ndarray:
    rows = []
    for fmt, w, h, b in zip(formats, widths, heights, sizes):
        onehot = [float(fmt == k) for k in known_formats]
        rows.append(onehot + [float(w), float(h), w / h, math.log(max(1, b)), b / (w * h)])
    return np.array(rows, float)


def confound_audit(train: Sequence[Any], test: Sequence[Any]) -> ConfoundAudit:
    """Train a gradient-boosting classifier on file metadata only; its test ROC AUC is the confound.

    ``train``/``test`` items need ``format``, ``width``, ``height``, ``bytes`` and ``target``.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    names = ["format", "width", "height", "aspect", "log_bytes", "bytes_per_pixel"]
    known = sorted({item.format for item in train})

    def xy(items):
        x = metadata_features([i.format for i in items], [i.width for i in items], [i.height for i in items],
                              [i.bytes for i in items], known)
        return x, np.array([i.target for i in items])

    x_train, y_train = xy(train)
    x_test, y_test = xy(test)
    if len(set(y_train.tolist())) < 2 or len(set(y_test.tolist())) < 2:
        return ConfoundAudit(float("nan"), "none (one class)", names, len(train), len(test))
    classifier = HistGradientBoostingClassifier(max_iter=100, max_depth=3, random_state=0,
                                                min_samples_leaf=min(20, max(1, len(train) // 10)))
    classifier.fit(x_train, y_train)
    auc = float(roc_auc_score(y_test, classifier.predict_proba(x_test)[:, 1]))
    return ConfoundAudit(auc, "HistGradientBoostingClassifier", names, len(train), len(test))


# ---------------------------------------------------------------- Grad-CAM


def grad_cam(model, images: np.ndarray, layer_name: str) -> np.ndarray:
    """Grad-CAM heatmaps (N, h, w) in [0, 1] for each image's predicted class, from ``layer_name``.

    Gradients are taken of the logit (before the sigmoid), computed from the head's own weights: a
    confident prediction saturates the sigmoid, whose gradient then vanishes and leaves a blank map.
    For a face called real the evidence for "real" is shown (the negative logit).
    """
    import keras
    import tensorflow as tf

    features_model = keras.Model(model.input, model.get_layer(layer_name).output)
    head = model.get_layer("prediction")
    kernel, bias = (tf.convert_to_tensor(w) for w in head.get_weights())
    x = tf.convert_to_tensor(np.asarray(images, np.float32))
    with tf.GradientTape() as tape:
        # float32 whatever the model computes in (a mixed-precision model gives bfloat16 maps).
        features = tf.cast(features_model(x, training=False), tf.float32)
        tape.watch(features)
        logit = tf.matmul(tf.reduce_mean(features, axis=(1, 2)), kernel)[:, 0] + bias[0]
        evidence = tf.where(logit >= 0, logit, -logit)  # the predicted class's logit
    grads = tape.gradient(evidence, features)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1)).numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
    return np.where(peak > 0, cam / np.maximum(peak, 1e-12), 0.0)


def explained_network(model, hyperparameters: dict) -> tuple[Any, str]:
    """The network Grad-CAM looks into and its last convolutional layer: the model itself, or an
    ensemble's first member (nested as ``facetrace_<backbone>``)."""
    from facetrace.tasks.training import backbone_spec

    members = hyperparameters.get("members") or []
    if members:
        backbone = members[0]["backbone"]
        return model.get_layer(f"facetrace_{backbone}"), backbone_spec(backbone).last_conv
    return model, backbone_spec(hyperparameters.get("backbone", "mobilenet_v2")).last_conv


def overlay_png(image: np.ndarray, heat: np.ndarray, alpha: float = 0.4) -> bytes:
    """A Grad-CAM map (h, w in [0, 1]) drawn over its uint8 RGB image in the jet colours, as PNG bytes."""

    from matplotlib import colormaps

    heat = np.asarray(Image.fromarray((np.clip(heat, 0, 1) * 255).astype(np.uint8)).resize(
        image.shape[:2][::-1], Image.Resampling.BILINEAR)) / 255.0
    colours = colormaps["jet"](heat)[..., :3] * 255.0
    blended = (1 - alpha) * np.asarray(image, np.float32) + alpha * colours
    buffer = io.BytesIO()
    Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- plots


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    """Lay out, write and release a figure (pyplot keeps every open figure alive otherwise)."""
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_roc(labels: np.ndarray, scores: np.ndarray, path: Path, title: str) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if len(set(np.asarray(labels).tolist())) == 2:
        fpr, tpr, _ = roc_points(labels, scores)
        ax.plot(fpr, tpr, label="model")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.set_xlabel("false-positive rate (real called synthetic)")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title, fontsize=9)
    return _save(plt, fig, path)


def plot_confusion(confusion: dict[str, int], path: Path, title: str) -> Path:
    plt = _figure()
    matrix = np.array([[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]])
    fig, ax = plt.subplots(figsize=(3.2, 3), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="black")
    ax.set_xticks([0, 1], ["real", "synthetic"])
    ax.set_yticks([0, 1], ["real", "synthetic"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return _save(plt, fig, path)


def plot_grid(images: Sequence[np.ndarray], captions: Sequence[str], path: Path, title: str,
              overlays: Sequence[np.ndarray] | None = None, columns: int = 6) -> Path:
    plt = _figure()
    count = max(1, len(images))
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.8 + 0.3), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for index, (image, caption) in enumerate(zip(images, captions)):
        ax = axes.ravel()[index]
        ax.imshow(np.asarray(image, np.uint8))
        if overlays is not None:
            heat = np.asarray(Image.fromarray((overlays[index] * 255).astype(np.uint8)).resize(
                image.shape[:2][::-1], Image.Resampling.BILINEAR)) / 255.0
            ax.imshow(heat, cmap="jet", alpha=0.4)
        ax.set_title(caption, fontsize=6)
    if not len(images):
        axes.ravel()[0].text(0.5, 0.5, "none", ha="center")
    fig.suptitle(title, fontsize=9)
    return _save(plt, fig, path)


# ---------------------------------------------------------------- the evaluation of one detector


def stratified_sample(labels: Sequence[str], keys: Sequence[str], limit: int) -> list[int]:
    """Up to ``limit`` indices, half per label where possible, chosen by key (deterministic)."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for index in sorted(range(len(labels)), key=lambda i: keys[i]):
        by_label[labels[index]].append(index)
    chosen: list[int] = []
    share = max(1, limit // max(1, len(by_label)))
    for label in sorted(by_label):
        chosen += by_label[label][:share]
    return sorted(chosen)


def data_uri(path: str | Path) -> str:
    """A PNG as a data: URI; ``path`` is a local file or a key of the artifact store."""
    import base64

    from facetrace.tasks.store import ArtifactStore

    data = Path(path).read_bytes() if Path(path).is_absolute() else ArtifactStore.from_settings().get_bytes(str(path))
    return "data:image/png;base64," + base64.b64encode(data).decode()


def evaluate_detector(score: Callable[[np.ndarray], np.ndarray], preprocess, split, tensors: dict[str, np.ndarray],
                      report_dir: Path, *, data_dir: Path, explained, last_conv: str, title: str,
                      target_fpr: float = 0.05, robustness_images: int = 400, threshold_rule: str = "upper_bound",
                      bootstrap_resamples: int = 1000) -> dict[str, Any]:
    """Everything about one trained detector on one snapshot: threshold (validation), test metrics,
    per-source breakdown, robustness table, plots and Grad-CAM files. Returns a JSON-safe dict.

    ``score``: prepared uint8 images -> P(synthetic), as the detector predicts (test-time flip and
    all). ``explained``: the network whose ``last_conv`` layer Grad-CAM looks into."""
    from facetrace.tasks.registry import operating_point
    from facetrace.tasks.store import ObjectCache, image_paths
    from facetrace.tasks.training import prepare_bytes

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    val_items, test_items = split.part("validation"), split.part("test")
    y_val = np.array([i.target for i in val_items])
    y_test = np.array([i.target for i in test_items])
    val_scores = score(tensors["validation"])
    test_scores = score(tensors["test"])
    point = operating_point(y_val, val_scores, target_fpr, threshold_rule) if len(val_items) else None
    threshold = point["threshold"] if point else 0.5
    test = binary_metrics(y_test, test_scores, threshold)
    test["intervals"] = bootstrap_intervals(y_test, test_scores, threshold, resamples=bootstrap_resamples)
    validation = binary_metrics(y_val, val_scores, threshold) if len(val_items) else {}
    sources = per_source([i.source for i in test_items], y_test, test_scores, threshold, resamples=bootstrap_resamples)

    def score_bytes(blobs: list[bytes]) -> np.ndarray:
        if not blobs:
            return np.zeros(0, np.float32)
        return score(np.stack([prepare_bytes(b, preprocess) for b in blobs]))

    sample = stratified_sample([i.label for i in test_items], [i.sha256 for i in test_items], robustness_images)
    robustness = robustness_table(image_paths([test_items[i] for i in sample],
                                              ObjectCache.from_settings(data_dir=data_dir)),
                                  [test_items[i].label for i in sample], threshold, score_bytes,
                                  resamples=bootstrap_resamples) if sample else []

    files = {"roc": str(plot_roc(y_test, test_scores, report_dir / "roc.png", f"{title}: test ROC")),
             "confusion": str(plot_confusion(test["confusion"], report_dir / "confusion.png",
                                             f"{title}: threshold {threshold:.3f}"))}
    wrong = np.flatnonzero((test_scores >= threshold) != (y_test == 1))
    wrong = wrong[np.argsort(-np.abs(test_scores[wrong] - threshold))][:12]
    pictures = np.asarray(tensors["test"])
    files["misclassified"] = str(plot_grid(
        [pictures[i] for i in wrong], [f"{test_items[i].label} p={test_scores[i]:.2f}" for i in wrong],
        report_dir / "misclassified.png",
        f"{title}: misclassified test faces at threshold {threshold:.3f} ({len(wrong)} shown, true label above)"))
    explain = []
    for label in (0, 1):  # the most confident faces of each class: what the model looks at
        members = np.flatnonzero(y_test == label)
        explain += members[np.argsort(-np.abs(test_scores[members] - 0.5))][:3].tolist()
    if explain:
        heat = grad_cam(explained, pictures[explain], last_conv)
        files["gradcam"] = str(plot_grid(
            [pictures[i] for i in explain], [f"{test_items[i].label} p={test_scores[i]:.2f}" for i in explain],
            report_dir / "gradcam.png", f"{title}: Grad-CAM ({last_conv})", overlays=list(heat)))
    np.savez_compressed(report_dir / "scores.npz", test_ids=[i.image_id for i in test_items], test_scores=test_scores,
                        validation_ids=[i.image_id for i in val_items], validation_scores=val_scores)
    return clean_json({"threshold": threshold, "target_fpr": target_fpr, "operating_point": point,
                       "test": test, "validation": validation,
                       "per_source": sources, "robustness": robustness, "files": files})


def report_markdown(title: str, evaluation: Mapping[str, Any], confound: Mapping[str, Any] | None,
                    embed: bool = True) -> str:
    """The evaluation as markdown (a Prefect artifact and report.md), plots embedded when ``embed``."""
    test = evaluation["test"]
    from facetrace.tasks.registry import operating_point_text

    intervals = (test.get("intervals") or {}).get("metrics") or {}
    lines = [f"# {title}", "", f"Decision threshold {evaluation['threshold']:.4f}: "
             f"{operating_point_text(evaluation.get('operating_point'))}.", "",
             "| metric | test | 95% interval |", "|---|---:|---:|"]
    for key in ("n", "roc_auc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "accuracy", "precision", "recall", "f1", "ece"):
        value = test.get(key)
        shown = '' if value is None else (f'{value:.4f}' if isinstance(value, float) else value)
        interval = f"{intervals[key][0]:.4f}-{intervals[key][1]:.4f}" if key in intervals else ""
        lines.append(f"| {key} | {shown} | {interval} |")
    if confound:
        auc = confound.get("roc_auc")
        warning = (" — **WARNING: the classes are separable from file metadata alone.**"
                   if confound.get("warning") else "")
        lines += ["", f"Confound audit (metadata-only classifier): ROC AUC "
                      f"{'n/a' if auc is None else f'{auc:.3f}'}{warning}"]
    if evaluation.get("robustness"):
        lines += ["", *robustness_lines(evaluation["robustness"])]
    lines += ["", "Files: " + ", ".join(f"`{path}`" for path in evaluation["files"].values())]
    if embed:
        for key in ("roc", "confusion", "gradcam"):
            if key in evaluation["files"]:
                lines += ["", f"![{key}]({data_uri(Path(evaluation['files'][key]))})"]
    return "\n".join(lines) + "\n"


def with_interval(value: Any, interval: Sequence[float] | None, digits: int = 4) -> str:
    """``0.9812 [0.9701, 0.9890]``: a figure and its 95% interval (either may be missing)."""
    if value is None:
        return ""
    shown = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return f"{shown} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]" if interval else shown


def robustness_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The robustness table as markdown: each figure with its 95% interval, the counts, and each
    variant's ROC AUC difference from the original (paired bootstrap)."""
    lines = ["| variant | real / synthetic | ROC AUC [95%] | ROC AUC vs original [95%] | accuracy [95%] | "
             "TPR at 5% FPR [95%] | FPR [95%] |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        intervals = row.get("intervals") or {}
        delta = row.get("roc_auc_vs_original") or {}
        shifted = with_interval(delta.get("delta"), delta.get("interval")) if delta.get("delta") is not None else ""
        counts = f"{row['real']} / {row['synthetic']}" if "real" in row else str(row.get("n", ""))
        lines.append(f"| {row['variant']} | {counts} | {with_interval(row.get('roc_auc'), intervals.get('roc_auc'))} | "
                     f"{shifted} | {with_interval(row.get('accuracy'), intervals.get('accuracy'))} | "
                     f"{with_interval(row.get('tpr_at_5pct_fpr'), intervals.get('tpr_at_5pct_fpr'))} | "
                     f"{with_interval(row.get('fpr'), intervals.get('fpr'), 3)} |")
    return lines


def per_source_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The per-source table as markdown, each figure with its 95% interval."""
    lines = ["| source | label | n | accuracy [95%] | mean score [95%] |", "|---|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['source']} | {row['label']} | {row['n']} | "
                     f"{with_interval(row.get('accuracy'), row.get('accuracy_interval'))} | "
                     f"{with_interval(row.get('mean_score'), row.get('mean_score_interval'))} |")
    return lines


# ---------------------------------------------------------------- Prefect tasks


@task(name="confound-audit", cache_policy=NO_CACHE)
def audit_confounds(split: SnapshotSplit) -> dict[str, Any]:
    """The confound audit on a snapshot's train and test splits (logged as a warning when it bites)."""
    audit = confound_audit(split.part("train"), split.part("test"))
    (get_run_logger().warning if audit.warns else get_run_logger().info)(audit.message())
    return clean_json(audit.as_dict())


@task(name="evaluate-model", cache_policy=NO_CACHE, task_run_name="evaluate-{trained.backbone}")
def evaluate_model(trained: TrainedModel, split: SnapshotSplit, tensor_files: dict[str, str], report_dir: Path,
                   data_dir: Path, target_fpr: float, robustness_images: int,
                   threshold_rule: str = "upper_bound", bootstrap_resamples: int = 1000) -> dict[str, Any]:
    """Load the saved model (safe mode, sha256 checked) and evaluate it on its snapshot."""
    from facetrace.tasks.training import SCORES, TrainConfig, load_model, load_tensors

    model = load_model(trained.path, trained.sha256)
    config = TrainConfig.from_hyperparameters(trained.hyperparameters)
    flip = config.test_time_flip
    members = [(m["backbone"], m["sha256"], model.get_layer(f"facetrace_{m['backbone']}"))
               for m in trained.hyperparameters.get("members", [])]
    if members:
        # An ensemble scores as the mean of its members, whose scores on these very images are
        # usually remembered from their own evaluation; Grad-CAM looks into its first member.
        def score(images: np.ndarray) -> np.ndarray:
            return np.mean([SCORES.scores(net, sha, images, flip=flip) for _, sha, net in members], axis=0)
    else:
        def score(images: np.ndarray) -> np.ndarray:
            return SCORES.scores(model, trained.sha256, images, flip=flip)

    explained, last_conv = explained_network(model, trained.hyperparameters)
    return evaluate_detector(score, config.preprocess, split, load_tensors(tensor_files), report_dir,
                             data_dir=data_dir, explained=explained, last_conv=last_conv,
                             title=f"{trained.backbone} (snapshot {split.snapshot_id})", target_fpr=target_fpr,
                             robustness_images=robustness_images, threshold_rule=threshold_rule,
                             bootstrap_resamples=bootstrap_resamples)


@task(name="score-champion", cache_policy=NO_CACHE)
def score_against_champion(champion: dict[str, Any], candidate: dict[str, Any], split: SnapshotSplit,
                           data_dir: Path, catalog_url: str, primary: str = "roc_auc",
                           resamples: int = 1000) -> tuple[dict[str, Any], dict[str, Any], int, dict[str, Any]]:
    """Champion and candidate scored on the same test images: the new snapshot's test split, minus any
    image the champion trained or validated on (it would otherwise be judged on faces it has seen).
    Returns both metrics (each with bootstrap intervals), the image count, and the paired bootstrap
    of the difference in ``primary`` (candidate minus champion) the gate decides on."""
    from sqlalchemy import select

    from facetrace.db.engine import get_engine, session_scope
    from facetrace.db.models import SnapshotImage
    from facetrace.tasks.store import ObjectCache, image_paths
    from facetrace.tasks.training import TrainConfig, load_model, predict_scores, prepare_file

    with session_scope(get_engine(catalog_url)) as session:
        seen = set(session.scalars(select(SnapshotImage.image_id).where(
            SnapshotImage.snapshot_id == champion["snapshot_id"], SnapshotImage.split != "test")))
    items = [i for i in split.part("test") if i.image_id not in seen]
    if len({i.label for i in items}) < 2:
        # Too little unseen data to rank them; the whole test split is the fairest remaining ground.
        get_run_logger().warning("the champion saw most of this test split; comparing on all %d test images",
                                 len(split.part("test")))
        items = split.part("test")
    labels = np.array([i.target for i in items])
    results, scored = [], []
    for entry in (champion, candidate):
        model = load_model(entry["path"], entry["sha256"])
        config = TrainConfig.from_hyperparameters(entry["hyperparameters"])
        preprocess = config.preprocess
        local = image_paths(items, ObjectCache.from_settings(data_dir=data_dir))
        pictures = (np.stack([prepare_file(path, preprocess) for path in local])
                    if items else np.zeros((0, preprocess.image_size, preprocess.image_size, 3), np.uint8))
        scores = predict_scores(model, pictures, flip=config.test_time_flip)
        scored.append(scores)
        metrics = binary_metrics(labels, scores, entry["threshold"]) if items else {}
        if items:
            metrics["intervals"] = bootstrap_intervals(labels, scores, entry["threshold"], resamples=resamples)
        results.append(clean_json(metrics))
    paired = paired_difference(labels, scored[1], scored[0], primary, threshold_candidate=candidate["threshold"],
                               threshold_champion=champion["threshold"], resamples=resamples)
    return results[0], results[1], len(items), clean_json(paired)
