"""Kaggle ingest through the real client code path (`download_kaggle` -> `KaggleApi`
-> kagglesdk -> HTTP), answered by a stand-in for the Kaggle API on 127.0.0.1 (tests/kaggle_standin.py)
serving a zip laid out as Kaggle ships `ashwingupta3012/human-faces`. No network.

The CLI runs in a subprocess: the client reads its endpoint (KAGGLE_API_ENVIRONMENT) when it is
first imported, so each run needs a fresh interpreter with the stand-in's environment."""

from __future__ import annotations

import hashlib
import subprocess

import pytest
from sqlalchemy import select

from facetrace.db.engine import dispose_engines, get_engine, session_scope
from facetrace.db.models import Image, Sighting, Source
from ingest_corpus import FACETRACE, cli_env, encode, noise_image
from kaggle_standin import Dataset, KaggleStandIn, human_faces_archive

SLUG = "ashwingupta3012/human-faces"
pytestmark = pytest.mark.slow


@pytest.fixture
def human_faces() -> tuple[Dataset, dict[str, bytes]]:
    """A small `human-faces`: JPEGs named as in the real archive, one PNG, one `.jpeg`, one repeat."""
    images = {f"1 ({i}).jpg": encode(noise_image(300 + i, (72, 64)), "JPEG", quality=85) for i in range(1, 7)}
    images["1 (7).png"] = encode(noise_image(307, (64, 64)), "PNG")
    images["1 (8).jpeg"] = encode(noise_image(308, (64, 72)), "JPEG")
    images["1 (9).jpg"] = images["1 (2).jpg"]  # the real dataset repeats some pictures under new names
    dataset = Dataset("ashwingupta3012", "human-faces", human_faces_archive(images), licenses=["CC0-1.0"],
                      title="Human Faces")
    return dataset, images


def ingest(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FACETRACE, "ingest", "kaggle", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_kaggle_dataset_is_downloaded_by_the_real_client_cached_and_catalogued(
        prefect_harness, settings_env, tmp_path, human_faces):
    dataset, images = human_faces
    with KaggleStandIn([dataset]) as kaggle:
        env = cli_env(settings_env.data_dir, settings_env.catalog_url, tmp_path / "home", **kaggle.client_env())
        first = ingest(env)
        assert first.returncode == 0, first.stderr[-3000:]

        # The client spoke the Kaggle protocol: authenticated RPCs, then the signed storage URL.
        posts = [r for r in kaggle.requests if r.method == "POST"]
        assert {r.path.rsplit("/", 1)[-1] for r in posts} == {"GetDatasetMetadata", "DownloadDataset"}
        assert all(r.authorization and r.authorization.startswith("Basic ") for r in posts)
        assert all(r.body == {"ownerSlug": "ashwingupta3012", "datasetSlug": "human-faces"} for r in posts)
        assert [r.path for r in kaggle.requests if r.method == "GET"] == [
            "/storage/kaggle-data-sets/ashwingupta3012/human-faces/archive.zip"]

        archive = settings_env.data_dir / "cache" / "kaggle" / "ashwingupta3012" / "human-faces" / "human-faces.zip"
        assert archive.read_bytes() == dataset.archive

        served = len(kaggle.requests)
        second = ingest(env, SLUG)  # the slug given explicitly: the same source
        assert second.returncode == 0, second.stderr[-3000:]
        assert len(kaggle.requests) == served, "a cached archive is not downloaded again"

    dispose_engines()
    with session_scope(get_engine(settings_env.catalog_url)) as session:
        (source,) = session.scalars(select(Source)).all()
        rows = session.scalars(select(Image)).all()
        sightings = dict(session.execute(select(Sighting.original_name, Sighting.image_id)).all())
    assert (source.kind, source.reference, source.license) == ("kaggle", SLUG, "CC0-1.0")
    assert source.details["sha256"] == hashlib.sha256(dataset.archive).hexdigest()
    assert source.details["title"] == "Human Faces"
    distinct = {hashlib.sha256(data).hexdigest() for data in images.values()}
    assert {row.sha256 for row in rows} == distinct and len(rows) == 8
    assert {row.label for row in rows} == {"real"}  # from the archive's Humans/ folder
    assert set(sightings) == {f"Humans/{name}" for name in images}
    assert sightings["Humans/1 (9).jpg"] == sightings["Humans/1 (2).jpg"]
    for row in rows:
        assert hashlib.sha256((settings_env.data_dir / row.path).read_bytes()).hexdigest() == row.sha256


def test_missing_kaggle_credentials_fail_at_once_with_one_line_naming_them(prefect_harness, tmp_path, human_faces):
    dataset, _ = human_faces
    data_dir = tmp_path / "data"
    with KaggleStandIn([dataset]) as kaggle:
        env = cli_env(data_dir, f"sqlite:///{data_dir / 'catalog.sqlite'}", tmp_path / "home",
                      **kaggle.client_env(with_credentials=False))
        done = ingest(env)
        assert kaggle.requests == []  # refused before any request
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("facetrace ingest: Kaggle credentials not found")
    assert "KAGGLE_USERNAME" in lines[0] and "KAGGLE_KEY" in lines[0]
    assert done.stdout == ""


def test_credentials_kaggle_refuses_are_reported_not_retried(prefect_harness, tmp_path, human_faces):
    dataset, _ = human_faces
    data_dir = tmp_path / "data"
    with KaggleStandIn([dataset]) as kaggle:
        env = cli_env(data_dir, f"sqlite:///{data_dir / 'catalog.sqlite'}", tmp_path / "home",
                      **{**kaggle.client_env(), "KAGGLE_KEY": "wrong"})
        done = ingest(env)
        downloads = [r for r in kaggle.requests if r.path.endswith("/DownloadDataset")]
    assert done.returncode != 0
    assert len(downloads) == 1, "a 401 is permanent: not retried"
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("facetrace ingest: Kaggle refused the credentials") and "KAGGLE_KEY" in last
