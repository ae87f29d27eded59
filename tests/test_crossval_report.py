"""bench/crossval.py's spread over seeds: per-fold rows and mean ± sd of the fold means per seed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.crossval import ensemble_folds, fold_results, report_seeds, scoring_views, seed_summary  # noqa: E402


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


def test_realised_fpr_is_pooled_over_folds_and_seeds_with_an_exact_interval(capsys):
    """False positives summed over every fold of every seed over the real faces they rest on; the target
    is judged against the exact interval of that rate, not fold by fold."""
    from scipy.stats import binomtest

    records = [record(0, [0.9, 0.8], [0.0, 0.1]), record(1, [0.95, 0.95], [0.025, 0.025]),
               record(2, [0.7, 0.9], [0.05, 0.0])]
    pooled = seed_summary(records)["xception"]["pooled_fpr"]["realised_fpr"]
    exact = binomtest(8, 240).proportion_ci(confidence_level=0.95, method="exact")
    assert (pooled["false_positives"], pooled["reals"]) == (8, 240)
    assert pooled["interval"] == pytest.approx([exact.low, exact.high])
    assert pooled["verdict"] == "consistent with it"
    report_seeds(records, None)
    assert "| xception | validation split, settings' rule | 8 / 240 | 0.033 (" in capsys.readouterr().out
    # A rule that lets through 12% of 240 real faces is over a 5% target; one that lets through none is under it.
    assert seed_summary([record(0, [0.9] * 6, [0.125] * 6)])["xception"]["pooled_fpr"]["realised_fpr"]["verdict"] \
        == "over the target"
    assert seed_summary([record(0, [0.9] * 6, [0.0] * 6)])["xception"]["pooled_fpr"]["realised_fpr"]["verdict"] \
        == "under the target"


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


def scored_fold(fold: int, val_scores, test_scores, val_labels, test_labels) -> dict:
    """A fold as run_seed records it, with only what the ensemble needs besides the metrics."""
    return {"fold": fold, "roc_auc": 0.9, "tpr_at_1pct_fpr": 0.5, "tpr_at_5pct_fpr": 0.7, "realised_fpr": 0.0,
            "target_fpr": 0.05, "threshold_rule": "upper_bound", "test_reals": int(len(test_labels) - sum(test_labels)),
            "expected_fpr_interval": [0.0, 0.05], "realised_fpr_empirical_rule": 0.0,
            "validation_labels": list(val_labels), "validation_scores": list(val_scores),
            "test_labels": list(test_labels), "test_scores": list(test_scores)}


def test_the_ensemble_is_scored_per_fold_as_the_registry_judges_it(capsys):
    """Mean of the backbones' registered scores; the settings' rule on the mean validation scores; test
    metrics at that threshold. Two backbones that each rank a different real face above every synthetic
    one miss everything at 1% FPR alone, and the ensemble does not."""
    from facetrace.tasks.evaluation import binary_metrics
    from facetrace.tasks.registry import operating_point

    rng = np.random.default_rng(0)
    val_y = [0] * 80 + [1] * 80
    test_y = [0] * 60 + [1] * 60
    val_a, val_b = rng.uniform(0, 0.5, 160) + np.repeat([0, 0.5], 80), rng.uniform(0, 0.5, 160) + np.repeat([0, 0.5], 80)
    test_a = np.concatenate([rng.uniform(0, 0.3, 60), rng.uniform(0.8, 0.95, 60)])
    test_b = np.concatenate([rng.uniform(0, 0.3, 60), rng.uniform(0.8, 0.95, 60)])
    test_a[0], test_b[1] = 0.99, 0.99  # one real outlier each, a different face
    a = [scored_fold(3, val_a, test_a, val_y, test_y)]
    b = [scored_fold(3, val_b, test_b, val_y, test_y)]
    (fold,) = ensemble_folds([a, b])
    mean_val, mean_test = (val_a + val_b) / 2, (test_a + test_b) / 2
    point = operating_point(val_y, mean_val, 0.05, "upper_bound")
    expected = binary_metrics(np.array(test_y), mean_test, point["threshold"])
    assert fold["fold"] == 3 and fold["test_scores"] == pytest.approx(mean_test.tolist())
    assert fold["threshold"] == pytest.approx(point["threshold"])
    assert fold["expected_fpr_interval"] == pytest.approx(point["fpr_interval"])
    for key, name in (("roc_auc", "roc_auc"), ("tpr_at_1pct_fpr", "tpr_at_1pct_fpr"), ("realised_fpr", "fpr")):
        assert fold[key] == pytest.approx(expected[name])
    assert binary_metrics(np.array(test_y), test_a, 0.5)["tpr_at_1pct_fpr"] == 0.0
    assert fold["tpr_at_1pct_fpr"] == 1.0

    record = {"seed": 0, "results": {"mobilenet_v2": {"per_fold": a}, "xception": {"per_fold": b}}}
    assert list(fold_results(record)) == ["mobilenet_v2", "xception", "ensemble"]
    report_seeds([record], None)
    printed = capsys.readouterr().out
    assert "| ensemble | 0 | 3 | 60 |" in printed
    assert "mobilenet_v2 alone vs the ensemble of every backbone" in printed
    assert "| tpr_at_1pct_fpr | 0.500 ± nan | 1.000 ± nan | +0.500 [+0.500, +0.500] | 1 / 0 |" in printed

    # Folds scored on other images cannot be averaged.
    b[0]["test_labels"] = list(reversed(test_y))
    with pytest.raises(ValueError, match="same images"):
        ensemble_folds([a, b])


def test_test_time_views_are_compared_fold_by_fold_with_the_registered_scoring(capsys):
    records = [record(0, [0.9, 0.8], [0.0, 0.1])]
    for fold, change in zip(records[0]["results"]["xception"]["per_fold"], (0.02, -0.04)):
        fold.update(views_roc_auc=fold["roc_auc"] + change, views_tpr_at_1pct_fpr=fold["tpr_at_1pct_fpr"],
                    views_tpr_at_5pct_fpr=fold["tpr_at_5pct_fpr"] + 0.1,
                    views_realised_fpr=fold["realised_fpr"] + change, test_view_scores=[[0.5]] * 8)
    report_seeds(records, None)
    printed = capsys.readouterr().out
    assert "image + mirror image (registered) vs 8 test-time views averaged" in printed
    assert "| roc_auc | 0.850 ± nan | 0.840 ± nan | -0.010 [-0.040, +0.020] | 1 / 1 |" in printed
    assert "| tpr_at_1pct_fpr | 0.650 ± nan | 0.650 ± nan | +0.000 [+0.000, +0.000] | 0 / 0 |" in printed
    assert "| realised_fpr | 0.050 ± nan | 0.040 ± nan | -0.010 [-0.040, +0.020] | 1 / 1 |" in printed


def test_members_are_fits_of_one_backbone_from_their_own_initialisations_and_their_mean_is_the_ensemble(
        tmp_path, monkeypatch, capsys):
    """--members 2: every fold fits the backbone twice, seeded seed and seed + MEMBER_SEED_STEP, records
    them as backbone and backbone@1 on the same folds, and the ensemble row is the mean of both."""
    import argparse
    import types

    from bench import crossval
    from facetrace.tasks import training

    seeds_fitted: list[tuple[int, str]] = []

    def fake_train(x, y, vx, vy, config, out_dir, threads=None):
        seeds_fitted.append((config.seed, out_dir.name))
        return types.SimpleNamespace(path=out_dir, sha256=str(config.seed), seconds=1.0, epochs_run=1, best_epoch=1)

    def fake_scores(model, images, flip=False):  # a member's scores: the label plus noise of its own seed
        noise = np.random.default_rng(int(model)).uniform(0, 0.6, len(images))
        return images.reshape(len(images), -1)[:, 0] / 255 * 0.4 + noise

    n = 60
    y = np.array([0.0, 1.0] * (n // 2), np.float32)
    monkeypatch.setattr(training, "cached_tensors",
                        lambda *a, **k: np.repeat((y * 255).astype(np.uint8), 12).reshape(n, 2, 2, 3))
    monkeypatch.setattr(training, "train_backbone", fake_train)
    monkeypatch.setattr(training, "load_model", lambda path, sha256: sha256)
    monkeypatch.setattr(training, "predict_scores", fake_scores)
    monkeypatch.setattr(crossval, "_release_memory", lambda: None)
    items = [types.SimpleNamespace(sha256=f"{i:064x}") for i in range(n)]
    labels = ["synthetic" if v else "real" for v in y]
    args = argparse.Namespace(
        folds=3, backbones="mobilenet_v2", members=2, image_size=None, epochs=None, learning_rate=None,
        width=None, time_budget=None, precision="float32", patience=None, crop=None, input_filter=None,
        reencode_size=None, batch_size=None, jpeg_quality=None, no_format_neutral=False, no_augment=False,
        threshold_holdout=0.0, test_time_views=False, only_folds=None, threads=1)
    settings = types.SimpleNamespace(data_dir=tmp_path, target_fpr=0.05, threshold_rule="upper_bound")

    result = crossval.run_seed(7, args, settings, items, [""] * n, labels, y, list(range(n)))

    assert sorted({seed for seed, _ in seeds_fitted}) == [7, 7 + crossval.MEMBER_SEED_STEP]
    assert len(seeds_fitted) == 2 * 3 and len({d for _, d in seeds_fitted}) == 6  # every fit its own folder
    assert list(result["results"]) == ["mobilenet_v2", "mobilenet_v2@1"]
    assert result["results"]["mobilenet_v2@1"]["config"]["seed"] == 7 + crossval.MEMBER_SEED_STEP
    per = fold_results(result)
    assert list(per) == ["mobilenet_v2", "mobilenet_v2@1", "ensemble"]
    a, b = (per[k][0] for k in ("mobilenet_v2", "mobilenet_v2@1"))
    assert a["test_scores"] != b["test_scores"]
    assert per["ensemble"][0]["test_scores"] == pytest.approx(((np.array(a["test_scores"]) +
                                                                np.array(b["test_scores"])) / 2).tolist())
    report_seeds([result], None)
    assert "mobilenet_v2@1 alone vs the ensemble of every backbone" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="at least 1"):
        crossval.member_fits(["mobilenet_v2"], 0)
