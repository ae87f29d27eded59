"""Scale-out: the ingest fan-out on a Dask cluster (two worker processes) writing to PostgreSQL gives
exactly the catalog that the default thread runner gives.

Batches of candidates are pickled to the workers, so a folder's and a zip archive's readers must
travel between processes; the workers write to the same PostgreSQL catalog concurrently.
"""

from __future__ import annotations

import contextlib
import os
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from facetrace.settings import get_settings

BATCH = 3  # small batches, so a handful of files fans out into several tasks


def write_corpus(root: Path) -> tuple[Path, Path]:
    """A labelled folder (Real/, AI/, one broken file, one duplicate) and a zip archive of AI faces."""
    folder = root / "faces"
    for label, tint in (("Real", (200, 60, 60)), ("AI", (60, 60, 200))):
        (folder / label).mkdir(parents=True)
        for i in range(5):
            PILImage.new("RGB", (24 + i, 24), tuple(c + 9 * i for c in tint)).save(folder / label / f"{i}.png")
    (folder / "Real" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "AI" / "Copy of 0.png").write_bytes((folder / "AI" / "0.png").read_bytes())
    archive = root / "more.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(4):
            PILImage.new("L", (30, 30 + i), 40 + 50 * i).save(root / f"z{i}.png")
            zf.write(root / f"z{i}.png", f"AI/z{i}.png")
    return folder, archive


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """A second, empty PostgreSQL catalog next to the fixture's (for the thread-runner baseline)."""
    import psycopg

    from facetrace.db.engine import dispose_engines

    base = os.environ.get("FACETRACE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    plain = base.replace("postgresql+psycopg://", "postgresql://")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
    finally:
        dispose_engines()
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def ingest_both(folder: Path, archive: Path) -> list[dict]:
    from facetrace.flows.common import task_runner
    from facetrace.flows.ingest import ingest_faces

    flow = ingest_faces.with_options(task_runner=task_runner(get_settings()))
    return [flow(kind="folder", path=str(folder), batch_size=BATCH),
            flow(kind="zip", path=str(archive), batch_size=BATCH)]


def catalog_rows(url: str) -> dict[str, list[tuple]]:
    """The catalog's content, without ids or times. Which of two identical files is the image's
    original name (the other becomes a sighting) depends on which batch commits first, so names are
    compared as the set of (name, sha256) pairs seen."""
    from facetrace.db.engine import get_engine, session_scope
    from facetrace.db.models import Image, Rejection, Sighting, Source

    with session_scope(get_engine(url)) as session:
        images = session.execute(
            select(Image.sha256, Image.path, Image.label, Image.format, Image.width, Image.height, Image.bytes,
                   Image.phash, Image.status, Image.provenance).order_by(Image.sha256)).all()
        names = session.execute(select(Source.kind, Image.original_name, Image.sha256).join(Source)).all()
        names += session.execute(select(Source.kind, Sighting.original_name, Image.sha256)
                                 .join(Source, Sighting.source_id == Source.id)
                                 .join(Image, Sighting.image_id == Image.id)).all()
        rejections = session.execute(
            select(Source.kind, Rejection.original_name, Rejection.reason)
            .join(Source, Rejection.source_id == Source.id).order_by(Rejection.original_name)).all()
    return {"images": [tuple(r) for r in images], "names": sorted(set(map(tuple, names))),
            "rejections": [tuple(r) for r in rejections]}


def without_ids(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("source_id", "source")}


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize("catalog_url", ["postgresql"], indirect=True)
def test_dask_ingest_into_postgresql_matches_the_thread_runner(
        prefect_harness, catalog_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from distributed import Client, LocalCluster, get_task_stream

    folder, archive = write_corpus(tmp_path / "corpus")

    # Baseline: threads in this process, into a catalog of its own.
    with pg_schema() as thread_url:
        monkeypatch.setenv("FACETRACE_DATA_DIR", str(tmp_path / "threads"))
        monkeypatch.setenv("FACETRACE_DB_URL", thread_url)
        monkeypatch.setenv("FACETRACE_TASK_RUNNER", "threads")
        get_settings(fresh=True)
        by_threads = ingest_both(folder, archive)
        expected = catalog_rows(thread_url)

    # The same ingest on a local cluster of two worker processes, into the fixture's catalog.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as observer:
        monkeypatch.setenv("FACETRACE_DATA_DIR", str(tmp_path / "dask"))
        monkeypatch.setenv("FACETRACE_DB_URL", catalog_url)
        monkeypatch.setenv("FACETRACE_TASK_RUNNER", "dask")
        monkeypatch.setenv("FACETRACE_DASK_ADDRESS", cluster.scheduler_address)
        get_settings(fresh=True)
        with get_task_stream(client=observer) as stream:  # what the cluster itself executed, and where
            by_dask = ingest_both(folder, archive)
        workers = set(cluster.scheduler_info["workers"])
        worker_pids = set(observer.run(os.getpid).values())
    get_settings(fresh=True)

    batches = [t for t in stream.data if t["key"].startswith("ingest_batch")]
    assert len(batches) == -(-11 // BATCH) + -(-4 // BATCH), [t["key"] for t in stream.data]
    assert {t["worker"] for t in batches} <= workers
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids  # two worker processes, not this one

    assert [without_ids(s) for s in by_dask] == [without_ids(s) for s in by_threads]
    assert by_dask[0]["new"] == 10 and by_dask[0]["duplicate"] == 1 and by_dask[0]["quarantined"] == 1
    assert by_dask[1]["new"] == 4
    assert catalog_rows(catalog_url) == expected
    for sha, path, *_ in expected["images"]:
        assert (tmp_path / "dask" / path).is_file(), path


def test_task_runner_follows_the_settings():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from facetrace.flows.common import task_runner
    from facetrace.settings import Settings

    threads = task_runner(Settings(workers=3))
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3
    local = task_runner(Settings(task_runner="dask", dask_workers=2))
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs["n_workers"] == 2 and local.cluster_kwargs["processes"] is True
    remote = task_runner(Settings(task_runner="dask", dask_address="tcp://127.0.0.1:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://127.0.0.1:8786"
