"""Ingest survives the real world's processes: one killed with SIGKILL mid-run, and two started on
the same source at once. The `facetrace` CLI runs in subprocesses against this test's catalog
(SQLite and PostgreSQL), this test's artifact store (the local data root and an S3 bucket) and the
session's Prefect API."""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import time

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError, ProgrammingError

from facetrace.db.engine import dispose_engines, get_engine, make_engine, session_scope
from facetrace.db.models import Image, Rejection, Sighting
from ingest_corpus import FACETRACE, cli_env, write_image_tree

pytestmark = pytest.mark.slow


def catalogued(url: str) -> int | None:
    """Images committed so far, read without taking any write lock (None before the catalog exists)."""
    try:
        engine = make_engine(url, read_only=True)
    except FileNotFoundError:
        return None
    try:
        with engine.connect() as connection:
            return connection.scalar(select(func.count()).select_from(Image))
    except (OperationalError, ProgrammingError):  # not migrated yet
        return None
    finally:
        engine.dispose()


def assert_catalog_points_at_whole_files(settings) -> list[tuple[str, str]]:
    """Every row's object exists in the store with the bytes its sha256 names; no real name holds other
    bytes (the store's listing leaves out the local backend's temporary names)."""
    from facetrace.tasks.store import ArtifactStore

    dispose_engines()
    store = ArtifactStore.from_settings(settings)
    with session_scope(get_engine(settings.catalog_url)) as session:
        rows = session.execute(select(Image.sha256, Image.path)).all()
    for sha, key in rows:
        assert store.exists(key), f"catalog row {sha} points at a missing object"
        assert hashlib.sha256(store.get_bytes(key)).hexdigest() == sha, f"{key} holds other bytes"
    for key in store.list("images"):
        stem = key.rsplit("/", 1)[-1].split(".")[0]
        assert hashlib.sha256(store.get_bytes(key)).hexdigest() == stem, f"{key} is a half-written object"
    return rows


def store_cli_env(settings, tmp_path, **extra: str) -> dict[str, str]:
    """cli_env plus this test's store URL (the AWS variables pass through from this process)."""
    if settings.store_url:
        extra["FACETRACE_STORE_URL"] = settings.store_url
    return cli_env(settings.data_dir, settings.catalog_url, tmp_path / "home", **extra)


def totals(url: str) -> dict[str, int]:
    with session_scope(get_engine(url)) as session:
        return {
            "images": session.scalar(select(func.count()).select_from(Image)),
            "distinct_sha": session.scalar(select(func.count(func.distinct(Image.sha256)))),
            "sightings": session.scalar(select(func.count()).select_from(Sighting)),
            "sighted_names": session.scalar(select(func.count(func.distinct(Sighting.original_name)))),
            "rejections": session.scalar(select(func.count()).select_from(Rejection)),
        }


def reported_new(stdout: str) -> int:
    match = re.search(r"new\s*│\s*(\d+)", stdout)
    assert match, stdout
    return int(match.group(1))


def test_an_ingest_killed_mid_run_leaves_a_consistent_catalog_and_a_rerun_completes_it(
        prefect_harness, store_env, tmp_path):
    source = tmp_path / "faces"
    write_image_tree(source, 300, size=(96, 96))
    env = store_cli_env(store_env, tmp_path, FACETRACE_BATCH_SIZE="6", FACETRACE_WORKERS="2")
    command = [FACETRACE, "ingest", "folder", str(source), "--label", "real"]

    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline, seen = time.monotonic() + 120, None
    try:
        while time.monotonic() < deadline and process.poll() is None:
            seen = catalogued(store_env.catalog_url)
            if seen and seen >= 12:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if process.poll() is None and not seen:
            process.kill()
        out, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the ingest ended before it could be killed: {err.decode()[-2000:]}"

    partial = assert_catalog_points_at_whole_files(store_env)
    assert 12 <= len(partial) < 300, len(partial)

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert reported_new(rerun.stdout) == 300 - len(partial)
    assert len(assert_catalog_points_at_whole_files(store_env)) == 300
    assert totals(store_env.catalog_url) == {"images": 300, "distinct_sha": 300, "sightings": 300,
                                                "sighted_names": 300, "rejections": 0}


def test_two_ingests_of_one_source_at_once_neither_duplicate_nor_lose_images(
        prefect_harness, store_env, tmp_path):
    source = tmp_path / "faces"
    pictures = write_image_tree(source, 120, size=(64, 64))
    for i, picture in enumerate(pictures[1:5]):  # the same picture under other names
        (source / f"again_{i}{picture.suffix}").write_bytes(picture.read_bytes())
    (source / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    env = store_cli_env(store_env, tmp_path, FACETRACE_BATCH_SIZE="8", FACETRACE_WORKERS="2")
    command = [FACETRACE, "ingest", "folder", str(source), "--label", "real"]

    # Both start on a catalog that does not exist yet: they also race to create and migrate it.
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]

    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
        assert "database is locked" not in err and "deadlock" not in err.lower(), err[-3000:]
    assert sum(reported_new(out) for out, _ in outputs) == 120  # each picture counted new exactly once
    assert totals(store_env.catalog_url) == {"images": 120, "distinct_sha": 120, "sightings": 124,
                                                "sighted_names": 124, "rejections": 1}
    assert len(assert_catalog_points_at_whole_files(store_env)) == 120
