"""bench/crossval.py's spread over seeds: per-fold rows and mean ± sd of the fold means per seed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.crossval import report_seeds, scoring_views, seed_summary  # noqa: E402


def record(seed: int, aucs: list[float], fprs: list[float]) -> dict:
    folds = [{"fold": i, "roc_auc": auc, "tpr_at_1pct_fpr": auc - 0.2, "tpr_at_5pct_fpr": auc - 0.1,
              "realised_fpr": fpr, "target_fpr": 0.05, "threshold_rule": "upper_bound", "test_reals": 40,
              "expected_fpr_interval": [0.0, 0.07], "realised_fpr_empirical_rule": fpr + 0.04}
             for i, (auc, fpr) in enumerate(zip(aucs, fprs))]
    return {"seed": seed, "results": {"xception": {"per_fold": folds}}}


def test_mean_and_sd_over_seeds_of_each_seeds_fold_means(tmp_path, capsys):
    records = [record(0, [0.9, 0.8], [0.0, 0.1]), record(1, [0.95, 0.95], [0.025, 0.025]),
               record(2, [0.7, 0.9], [0.05, 0.0])]
    summary = seed_summary(records)["xception"]
    fold_means = [0.85, 0.95, 0.8]
    assert summary["roc_auc"]["mean"] == pytest.approx(np.mean(fold_means))
    assert summary["roc_auc"]["sd"] == pytest.approx(np.std(fold_means, ddof=1))
    assert summary["tpr_at_1pct_fpr"]["mean"] == pytest.approx(np.mean(fold_means) - 0.2)
    assert summary["realised_fpr"]["mean"] == pytest.approx(np.mean([0.05, 0.025, 0.025]))
    assert [s["folds_over_target"] for s in summary["per_seed"]] == [1, 0, 0]
    out = tmp_path / "cv.json"
    report_seeds(records, str(out))
    printed = capsys.readouterr().out
    assert "| xception | 1 | 0 | 40 |" in printed and "1 of 6" in printed
    assert f"{np.mean(fold_means):.3f} ± {np.std(fold_means, ddof=1):.3f}" in printed
    assert json.loads(out.read_text())["summary"]["xception"]["roc_auc"]["mean"] == pytest.approx(np.mean(fold_means))


def test_thresholds_from_a_held_out_share_are_reported_beside_the_validation_splits(capsys):
    """--threshold-holdout records a second realised FPR per fold; the summary compares where the
    threshold came from, with folds over the target for each."""
    records = [record(0, [0.9, 0.8], [0.15, 0.10]), record(1, [0.95, 0.95], [0.125, 0.0])]
    for r, held in zip(records, ([0.04, 0.0], [0.02, 0.06])):
        for fold, fpr in zip(r["results"]["xception"]["per_fold"], held):
            fold.update(realised_fpr_holdout=fpr, realised_fpr_holdout_empirical_rule=fpr + 0.05)
    summary = seed_summary(records)["xception"]
    assert summary["realised_fpr_holdout"]["mean"] == pytest.approx(np.mean([0.02, 0.04]))
    assert [s["over_target"]["realised_fpr_holdout"] for s in summary["per_seed"]] == [0, 1]
    assert [s["over_target"]["realised_fpr"] for s in summary["per_seed"]] == [2, 1]
    report_seeds(records, None)
    printed = capsys.readouterr().out
    assert "| held-out share, settings' rule | 0.030 ± 0.014 | 1 of 4 |" in printed
    assert "| validation split, settings' rule | 0.094 ± 0.044 | 3 of 4 |" in printed
    # A run without the held-out share prints no such comparison.
    report_seeds([record(0, [0.9], [0.0])], None)
    assert "held-out share" not in capsys.readouterr().out


def test_test_time_views_are_the_image_its_mirror_and_small_rotations_and_zooms_of_both():
    # A bright square off the centre: where it lands tells what each view did.
    images = np.zeros((2, 32, 32, 3), np.uint8)
    images[:, 4:12, 20:28] = 200
    views = scoring_views(images, ((0.0, 1.0), (0.0, 0.8), (10.0, 1.0)))
    assert len(views) == 6 and all(v.shape == images.shape and v.dtype == np.uint8 for v in views)
    assert np.array_equal(views[0], images) and np.array_equal(views[1], images[:, :, ::-1])
    for view, mirror in zip(views[::2], views[1::2]):
        assert np.array_equal(mirror, view[:, :, ::-1])
    zoomed, rotated = views[2], views[4]

    def centre_of_mass(picture):
        ys, xs = np.nonzero(picture[..., 0] > 100)
        return ys.mean() - 15.5, xs.mean() - 15.5

    # A zoom-in pushes the square away from the centre; a rotation keeps its distance but turns it.
    before, after = centre_of_mass(images[0]), centre_of_mass(zoomed[0])
    assert np.hypot(*after) > np.hypot(*before) * 1.1
    turned = centre_of_mass(rotated[0])
    assert abs(np.hypot(*turned) - np.hypot(*before)) < 1.0
    assert abs(np.degrees(np.arctan2(*turned) - np.arctan2(*before))) == pytest.approx(10.0, abs=3.0)
    assert (rotated[0] > 100).sum() == pytest.approx((images[0] > 100).sum(), rel=0.2)
