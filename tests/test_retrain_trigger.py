"""The event-triggered retraining flow waits, in a completed run that says why, while the catalog
cannot be trained on: too few new faces, or only one class so far (a first ingest of real photos)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image as PILImage


def _faces(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        PILImage.new("RGB", (32, 32), (30 * i % 255, 120, 200 - 10 * i)).save(folder / f"face-{i}.png")
    return folder


def test_retrain_waits_for_both_classes_instead_of_failing(prefect_harness, sqlite_settings_env, tmp_path) -> None:
    from facetrace.flows.ingest import ingest_faces
    from facetrace.flows.pipeline import retrain_on_new_faces

    ingest_faces(kind="folder", path=str(_faces(tmp_path / "real", 6)), label="real")

    state = retrain_on_new_faces(min_new_faces=3, return_state=True)
    assert state.is_completed()
    assert state.result() == {"retrained": False, "new_faces": 6, "missing_labels": ["synthetic"]}

    state = retrain_on_new_faces(min_new_faces=10, return_state=True)
    assert state.is_completed() and state.result() == {"retrained": False, "new_faces": 6}
