"""The artifact store when things go wrong: the S3 server stops in the middle of an ingest, an object
is altered in the store (the files suite fails critically, the model loader refuses it), and a re-run
of an ingest into the store is idempotent. Every test runs on the local data root and on S3."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from facetrace.db.engine import dispose_engines, get_engine, session_scope
from facetrace.db.models import Image
from ingest_corpus import FACETRACE, write_image_tree
from test_ingest_processes import assert_catalog_points_at_whole_files, catalogued, reported_new, store_cli_env, totals


def stored_images(settings) -> dict[str, str]:
    dispose_engines()
    with session_scope(get_engine(settings.catalog_url)) as session:
        return dict(session.execute(select(Image.sha256, Image.path)).all())


@pytest.mark.slow
def test_s3_stopping_mid_ingest_fails_clearly_and_a_rerun_after_restart_completes(
        prefect_harness, store_env, s3_server, tmp_path):
    if not store_env.store_url:
        pytest.skip("an S3 outage needs the S3 store")
    source = tmp_path / "faces"
    write_image_tree(source, 200, size=(96, 96))
    env = store_cli_env(store_env, tmp_path, FACETRACE_BATCH_SIZE="6", FACETRACE_WORKERS="2")
    command = [FACETRACE, "ingest", "folder", str(source), "--label", "real"]

    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if (catalogued(store_env.catalog_url) or 0) >= 12:
                s3_server.stop()
                break
            time.sleep(0.02)
        assert not s3_server.running(), "the ingest finished before the store could be stopped"
        out, err = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.communicate()
        if not s3_server.running():
            s3_server.start()
    assert process.returncode != 0, out[-2000:]
    # One clear line names the store that failed, not a bare traceback of the HTTP library.
    assert f"artifact store {store_env.store_url}" in err and "failed" in err, err[-3000:]

    partial = assert_catalog_points_at_whole_files(store_env)  # every committed row's object exists
    assert 12 <= len(partial) < 200

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert reported_new(rerun.stdout) == 200 - len(partial)
    assert len(assert_catalog_points_at_whole_files(store_env)) == 200
    assert totals(store_env.catalog_url)["images"] == 200


def test_an_altered_object_fails_the_files_suite_critically_and_reruns_are_idempotent(
        prefect_harness, store_env, tmp_path):
    from facetrace.flows.ingest import ingest_faces
    from facetrace.flows.validate import CriticalValidationFailure, validate_catalog
    from facetrace.tasks.store import ArtifactStore

    source = tmp_path / "faces"
    write_image_tree(source, 8, size=(32, 32))
    first = ingest_faces(kind="folder", path=str(source), label="real")
    again = ingest_faces(kind="folder", path=str(source), label="real")
    assert (first["new"], again["new"], again["duplicate"]) == (8, 0, 8)
    store = ArtifactStore.from_settings(store_env)
    rows = stored_images(store_env)
    assert sorted(store.list("images")) == sorted(rows.values())  # one object per image, no duplicates

    summary = validate_catalog(suites=["files"])
    assert summary["suites"]["files"]["success"]
    docs = summary["suites"]["files"]["data_docs"]
    assert not Path(docs).is_absolute() and store.exists(docs)  # the data docs page is in the store too

    victim = sorted(rows.values())[0]
    store.put_bytes(victim, store.get_bytes(victim)[:-40] + b"\x00" * 40)  # same key, other bytes
    with pytest.raises(CriticalValidationFailure, match="files") as failure:
        validate_catalog(suites=["files"])
    files = failure.value.summary["suites"]["files"]
    assert files["critical_failure"]
    failed = [r for r in failure.value.summary["rows"] if r["result"] == "FAIL"]
    assert any("sha256" in r["expectation"] for r in failed), failed


def test_the_model_loader_refuses_a_model_altered_in_the_store(store_env, tmp_path, monkeypatch):
    import keras

    from facetrace.settings import get_settings
    from facetrace.tasks.store import AlteredObject, ArtifactStore
    from facetrace.tasks.training import load_model

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    built = tmp_path / "model.keras"
    model.save(built)
    data = built.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    store = ArtifactStore.from_settings(store_env)
    key = "models/mobilenet_v2/t1/model.keras"
    store.put_bytes(key, data)
    assert load_model(key, sha).count_params() == model.count_params()

    store.put_bytes(key, data + b"appended")
    if not store.local:
        # Another machine (an empty data root, so an empty cache) reads the altered object: refused.
        monkeypatch.setenv("FACETRACE_DATA_DIR", str(tmp_path / "other-machine"))
        get_settings(fresh=True)
    with pytest.raises(AlteredObject, match="does not match its registered sha256"):
        load_model(key, sha)
    with pytest.raises(FileNotFoundError):
        load_model("models/none/t0/model.keras", sha)
