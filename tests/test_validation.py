"""Validation with Great Expectations: every rule catches the defect it exists for, a clean catalog
passes, and the flow records its runs, writes data docs, and fails (and closes the training gate)
on a critical failure. Catalogs are tiny (8 images of 32 px) and built through db.catalog."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image as PILImage
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from facetrace.db.catalog import AcceptedImage, add_image, add_rejection, ensure_source
from facetrace.db.engine import get_engine, session_scope
from facetrace.db.models import Generation, Image, Prompt, Snapshot, SnapshotImage, ValidationRun
from facetrace.expectations.frames import check_files, load_catalog_frames, split_leakage
from facetrace.expectations.suites import Thresholds
from facetrace.tasks.storage import inspect_image, store_bytes

THRESHOLDS = Thresholds()  # band [0.2, 0.8], rejection ceiling 25%, near-duplicate distance 6


# ---------------------------------------------------------------- building tiny catalogs

def picture(seed: int, fmt: str = "PNG", size: int = 32, poke: bool = False) -> bytes:
    """A random-noise picture (random pictures are never near-duplicates of each other); ``poke``
    changes one pixel, which keeps the perceptual hash within a bit or two."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    if poke:
        pixels[0, 0] = 255 - pixels[0, 0]
    out = io.BytesIO()
    PILImage.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def catalogue(session, data_dir: Path, source_id: int, name: str, data: bytes, label: str,
              prompt_id: int | None = None) -> int:
    record = inspect_image(data)
    path = store_bytes(data_dir, record, data)
    image_id, is_new = add_image(session, source_id, AcceptedImage(name, label, path, record, prompt_id=prompt_id,
                                                                    provenance="partial" if prompt_id else None))
    assert is_new
    return image_id


def add_prompt(session, text: str) -> int:
    prompt = Prompt(text=text, method="template", seed=1)
    session.add(prompt)
    session.flush()
    return prompt.id


def add_generation(session, image_id: int, prompt_id: int, index: int) -> None:
    session.add(Generation(
        image_id=image_id, prompt_id=prompt_id, request_key="req", item_index=index, model_id="tiny",
        pipeline_class="StableDiffusionPipeline", scheduler_class="PNDMScheduler", scheduler_config={},
        steps=2, guidance=7.5, seed=index, width=32, height=32, dtype="float32", device="cpu",
        library_versions={"diffusers": "test"}))


def generate(session, data_dir: Path, source_id: int, seed: int, prompt_text: str | None, index: int) -> int:
    """A generated image: stored, catalogued, and (when ``prompt_text`` is given) its generation row."""
    image_id = catalogue(session, data_dir, source_id, f"gen-{seed}.png", picture(seed), "synthetic")
    if prompt_text is not None:
        add_generation(session, image_id, add_prompt(session, prompt_text), index)
    return image_id


def build_clean_catalog(settings) -> dict:
    """A clean catalog: 4 real (PNG, JPEG), 2 generated with prompts, 2 imported synthetic (BMP,
    one with a prompt) and a snapshot whose splits keep every group on one side."""
    engine = get_engine(settings.catalog_url)
    data_dir = settings.data_dir
    ids: dict[str, int] = {}
    with session_scope(engine) as session:
        real = ensure_source(session, "folder", "/faces/real")
        for i in range(4):
            fmt = "JPEG" if i == 3 else "PNG"
            ids[f"real{i}"] = catalogue(session, data_dir, real, f"real{i}", picture(i, fmt), "real")
        generated = ensure_source(session, "generated", "tiny")
        ids["gen0"] = generate(session, data_dir, generated, 10, "a smiling person, studio light", 0)
        ids["gen1"] = generate(session, data_dir, generated, 11, "an old man in the rain", 1)
        imported = ensure_source(session, "folder", "/faces/ai")
        ids["ai0"] = catalogue(session, data_dir, imported, "ai0.bmp", picture(20, "BMP"), "synthetic",
                               prompt_id=add_prompt(session, "imported prompt"))
        ids["ai1"] = catalogue(session, data_dir, imported, "ai1.bmp", picture(21, "BMP"), "synthetic")
        snapshot = Snapshot(seed=0, image_count=8, content_hash="0" * 64)
        session.add(snapshot)
        session.flush()
        splits = {"real0": "train", "real1": "train", "real2": "validation", "real3": "test", "gen0": "train",
                  "gen1": "test", "ai0": "train", "ai1": "validation"}
        for key, split in splits.items():
            session.add(SnapshotImage(snapshot_id=snapshot.id, image_id=ids[key], split=split, group_key=key))
    return {"engine": engine, "data_dir": data_dir, "ids": ids, "snapshot_id": snapshot.id, "settings": settings}


@pytest.fixture
def catalog(sqlite_settings_env) -> dict:
    return build_clean_catalog(sqlite_settings_env)


@pytest.fixture
def catalog_on_each_backend(settings_env) -> dict:
    return build_clean_catalog(settings_env)


@pytest.fixture(scope="module")
def gx_context():
    """One ephemeral GX context for the module: creating contexts is the slow part of GX."""
    from facetrace.expectations.runner import open_context

    return open_context(None)


def frames_of(catalog) -> dict[str, pd.DataFrame]:
    loaded = load_catalog_frames(catalog["engine"])
    frames = {"catalog": loaded["images"], "intake": loaded["intake"],
              "files": check_files(loaded["images"], catalog["data_dir"], seed=0)}
    if loaded["members"] is not None:
        frames["splits"] = split_leakage(loaded["members"], THRESHOLDS.near_duplicate_distance)
    return frames


def validate(context, frames: dict[str, pd.DataFrame], thresholds: Thresholds = THRESHOLDS) -> dict:
    from facetrace.expectations.runner import validate_frames

    outcomes, _ = validate_frames(context, frames, thresholds, docs=False)
    return {o.suite: o for o in outcomes}


def failed(outcomes: dict, suite: str) -> dict[str, object]:
    """Description -> outcome of every failed expectation of ``suite``."""
    return {e.description: e for e in outcomes[suite].expectations if not e.success}


def only_failure(outcomes: dict, suite: str, words: str):
    """Exactly one expectation failed in the whole run, in ``suite``, and its description has ``words``."""
    everywhere = [(name, e.description) for name, o in outcomes.items() for e in o.expectations if not e.success]
    assert len(everywhere) == 1, everywhere
    name, description = everywhere[0]
    assert name == suite and words in description, everywhere
    return next(e for e in outcomes[suite].expectations if not e.success)


# ---------------------------------------------------------------- each rule catches its defect

def test_clean_catalog_passes_every_suite(catalog_on_each_backend, gx_context):
    outcomes = validate(gx_context, frames_of(catalog_on_each_backend))
    assert set(outcomes) == {"catalog", "intake", "files", "splits"}
    for name, outcome in outcomes.items():
        assert outcome.success, (name, [(e.description, e.observed) for e in outcome.failures])
        assert not outcome.critical_failure
    assert outcomes["files"].statistics["rows"] == 8


def test_duplicate_sha256_is_refused_by_the_database_and_caught_in_the_frame(catalog, gx_context):
    # The unique constraint makes this defect impossible in a migrated catalog, so the rule is
    # exercised on the frame (as a catalog without the constraint, e.g. a bad import, would yield it).
    with pytest.raises(IntegrityError), session_scope(catalog["engine"]) as session:
        row = session.get(Image, catalog["ids"]["real0"])
        session.execute(update(Image).where(Image.id == catalog["ids"]["real1"]).values(sha256=row.sha256))
    frame = load_catalog_frames(catalog["engine"])["images"]
    copy = frame.iloc[[0]].assign(image_id=999, path="images/elsewhere.png")
    failure = only_failure(validate(gx_context, {"catalog": pd.concat([frame, copy], ignore_index=True)}),
                           "catalog", "sha256 is unique")
    assert failure.severity == "critical"
    assert {"sha256": frame["sha256"].iloc[0]} in failure.examples


def test_unknown_label_is_refused_by_the_database_and_caught_in_the_frame(catalog, gx_context):
    with pytest.raises(IntegrityError), session_scope(catalog["engine"]) as session:
        session.execute(update(Image).where(Image.id == catalog["ids"]["real0"]).values(label="fake"))
    frame = load_catalog_frames(catalog["engine"])["images"]
    frame.loc[0, "label"] = "fake"
    failure = only_failure(validate(gx_context, {"catalog": frame}), "catalog", "label is real or synthetic")
    assert failure.severity == "critical" and "1 of 8" in failure.observed


def test_missing_file(catalog, gx_context):
    with session_scope(catalog["engine"]) as session:
        path = session.get(Image, catalog["ids"]["real1"]).path
    (catalog["data_dir"] / path).unlink()
    failure = only_failure(validate(gx_context, frames_of(catalog)), "files", "exists")
    assert failure.severity == "critical" and failure.examples == [{"exists": False, "path": path}]


def test_file_bytes_changed_after_cataloguing(catalog, gx_context):
    # A BMP stores raw pixels: changing one keeps the size and the decodability, so only the hash tells.
    with session_scope(catalog["engine"]) as session:
        path = session.get(Image, catalog["ids"]["ai0"]).path
    target = catalog["data_dir"] / path
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    failure = only_failure(validate(gx_context, frames_of(catalog)), "files", "sha256 matches")
    assert failure.examples[0]["path"] == path


def test_generated_image_without_prompt(catalog, gx_context):
    with session_scope(catalog["engine"]) as session:
        generated = ensure_source(session, "generated", "tiny")
        generate(session, catalog["data_dir"], generated, 30, "   ", 2)  # a blank prompt is no prompt
    failure = only_failure(validate(gx_context, frames_of(catalog)), "catalog", "has a (non-empty) prompt")
    assert failure.severity == "critical"


def test_generated_image_without_generation_row(catalog, gx_context):
    with session_scope(catalog["engine"]) as session:
        session.execute(delete(Generation).where(Generation.image_id == catalog["ids"]["gen1"]))
    outcomes = validate(gx_context, frames_of(catalog))
    assert set(failed(outcomes, "catalog")) == {"every generated image has a generation row",
                                                "every generated image has a (non-empty) prompt"}


def test_class_imbalance_beyond_the_band_is_a_warning(catalog, gx_context):
    with session_scope(catalog["engine"]) as session:
        real = ensure_source(session, "folder", "/faces/real")
        for i in range(40, 53):  # 17 real, 4 synthetic: 19% synthetic, below the 20% floor
            catalogue(session, catalog["data_dir"], real, f"more{i}", picture(i), "real")
    outcomes = validate(gx_context, frames_of(catalog))
    failure = only_failure(outcomes, "catalog", "class balance")
    assert failure.severity == "warning" and float(failure.observed) == pytest.approx(4 / 21, abs=1e-3)
    assert not outcomes["catalog"].critical_failure and not outcomes["catalog"].success


def test_near_duplicate_pair_across_train_and_test(catalog, gx_context):
    with session_scope(catalog["engine"]) as session:
        real = ensure_source(session, "folder", "/faces/real")
        twin = catalogue(session, catalog["data_dir"], real, "real0-copy", picture(0, poke=True), "real")
        session.add(SnapshotImage(snapshot_id=catalog["snapshot_id"], image_id=twin, split="test", group_key="twin"))
        session.execute(update(Snapshot).values(image_count=9))
    outcomes = validate(gx_context, frames_of(catalog))
    failure = only_failure(outcomes, "splits", "near-duplicate")
    with session_scope(catalog["engine"]) as session:
        pair = {session.get(Image, catalog["ids"]["real0"]).sha256, session.get(Image, twin).sha256}
    assert {row["sha256"] for row in failure.examples} == pair


def test_prompt_group_across_splits(catalog, gx_context):
    with session_scope(catalog["engine"]) as session:
        # gen1 (test) gets the text of gen0's prompt (train), up to case, spacing and a full stop.
        prompt_id = session.scalar(select(Generation.prompt_id).where(Generation.image_id == catalog["ids"]["gen1"]))
        session.execute(update(Prompt).where(Prompt.id == prompt_id).values(text="A smiling  person, studio light."))
    only_failure(validate(gx_context, frames_of(catalog)), "splits", "no prompt group on two sides")


def test_exact_group_and_snapshot_group_across_splits(catalog, gx_context):
    members = load_catalog_frames(catalog["engine"])["members"]
    members.loc[members["split"] != "train", "dedup_group"] = "same-picture"
    members.loc[members["split"] == "test", "group_key"] = "one-group"
    members.loc[members["split"] == "train", "group_key"] = "one-group"
    outcomes = validate(gx_context, {"splits": split_leakage(members, 6)})
    assert set(failed(outcomes, "splits")) == {"no exact-duplicate group on two sides of a split",
                                               "each snapshot group (group_key) sits in one split"}


def test_rejection_rate_above_the_ceiling(catalog, gx_context):
    with session_scope(catalog["engine"]) as session:
        source = ensure_source(session, "folder", "/faces/real")
        for i in range(4):  # 4 refused of 12 offered = 33% > 25%
            add_rejection(session, source, f"broken{i}.jpg", "truncated", "image data ends early")
    failure = only_failure(validate(gx_context, frames_of(catalog)), "intake", "rejection rate")
    assert failure.severity == "warning" and float(failure.observed) == pytest.approx(4 / 12, abs=1e-3)


def test_near_duplicates_are_counted_exactly():
    from facetrace.expectations.frames import near_duplicates_across_splits

    bits = np.array([0b0, 0b111, 0b1111111, 0b0, 2**64 - 1], dtype=np.uint64)
    splits = np.array(["train", "test", "test", "validation", "test"])
    # 3 bits apart is near, 7 bits is not, identical hashes are; pairs within one split never count.
    assert near_duplicates_across_splits(bits, splits, 6, chunk_cells=2).tolist() == [2, 2, 0, 2, 0]


# ---------------------------------------------------------------- the flow, the gate, the CLI

def test_flow_records_runs_writes_docs_and_fails_critically(catalog, prefect_harness, capsys):
    from facetrace.expectations.gate import CatalogInvalid, ensure_catalog_valid, latest_validation_failed_critically
    from facetrace.cli.app import main
    from facetrace.flows.validate import CriticalValidationFailure, validate_catalog

    engine = catalog["engine"]
    summary = validate_catalog()
    assert summary["success"] and not summary["critical_failure"]
    index = Path(summary["data_docs"])
    assert index.is_file() and index.is_relative_to(catalog["data_dir"].resolve() / "validation")
    html = index.read_text()
    for suite in ("catalog", "intake", "splits", "files"):
        assert suite in html
        assert (catalog["data_dir"] / summary["suites"][suite]["data_docs"]).is_file()  # a store key
    with session_scope(engine) as session:
        runs = session.scalars(select(ValidationRun).order_by(ValidationRun.id)).all()
        assert [r.suite for r in runs] == ["catalog", "intake", "splits", "files"]
        assert all(r.success and not r.critical_failure and r.flow_run_id for r in runs)
        assert not latest_validation_failed_critically(session)
        ensure_catalog_valid(session)

    with session_scope(engine) as session:
        missing = session.get(Image, catalog["ids"]["gen0"]).path
    (catalog["data_dir"] / missing).unlink()
    with pytest.raises(CriticalValidationFailure) as raised:
        validate_catalog(suites=["files"])
    assert "files" in str(raised.value) and raised.value.summary["critical_failure"]
    with session_scope(engine) as session:
        last = session.scalars(select(ValidationRun).order_by(ValidationRun.id.desc())).first()
        assert (last.suite, last.success, last.critical_failure) == ("files", False, True)
        assert latest_validation_failed_critically(session)
        with pytest.raises(CatalogInvalid, match="every catalogued file exists"):
            ensure_catalog_valid(session)

    capsys.readouterr()
    assert main(["validate", "--suite", "files"]) == 1
    out = capsys.readouterr()
    assert "every catalogued file exists" in out.out and "data docs:" in out.out and "index.html" in out.out
    assert "critical" in out.err


def test_warnings_do_not_fail_the_flow(catalog, prefect_harness):
    from facetrace.flows.validate import validate_catalog

    with session_scope(catalog["engine"]) as session:
        source = ensure_source(session, "folder", "/faces/real")
        for i in range(8):
            add_rejection(session, source, f"broken{i}.jpg", "not_an_image", "looks like HTML")
    summary = validate_catalog(suites=["intake"], data_docs=False)
    assert not summary["success"] and not summary["critical_failure"]
    with session_scope(catalog["engine"]) as session:
        assert session.scalars(select(ValidationRun.critical_failure)).all() == [False]


def test_cli_start_up_does_not_import_great_expectations():
    code = ("import sys; from facetrace.cli.app import build_parser; build_parser(); "
            "print('great_expectations' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- what the served detector answered

def add_predictions(session, model_id: int, decisions: list[str], days_ago: float = 0.0) -> None:
    import datetime as dt

    from facetrace.db.models import Prediction, utcnow

    when = utcnow() - dt.timedelta(days=days_ago)
    session.add_all([Prediction(sha256=f"{i:064x}", model_id=model_id, score=0.9 if d == "synthetic" else 0.1,
                                decision=d, created_at=when) for i, d in enumerate(decisions)])


def test_share_flagged_drifting_from_the_test_split_rate_is_a_warning(catalog_on_each_backend, gx_context):
    from sqlalchemy import text

    from facetrace.tasks.registry import add_candidate

    catalog = catalog_on_each_backend
    with session_scope(catalog["engine"]) as session:
        # Its test split: half flagged (tp 4 + fp 1 of 10).
        model_id = add_candidate(session, backbone="mobilenet_v2", path="/m.keras", sha256="a" * 64,
                                 snapshot_id=catalog["snapshot_id"], image_size=32, hyperparameters={},
                                 metrics={"test": {"confusion": {"tn": 4, "fp": 1, "fn": 1, "tp": 4}}},
                                 threshold=0.5).id
        add_predictions(session, model_id, ["synthetic", "real"] * 10)
        add_predictions(session, model_id, ["synthetic"] * 50, days_ago=30)  # outside the 7-day window
    frames = {"predictions": load_catalog_frames(catalog["engine"])["predictions"]}
    assert len(frames["predictions"]) == 20
    assert validate(gx_context, frames)["predictions"].success

    with session_scope(catalog["engine"]) as session:
        add_predictions(session, model_id, ["synthetic"] * 20)  # now 30 of 40 flagged: 0.75 vs 0.5
    outcomes = validate(gx_context, {"predictions": load_catalog_frames(catalog["engine"])["predictions"]})
    failure = only_failure(outcomes, "predictions", "share flagged synthetic")
    assert failure.severity == "warning" and not outcomes["predictions"].critical_failure
    assert failure.observed == "0.25"
    with catalog["engine"].connect() as connection:
        days = connection.execute(text("SELECT predictions, flagged FROM predictions_daily ORDER BY day")).all()
    assert [tuple(d) for d in days] == [(50, 50), (40, 30)]


def test_the_validation_flow_runs_the_predictions_suite_once_the_api_has_answered(prefect_harness, catalog):
    from facetrace.db.models import Model
    from facetrace.flows.validate import validate_catalog

    with session_scope(catalog["engine"]) as session:
        model = Model(backbone="mobilenet_v2", version=1, path="/m.keras", sha256="a" * 64,
                      snapshot_id=catalog["snapshot_id"], image_size=32, threshold=0.5, stage="champion",
                      metrics={"test": {"confusion": {"tn": 9, "fp": 1, "fn": 5, "tp": 5}}})
        session.add(model)
        session.flush()
        add_predictions(session, model.id, ["synthetic"] * 9 + ["real"])  # 0.9 flagged vs 0.3
    summary = validate_catalog(data_docs=False)
    assert summary["success"] is False and summary["critical_failure"] is False
    predictions = summary["suites"]["predictions"]
    assert predictions["success"] is False and not predictions["critical_failure"]
    assert predictions["statistics"]["rows"] == 10
