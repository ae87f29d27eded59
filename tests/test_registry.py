"""The registry: threshold on validation, the champion gate, one champion in the database, model
cards; and the whole path on tiny data (snapshot, split, both backbones, evaluation, registry,
`facetrace models` and `facetrace predict`)."""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image as PILImage

from facetrace.tasks.registry import best_candidate, choose_threshold, gate

# ---------------------------------------------------------------- threshold


def test_threshold_keeps_validation_false_positives_within_the_target():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(200), np.ones(200)].astype(int)
    scores = np.r_[rng.beta(2, 5, 200), rng.beta(5, 2, 200)]
    for target in (0.01, 0.05, 0.2):
        t = choose_threshold(labels, scores, target)
        fpr = ((scores >= t) & (labels == 0)).sum() / 200
        assert fpr <= target
        # ...and it is the lowest such threshold: one real face more would be let through below it.
        reals_above = np.sort(scores[labels == 0])[::-1][: int(math.floor(target * 200)) + 1]
        assert t > reals_above[-1]


def test_threshold_without_real_faces_falls_back_to_one_half():
    assert choose_threshold([1, 1], [0.2, 0.9], 0.05) == 0.5


def _planted(rng, reals: int, synthetic: int = 100):
    """Real faces score N(0, 1), synthetic ones N(2.5, 1); the true FPR of threshold t is sf(t)."""
    labels = np.r_[np.zeros(reals), np.ones(synthetic)].astype(int)
    return labels, np.r_[rng.normal(0, 1, reals), rng.normal(2.5, 1, synthetic)]


@pytest.mark.parametrize("reals", [98, 300])
def test_the_operating_point_holds_on_new_faces_and_its_interval_covers_the_realised_fpr(reals):
    from facetrace.tasks.registry import operating_point

    rng = np.random.default_rng(13)
    held_out = rng.normal(0, 1, 200_000)  # a large sample of new real faces from the same distribution
    inside = within_target = empirical_within = 0
    trials = 200
    for _ in range(trials):
        labels, scores = _planted(rng, reals)
        point = operating_point(labels, scores, 0.05)
        realised = float((held_out >= point["threshold"]).mean())
        lo, hi = point["fpr_interval"]
        inside += lo <= realised <= hi
        within_target += realised <= 0.05
        empirical = operating_point(labels, scores, 0.05, rule="empirical")
        empirical_within += float((held_out >= empirical["threshold"]).mean()) <= 0.05
        assert point["real_faces"] == reals and point["rule"] == "upper_bound" and point["bound_met"]
        assert point["false_positives"] == int(((scores >= point["threshold"]) & (labels == 0)).sum())
    # The reported 95% interval holds the FPR realised on new faces (exact interval: >= 95% in theory).
    assert inside / trials >= 0.93
    # The bound rule keeps the realised FPR within the target in >= 95% of draws (theory), while the
    # empirical rule on the same scores overshoots about half the time (the 13.3% at 5%).
    assert within_target / trials >= 0.93
    assert empirical_within / trials < 0.75


def test_with_too_few_real_faces_for_the_bound_every_real_face_seen_is_rejected():
    from facetrace.tasks.registry import operating_point, operating_point_text

    labels, scores = _planted(np.random.default_rng(1), 20, 20)
    point = operating_point(labels, scores, 0.05)
    assert point["false_positives"] == 0 and not point["bound_met"]
    assert point["threshold"] > scores[labels == 0].max()
    assert point["fpr_interval"][0] == 0.0 and point["fpr_interval"][1] > 0.15  # 0 of 20 says little
    assert "too few real faces" in operating_point_text(point) and "on 20 real validation faces" in (
        operating_point_text(point))
    with pytest.raises(ValueError, match="unknown threshold rule"):
        operating_point(labels, scores, rule="guess")


# ---------------------------------------------------------------- the gate


def m(auc, tpr1=0.5):
    return {"roc_auc": auc, "tpr_at_1pct_fpr": tpr1}


def test_better_candidate_is_promoted_and_worse_stays_candidate():
    assert gate(m(0.95), m(0.90), margin=0.01).promote
    assert not gate(m(0.90), m(0.95), margin=0.01).promote
    assert not gate(m(0.905), m(0.90), margin=0.01).promote  # better, but not by the margin
    assert gate(m(0.91), m(0.90), margin=0.01).promote  # exactly the margin counts
    assert gate(m(0.5), None).promote  # no champion yet


def test_ties_on_the_primary_metric_follow_the_tie_break_rule():
    # No margin: a tie on ROC AUC is decided by TPR at 1% FPR, and only a strictly better one wins.
    assert gate(m(0.9, tpr1=0.6), m(0.9, tpr1=0.5), margin=0.0).promote
    assert not gate(m(0.9, tpr1=0.5), m(0.9, tpr1=0.6), margin=0.0).promote
    assert not gate(m(0.9, tpr1=0.5), m(0.9, tpr1=0.5), margin=0.0).promote
    # A positive margin cannot be cleared by a tie.
    assert not gate(m(0.9, tpr1=0.9), m(0.9, tpr1=0.1), margin=0.01).promote
    # Among one run's candidates the same order applies; a full tie keeps the earliest.
    assert best_candidate([(1, m(0.9, 0.5)), (2, m(0.9, 0.7)), (3, m(0.8, 1.0))]) == 2
    assert best_candidate([(4, m(0.9, 0.5)), (3, m(0.9, 0.5))]) == 3


def test_the_gate_does_not_promote_on_a_difference_inside_the_noise():
    from facetrace.tasks.evaluation import paired_difference

    rng = np.random.default_rng(4)
    labels = np.r_[np.zeros(100), np.ones(100)].astype(int)
    truth = np.r_[rng.normal(0, 1, 100), rng.normal(2.0, 1, 100)]
    champion = truth + rng.normal(0, 0.3, 200)
    # A candidate that is the champion plus a little noise: its AUC differs by chance only. The first
    # such draw that happens to score higher is the one a naive gate would promote.
    noise = None
    while noise is None or noise["delta"] <= 0:
        noise = paired_difference(labels, champion + rng.normal(0, 0.15, 200), champion, "roc_auc")
    assert gate({"roc_auc": 0.9 + noise["delta"]}, {"roc_auc": 0.9}, margin=0.0).promote  # without the interval
    assert noise["interval"][0] <= 0 <= noise["interval"][1] and noise["n"] == 200
    decision = gate({"roc_auc": 0.9 + noise["delta"]}, {"roc_auc": 0.9}, margin=0.0, paired=noise)
    assert not decision.promote and "within the noise" in decision.reason and "200 test images" in decision.reason
    # A candidate that really separates the classes better clears both the margin and the noise.
    better = np.r_[rng.normal(0, 1, 100), rng.normal(4.0, 1, 100)]
    real = paired_difference(labels, better, champion, "roc_auc")
    assert real["interval"][0] > 0 and real["delta"] > 0.01
    assert gate({"roc_auc": 0.99}, {"roc_auc": 0.9}, margin=0.005, paired=real).promote
    assert not gate({"roc_auc": 0.99}, {"roc_auc": 0.9}, margin=real["delta"] + 0.01, paired=real).promote
    # Seeded: the same scores give the same interval.
    assert paired_difference(labels, better, champion, "roc_auc") == real


def test_bootstrap_intervals_bracket_the_figures_with_their_counts():
    from facetrace.tasks.evaluation import binary_metrics, bootstrap_intervals, resample_metrics

    rng = np.random.default_rng(2)
    labels = np.r_[np.zeros(98), np.ones(86)].astype(int)
    scores = np.r_[rng.beta(2, 5, 98), rng.beta(5, 2, 86)]
    point = binary_metrics(labels, scores, 0.6)
    fast = resample_metrics(scores[labels == 1], scores[labels == 0], 0.6)
    for name, value in fast.items():  # the bootstrap's own metric code agrees with the reported figures
        assert value == pytest.approx(point[name], abs=1e-9), name
    result = bootstrap_intervals(labels, scores, 0.6, resamples=400)
    assert (result["real"], result["synthetic"], result["n"], result["resamples"]) == (98, 86, 184, 400)
    for name, (lo, hi) in result["metrics"].items():
        assert lo <= point[name] <= hi and lo < hi, name
    assert bootstrap_intervals(labels, scores, 0.6, resamples=400) == result  # seeded
    assert bootstrap_intervals(labels[:98], scores[:98], 0.6)["metrics"] == {}  # one class: no intervals


def test_robustness_and_per_source_rows_carry_intervals_and_a_format_leaning_detector_is_named(monkeypatch):
    """Every robustness row has 95% intervals with its counts and, after the original, its ROC AUC change
    with a paired interval; a detector that falls apart when formats swap gets a warning, one that only
    wobbles within the noise does not. Per-source accuracy has its exact interval."""
    from facetrace.tasks import evaluation
    from facetrace.tasks.registry import model_card_markdown, model_warnings

    rng = np.random.default_rng(3)
    labels = ["real"] * 60 + ["synthetic"] * 60
    y = np.array([int(label == "synthetic") for label in labels])
    face = np.r_[rng.normal(0, 1, 60), rng.normal(2.5, 1, 60)]  # what the faces say
    # Scores per variant (the "bytes" here are variant names): a format-leaning detector collapses
    # when formats swap; every other variant keeps the faces' evidence.
    def score_bytes(blobs):
        variant = blobs[0].decode()
        raw = (0.3 * face + rng.normal(0, 1.5, len(face)) if variant == "format_swapped"
               else face + rng.normal(0, 0.05, len(face)))
        return 1 / (1 + np.exp(-raw))

    monkeypatch.setattr(evaluation, "variant_bytes", lambda path, label, variant: variant.encode())
    rows = evaluation.robustness_table(["x"] * 120, labels, 0.5, score_bytes,
                                       ("original", "jpeg90", "format_swapped"), resamples=300)
    original, jpeg, swapped = rows
    for row in rows:
        assert (row["real"], row["synthetic"], row["n"]) == (60, 60, 120)
        for name in ("roc_auc", "accuracy", "tpr_at_5pct_fpr", "fpr"):
            lo, hi = row["intervals"][name]
            assert lo <= row[name] <= hi, (row["variant"], name)
    assert "roc_auc_vs_original" not in original
    assert jpeg["roc_auc_vs_original"]["interval"][0] <= 0.01  # noise only
    change = swapped["roc_auc_vs_original"]
    assert change["delta"] < -0.01 and change["interval"][1] < 0, change
    table = "\n".join(evaluation.robustness_lines(rows))
    assert "60 / 60" in table and f"{swapped['roc_auc']:.4f} [" in table

    assert not model_warnings({"robustness": [original, jpeg]})
    (warning,) = model_warnings({"robustness": rows})
    assert warning.startswith("file history:") and f"{-change['delta']:.3f}" in warning

    sources = evaluation.per_source(["kaggle"] * 60 + ["sd"] * 60, y, 1 / (1 + np.exp(-face)), 0.5, resamples=300)
    for row in sources:
        lo, hi = row["accuracy_interval"]
        assert lo <= row["accuracy"] <= hi and lo < hi and row["n"] == 60
        lo, hi = row["mean_score_interval"]
        assert lo < row["mean_score"] < hi
    card = model_card_markdown(backbone="mobilenet_v2", version=1, stage="candidate", sha256="0" * 64, path="m.keras",
                               snapshot={}, hyperparameters={}, metrics={"per_source": sources, "robustness": rows,
                                                                         "test": {}},
                               threshold=0.5, target_fpr=0.05)
    assert "| kaggle | real | 60 | " in card and "ROC AUC vs original [95%]" in card


def test_a_missing_metric_never_wins():
    assert not gate({"roc_auc": None}, m(0.6)).promote
    assert gate(m(0.6), {"roc_auc": None}).promote


# ---------------------------------------------------------------- one champion in the catalog


@pytest.fixture
def catalog(catalog_url):
    from facetrace.db.engine import dispose_engines, get_engine

    engine = get_engine(catalog_url)
    yield engine
    dispose_engines()


def _snapshot(session) -> int:
    from facetrace.db.models import Snapshot

    snapshot = Snapshot(seed=0, image_count=0, content_hash="0" * 64)
    session.add(snapshot)
    session.flush()
    return snapshot.id


def test_promotion_archives_the_previous_champion_and_the_database_allows_only_one(catalog):
    from sqlalchemy.exc import IntegrityError

    from facetrace.db.engine import session_scope
    from facetrace.db.models import Model
    from facetrace.tasks.registry import add_candidate, current_champion, promote

    def candidate(session, snapshot_id, auc):
        return add_candidate(session, backbone="mobilenet_v2", path="/m.keras", sha256="a" * 64,
                             snapshot_id=snapshot_id, image_size=96, hyperparameters={}, metrics={"test": m(auc)},
                             threshold=0.5).id

    with session_scope(catalog) as session:
        sid = _snapshot(session)
        first, second = candidate(session, sid, 0.9), candidate(session, sid, 0.95)
        assert promote(session, first) is None
    with session_scope(catalog) as session:
        assert promote(session, second) == first
    with session_scope(catalog) as session:
        assert current_champion(session).id == second
        assert session.get(Model, first).stage == "archived"
        assert [session.get(Model, i).version for i in (first, second)] == [1, 2]
    with pytest.raises(IntegrityError), session_scope(catalog) as session:
        session.get(Model, first).stage = "champion"  # a second champion is refused by the index
        session.flush()


@pytest.mark.parametrize("keep", [0, 2])
def test_after_n_plus_two_runs_only_the_champion_and_n_recent_models_stay_on_disk(catalog, tmp_path, keep):
    from facetrace.db.engine import session_scope
    from facetrace.db.models import Model
    from facetrace.tasks.registry import add_candidate, promote, prune_models, registry_rows, resolve_model

    files = {}
    with session_scope(catalog) as session:
        sid = _snapshot(session)
    for run in range(keep + 2):  # each run registers one candidate; the first two runs promote theirs
        artifact = tmp_path / f"run{run}" / "model.keras"
        artifact.parent.mkdir()
        artifact.write_bytes(b"weights" * 100)
        with session_scope(catalog) as session:
            row = add_candidate(session, backbone="mobilenet_v2", path=str(artifact), sha256="a" * 64,
                                snapshot_id=sid, image_size=96, hyperparameters={}, metrics={"test": m(0.9)},
                                threshold=0.5)
            files[row.id] = artifact
            if run < 2:
                promote(session, row.id)
            prune_models(session, keep)
    with session_scope(catalog) as session:
        rows = {row.id: row for row in session.query(Model)}
        champion = next(i for i, row in rows.items() if row.stage == "champion")
        on_disk = {i for i, path in files.items() if path.exists()}
        newest_others = sorted((i for i in rows if i != champion), reverse=True)[:keep]
        assert on_disk == {champion, *newest_others} and len(on_disk) == keep + 1
        for i, row in rows.items():
            assert bool(row.metrics.get("pruned")) == (i not in on_disk)  # the catalog says which
            assert row.stage in ("champion", "candidate", "archived")  # rows and stages stay
        gone = next(i for i in rows if i not in on_disk)
        assert rows[gone].metrics["pruned"]["path"] == str(files[gone]) and rows[gone].metrics["test"]
        columns, table = registry_rows(session)
        artifact = {row[0]: row[columns.index("artifact")] for row in table}
        assert {i for i, state in artifact.items() if state == "kept"} == on_disk
        with pytest.raises(LookupError, match="was pruned"):
            resolve_model(session, str(gone))
        assert prune_models(session, keep) == []  # nothing left to prune: idempotent


def test_model_card_names_data_metrics_and_the_confound_warning():
    from facetrace.tasks.registry import model_card_markdown

    card = model_card_markdown(
        backbone="xception", version=3, stage="candidate", sha256="b" * 64, path="/x/model.keras",
        snapshot={"id": 7, "image_count": 10, "counts": {"train": {"real": 3, "synthetic": 4}},
                  "sources": [{"source": "folder:/f", "label": "real", "images": 3, "provenance": "n/a 3"}]},
        hyperparameters={"preprocess": {"image_size": 96, "format_neutral": True, "jpeg_quality": 90},
                         "precision": "mixed_bfloat16", "input_filter": "both", "crop_size": 80},
        metrics={"test": {"roc_auc": 0.97, "n": 4, "confusion": {"tn": 1, "fp": 1, "fn": 0, "tp": 2}},
                 "confound_audit": {"roc_auc": 0.99, "warning": True, "classifier": "gb", "features": ["format"]},
                 "robustness": [{"variant": "jpeg50", "n": 4, "roc_auc": 0.9, "accuracy": 0.75,
                                 "tpr_at_5pct_fpr": 0.5, "fpr": 0.5}],
                 "training": {"weights": "random", "epochs_run": 1, "best_epoch": 1, "seconds": 3.0}},
        threshold=0.42, target_fpr=0.05)
    assert "snapshot 7" in card and "0.9700" in card and "jpeg50" in card and "0.4200" in card
    assert "Warning: confound" in card and "Known limits" in card and "mixed_bfloat16 compute" in card
    assert "random initialisation" in card
    assert "sees: the picture and its fixed high-pass residual" in card and "random 80 px crops" in card


def test_model_card_and_registry_rows_carry_intervals_counts_the_threshold_rule_and_the_weights():
    from facetrace.tasks.evaluation import bootstrap_intervals, binary_metrics
    from facetrace.tasks.registry import model_card_markdown, operating_point

    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(120), np.ones(100)].astype(int)
    scores = np.r_[rng.beta(2, 5, 120), rng.beta(5, 2, 100)]
    point = operating_point(labels, scores, 0.05)
    test = binary_metrics(labels, scores, point["threshold"])
    test["intervals"] = bootstrap_intervals(labels, scores, point["threshold"], resamples=200)
    source = {"name": "xception_weights_tf_dim_ordering_tf_kernels_notop.h5", "sha256": "c" * 64,
              "origin": "http://mirror/x.h5", "hash_checked": True}
    card = model_card_markdown(
        backbone="xception", version=1, stage="champion", sha256="b" * 64, path="/x/model.keras",
        snapshot={"id": 1, "image_count": 440}, hyperparameters={"preprocess": {"image_size": 96}},
        metrics={"test": test, "operating_point": point,
                 "training": {"weights": "imagenet", "weights_source": source, "epochs_run": 3, "best_epoch": 2}},
        threshold=point["threshold"], target_fpr=0.05, decision="difference inside the noise")
    lo, hi = test["intervals"]["metrics"]["roc_auc"]
    assert f"| roc_auc | {test['roc_auc']:.4f} | {lo:.4f} | {hi:.4f} |" in card
    assert "120 real, 100 synthetic" in card and "200 resamples" in card
    assert "on 120 real validation faces" in card and "exact 95% upper bound" in card
    assert "imagenet (`xception_weights_tf_dim_ordering_tf_kernels_notop.h5`" in card and "hash pinned by Keras" in card
    assert "frozen backbone, then the top layers fine-tuned" in card


# ---------------------------------------------------------------- the whole path on tiny data


def write_faces(root: Path, per_class: int = 14) -> Path:
    """Real faces as JPEG of assorted sizes, synthetic ones as 64x64 PNG (the original data's confound)."""
    rng = np.random.default_rng(0)
    (root / "Real").mkdir(parents=True)
    (root / "AI").mkdir(parents=True)
    for i in range(per_class):
        w, h = int(rng.integers(60, 120)), int(rng.integers(60, 120))
        yy, xx = np.mgrid[0:h, 0:w]
        real = 140 + 60 * np.sin((xx + 5 * i) / 7.0)[..., None] * np.array([1.0, 0.7, 0.5])
        PILImage.fromarray(np.clip(real + rng.normal(0, 10, (h, w, 3)), 0, 255).astype("uint8")).save(
            root / "Real" / f"r{i}.jpg", quality=90)
        yy, xx = np.mgrid[0:64, 0:64]
        fake = 70 + (((xx // 6 + yy // 6 + i) % 2) * 100)[..., None] * np.array([0.4, 0.6, 1.0])
        PILImage.fromarray(np.clip(fake + rng.normal(0, 10, (64, 64, 3)), 0, 255).astype("uint8")).save(
            root / "AI" / f"s{i}.png")
    return root


@pytest.mark.slow
def test_whole_path_snapshot_split_both_backbones_evaluation_registry_predict(
        prefect_harness, sqlite_settings_env, store_url, tmp_path, capsys, monkeypatch):
    from facetrace.db.engine import get_engine, session_scope
    from facetrace.db.models import Model, Snapshot
    from facetrace.cli.app import main
    from facetrace.flows.ingest import ingest_faces
    from facetrace.flows.train import train_and_evaluate
    from facetrace.settings import get_settings
    from facetrace.tasks.store import ArtifactStore

    if store_url:
        monkeypatch.setenv("FACETRACE_STORE_URL", store_url)
    store = ArtifactStore.from_settings(get_settings(fresh=True))
    data_dir = sqlite_settings_env.data_dir
    faces = write_faces(tmp_path / "faces")
    ingest_faces(kind="folder", path=str(faces))
    # 48 px: MobileNetV2 takes it, Xception (71 px at least) gets its own, larger input from the same images.
    result = train_and_evaluate(backbones=("mobilenet_v2", "xception"), epochs=1, image_size=48, seed=0)

    # Different input sizes (48 vs 71 px): no ensemble, whose members must share one prepared input.
    assert set(result["models"]) == {"mobilenet_v2", "xception"}
    assert result["promoted"] and result["archived"] is None
    assert result["confound_audit"]["roc_auc"] is not None
    with session_scope(get_engine()) as session:
        rows = {row.backbone: row for row in session.query(Model)}
        snapshot = session.get(Snapshot, result["snapshot_id"])
        assert snapshot.image_count == 28
    assert (rows["mobilenet_v2"].image_size, rows["xception"].image_size) == (48, 71)
    assert sorted(row.stage for row in rows.values()) == ["candidate", "champion"]
    for backbone, row in rows.items():
        path = PurePosixPath(row.path)  # a store key, never this machine's path
        assert not path.is_absolute() and path.parts[:2] == ("models", backbone) and path.suffix == ".keras"
        assert store.exists(row.path) and store.exists(row.model_card) and str(data_dir) not in str(row.metrics)
        assert row.threshold is not None and 0.0 <= row.threshold <= 1.0
        test = row.metrics["test"]
        for key in ("accuracy", "roc_auc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "precision", "recall", "f1", "ece"):
            assert key in test
        assert {r["variant"] for r in row.metrics["robustness"]} >= {"jpeg90", "jpeg75", "jpeg50", "half",
                                                                   "format_swapped"}
        assert row.metrics["per_source"]
        for name in ("roc", "confusion", "misclassified", "gradcam"):
            assert store.exists(row.metrics["reports"][name])
        card = store.get_bytes(row.model_card).decode()
        assert backbone in card and "Confound audit" in card
        assert row.hyperparameters["precision"] in ("float32", "mixed_bfloat16")  # "auto" resolved, as trained
        assert f"{row.hyperparameters['precision']} compute" in card
        assert PurePosixPath(row.model_card).parent == path.parent
        assert store.exists(f"{PurePosixPath(row.metrics['reports']['roc']).parent}/report.md")
        assert store.list(row.metrics["training"]["tensorboard"])  # TensorBoard logs published too
    if not store.local:  # nothing of this machine's data root was left where a key should be
        assert not (data_dir / "models").exists() and not (data_dir / "reports").exists()

    capsys.readouterr()
    assert main(["models", "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["backbone"] for r in listed} == {"mobilenet_v2", "xception"}

    picks = [str(faces / "Real" / "r0.jpg"), str(faces / "AI" / "s0.png"), str(faces / "AI" / "s1.png")]
    assert main(["predict", *picks, "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["path"] for p in out["predictions"]] == picks
    for p in out["predictions"]:
        assert 0.0 <= p["probability"] <= 1.0 and p["decision"] in ("real", "synthetic") and p["error"] is None
        assert p["decision"] == ("synthetic" if p["probability"] >= out["model"]["threshold"] else "real")

    assert main(["predict", *picks[:2], "--model", str(rows["xception"].id)]) == 0
    table = capsys.readouterr().out
    assert "r0.jpg" in table and "s0.png" in table and "xception" in table

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a picture")
    assert main(["predict", picks[0], str(broken), str(tmp_path / "missing.png"), "--format", "json"]) == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["predictions"][0]["error"] is None
    assert "not an image" in out["predictions"][1]["error"] and out["predictions"][2]["error"] == "no such file"
    assert "broken.jpg: not an image" in captured.err

    assert main(["predict", picks[0], "--model", "9999"]) == 2
    assert "no model with id 9999" in capsys.readouterr().err

    # A second run on a grown catalog: a new snapshot, so the champion is re-scored on the new test
    # split (minus what it trained on) beside the new candidate, and the database keeps one champion.
    more = tmp_path / "more"
    for sub in ("Real", "AI"):
        (more / sub).mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(6):
        PILImage.fromarray(rng.integers(0, 255, (70, 90, 3)).astype("uint8")).save(more / "Real" / f"n{i}.jpg")
        PILImage.fromarray(rng.integers(0, 255, (64, 64, 3)).astype("uint8")).save(more / "AI" / f"n{i}.png")
    ingest_faces(kind="folder", path=str(more))
    champion_before = next(row.id for row in rows.values() if row.stage == "champion")
    second = train_and_evaluate(backbones=("mobilenet_v2",), epochs=1, image_size=48, seed=0, margin=0.0)
    assert second["snapshot_id"] != result["snapshot_id"] and second["compared_on"] > 0
    with session_scope(get_engine()) as session:
        stages = {row.id: row.stage for row in session.query(Model)}
    assert list(stages.values()).count("champion") == 1
    if second["promoted"]:
        assert second["archived"] == champion_before and stages[champion_before] == "archived"
    else:
        assert stages[champion_before] == "champion" and stages[second["models"]["mobilenet_v2"]["id"]] == "candidate"


def test_training_refuses_a_catalog_whose_latest_validation_failed_critically(prefect_harness, sqlite_settings_env,
                                                                              capsys):
    from facetrace.db.engine import get_engine, session_scope
    from facetrace.db.models import Snapshot, ValidationRun
    from facetrace.cli.app import main

    with session_scope(get_engine()) as session:
        session.add(ValidationRun(suite="catalog", success=False, critical_failure=True, statistics={},
                                  results=[{"expectation": "labels", "success": False, "severity": "critical"}]))
    assert main(["train", "--backbones", "mobilenet_v2", "--epochs", "1"]) == 2
    assert "facetrace train:" in capsys.readouterr().err
    with session_scope(get_engine()) as session:
        assert session.query(Snapshot).count() == 0  # refused before anything was frozen or trained


def test_fit_deadlines_split_the_budget_into_waves_and_pass_unused_time_on(monkeypatch):
    from types import SimpleNamespace

    from facetrace.flows.train import fit_deadlines

    backbones = ("mobilenet_v2", "xception")
    one_at_a_time = SimpleNamespace(train_time_budget_s=600.0, train_parallel=1)
    # Absolute deadlines: the second fit may use whatever the first one left.
    assert fit_deadlines(backbones, None, one_at_a_time, start=1000.0) == {"mobilenet_v2": 1300.0,
                                                                           "xception": 1600.0}
    side_by_side = SimpleNamespace(train_time_budget_s=600.0, train_parallel=2)
    assert fit_deadlines(backbones, 300.0, side_by_side, start=0.0) == {"mobilenet_v2": 300.0, "xception": 300.0}
    assert fit_deadlines(backbones, 0, one_at_a_time) == {"mobilenet_v2": None, "xception": None}
