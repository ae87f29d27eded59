"""Ingest as a specification: every file a source offers ends catalogued or quarantined with a
specific reason, the totals reconcile, nothing lands outside the data root, and a second run of the
same source changes nothing. On SQLite and PostgreSQL, through the real `ingest_faces` flow."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sqlalchemy import func, select

from facetrace.db.engine import get_engine, session_scope
from facetrace.db.models import Base, Image, Prompt, Rejection, Sighting, Source
from ingest_corpus import Expected, build_bad_corpus, build_slip_zip, encode, noise_image


def catalog(url: str):
    return session_scope(get_engine(url))


def row_counts(url: str) -> dict[str, int]:
    with catalog(url) as session:
        return {t.name: session.scalar(select(func.count()).select_from(t)) for t in Base.metadata.sorted_tables}


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def assert_stored_files_match(settings) -> None:
    """Every catalogued image exists under the data root with the bytes its sha256 names."""
    with catalog(settings.catalog_url) as session:
        rows = session.execute(select(Image.sha256, Image.path)).all()
    for sha, rel in rows:
        path = settings.data_dir / rel
        assert path.is_file(), rel
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha, rel


def assert_fates(settings, source_id: int, expected: dict[str, Expected]) -> None:
    """Each name got exactly its expected fate: a rejection with that reason, or an image (or a sighting
    of one) with the expected properties."""
    with catalog(settings.catalog_url) as session:
        rejected = dict(session.execute(
            select(Rejection.original_name, Rejection.reason).where(Rejection.source_id == source_id)).all())
        sighted = dict(session.execute(
            select(Sighting.original_name, Sighting.image_id).where(Sighting.source_id == source_id)).all())
        images = {row.id: row for row in session.scalars(select(Image).where(Image.id.in_(sighted.values())))}

    assert set(rejected) | set(sighted) == set(expected), "every file has exactly one fate"
    assert not set(rejected) & set(sighted)
    for name, fate in expected.items():
        if fate.reason:
            assert rejected.get(name) == fate.reason, f"{name}: expected {fate.reason}, got {rejected.get(name)}"
        elif fate.duplicate_of:
            assert sighted[name] == sighted[fate.duplicate_of], f"{name} is the same picture as {fate.duplicate_of}"
            # One row, under the name listed first; the other name is a sighting of it.
            assert images[sighted[name]].original_name in (name, fate.duplicate_of)
        else:
            row = images[sighted[name]]
            assert (row.mode, (row.width, row.height)) == (fate.mode, fate.size), name
            assert row.exif_orientation == fate.orientation, name
            assert row.status == "ok" and row.label == "real" and len(row.phash) == 16


def test_every_bad_input_ends_catalogued_or_rejected_with_its_reason(prefect_harness, settings_env, tmp_path):
    from facetrace.flows.ingest import ingest_faces

    inbox = tmp_path / "inbox"
    expected = build_bad_corpus(inbox)
    outside_before = files_under(tmp_path) - files_under(settings_env.data_dir)

    result = ingest_faces(kind="folder", path=str(inbox), label="real")

    reasons = [fate.reason for fate in expected.values() if fate.reason]
    duplicates = [fate for fate in expected.values() if fate.duplicate_of]
    assert result["seen"] == len(expected) == result["new"] + result["duplicate"] + result["quarantined"]
    assert result["quarantined"] == len(reasons)
    assert result["duplicate"] == len(duplicates)
    assert result["new"] == len(expected) - len(reasons) - len(duplicates)
    assert sum(result["quarantined_by_reason"].values()) == len(reasons)
    counts = row_counts(settings_env.catalog_url)
    assert counts["images"] == result["new"]
    assert counts["sightings"] == result["new"] + result["duplicate"]
    assert counts["rejections"] == result["quarantined"]

    assert_fates(settings_env, result["source_id"], expected)
    assert_stored_files_match(settings_env)
    with catalog(settings_env.catalog_url) as session:
        details = dict(session.execute(select(Rejection.original_name, Rejection.detail)).all())
    assert details["error-page.jpg"] == "looks like HTML"
    assert "frames" in details["animated.gif"] and "-> " in details["link.png"]
    # Nothing was written anywhere but the data root, and the link's target was not followed.
    assert files_under(tmp_path) - files_under(settings_env.data_dir) == outside_before
    assert not list(settings_env.data_dir.rglob(".tmp-*"))


def test_zip_slip_entries_are_refused_and_nothing_escapes(prefect_harness, settings_env, tmp_path):
    from facetrace.flows.ingest import ingest_faces

    archive = tmp_path / "upload" / "faces.zip"
    archive.parent.mkdir()
    expected = build_slip_zip(archive)
    absolute = Path("/tmp/facetrace-absolute.jpg")
    absolute_existed = absolute.exists()

    result = ingest_faces(kind="zip", path=str(archive))  # label from the Humans/ folder

    assert (result["seen"], result["new"], result["quarantined_by_reason"]) == (4, 2, {"zip_slip": 2})
    assert_fates(settings_env, result["source_id"], expected)
    assert not (tmp_path / "upload" / "escaped.jpg").exists() and not (tmp_path / "escaped.jpg").exists()
    assert absolute.exists() == absolute_existed
    with catalog(settings_env.catalog_url) as session:
        source = session.get(Source, result["source_id"])
    assert source.kind == "zip" and source.details["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()


def test_a_second_ingest_of_the_same_source_adds_nothing(prefect_harness, settings_env, tmp_path):
    from facetrace.flows.ingest import ingest_faces

    build_bad_corpus(tmp_path / "inbox")
    build_slip_zip(tmp_path / "faces.zip")
    first = [ingest_faces(kind="folder", path=str(tmp_path / "inbox"), label="real"),
             ingest_faces(kind="zip", path=str(tmp_path / "faces.zip"))]
    counts = row_counts(settings_env.catalog_url)
    stored = files_under(settings_env.data_dir / "images")

    again = [ingest_faces(kind="folder", path=str(tmp_path / "inbox"), label="real"),
             ingest_faces(kind="zip", path=str(tmp_path / "faces.zip"))]

    assert row_counts(settings_env.catalog_url) == counts
    assert files_under(settings_env.data_dir / "images") == stored
    for before, after in zip(first, again):
        assert after["new"] == 0 and after["source_id"] == before["source_id"]
        assert after["duplicate"] == before["new"] + before["duplicate"]  # known content, not decoded again
        assert after["quarantined_by_reason"] == before["quarantined_by_reason"]

    lost = sorted(stored)[0]
    lost.unlink()  # a stored file lost since: the next ingest of its source restores it
    ingest_faces(kind="folder", path=str(tmp_path / "inbox"), label="real")
    ingest_faces(kind="zip", path=str(tmp_path / "faces.zip"))
    assert lost.is_file() and row_counts(settings_env.catalog_url) == counts
    assert_stored_files_match(settings_env)


def test_provenance_csv_attaches_imported_prompts_to_the_synthetic_images_it_names(
        prefect_harness, settings_env, tmp_path):
    from facetrace.flows.ingest import ingest_faces

    root = tmp_path / "project"
    (root / "AI").mkdir(parents=True)
    (root / "Real").mkdir()
    for i, name in enumerate(["gen_1.png", "gen_2.png", "Copy of gen_3.png", "gen_unlisted.png"]):
        (root / "AI" / name).write_bytes(encode(noise_image(50 + i, (40, 40)), "PNG"))
    (root / "Real" / "person.jpg").write_bytes(encode(noise_image(60, (40, 40)), "JPEG"))
    csv_path = tmp_path / "image_descriptions.csv"
    csv_path.write_text("prompt,image_name\n"
                        "\"A woman with sharp cheekbones, smiling.\",gen_1.png\n"
                        "\"A woman with sharp cheekbones, smiling.\",gen_2.png\n"
                        "An old man with a beard.,gen_3.png\n")

    result = ingest_faces(kind="folder", path=str(root), provenance=str(csv_path))

    assert (result["new"], result["quarantined"]) == (5, 0)
    with catalog(settings_env.catalog_url) as session:
        rows = {img.original_name: img for img in session.scalars(select(Image))}
        prompts = {p.id: p for p in session.scalars(select(Prompt))}
    assert len(prompts) == 2 and {p.method for p in prompts.values()} == {"import"}
    assert rows["AI/gen_1.png"].prompt_id == rows["AI/gen_2.png"].prompt_id  # one row per distinct text
    assert prompts[rows["AI/gen_1.png"].prompt_id].text == "A woman with sharp cheekbones, smiling."
    assert prompts[rows["AI/Copy of gen_3.png"].prompt_id].text == "An old man with a beard."
    for name in ("AI/gen_1.png", "AI/gen_2.png", "AI/Copy of gen_3.png"):
        assert (rows[name].label, rows[name].provenance) == ("synthetic", "partial")
    assert (rows["AI/gen_unlisted.png"].provenance, rows["AI/gen_unlisted.png"].prompt_id) == ("none", None)
    assert (rows["Real/person.jpg"].label, rows["Real/person.jpg"].provenance) == ("real", None)

    ingest_faces(kind="folder", path=str(root), provenance=str(csv_path))
    assert row_counts(settings_env.catalog_url)["prompts"] == 2  # re-import reuses the prompts


def test_the_original_projects_copies_are_duplicates_with_their_sightings(
        prefect_harness, sqlite_settings_env, shared_faces: Path):
    from facetrace.flows.ingest import ingest_faces

    files = sorted(p for p in shared_faces.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    copies = [p for p in files if p.name.startswith("Copy of ") and (p.parent / p.name.removeprefix("Copy of ")).exists()
              and digests[p] == digests[p.parent / p.name.removeprefix("Copy of ")]]
    assert copies, "the development sample should hold byte-identical 'Copy of' files"

    result = ingest_faces(kind="folder", path=str(shared_faces),
                          provenance=str(shared_faces / "image_descriptions.csv"))

    assert result["seen"] == len(files)
    assert result["new"] == len(set(digests.values())) - _rejected_contents(sqlite_settings_env, digests)
    assert result["duplicate"] >= len(copies)
    assert result["seen"] == result["new"] + result["duplicate"] + result["quarantined"]
    with catalog(sqlite_settings_env.catalog_url) as session:
        sighted = dict(session.execute(select(Sighting.original_name, Sighting.image_id)).all())
        synthetic = session.execute(select(Image.provenance, func.count()).where(Image.label == "synthetic")
                                    .group_by(Image.provenance)).all()
    for copy in copies:
        original = copy.parent / copy.name.removeprefix("Copy of ")
        name_of = lambda p: str(p.relative_to(shared_faces))  # noqa: E731
        assert sighted[name_of(copy)] == sighted[name_of(original)], copy.name
    assert dict(synthetic).get("partial", 0) > 0  # prompts from image_descriptions.csv


def _rejected_contents(settings, digests: dict[Path, str]) -> int:
    with catalog(settings.catalog_url) as session:
        rejected = set(session.scalars(select(Rejection.sha256).where(Rejection.sha256.is_not(None))))
    return len(rejected & set(digests.values()))


def test_the_bundled_sample_is_ingested_offline_with_its_licence(prefect_harness, sqlite_settings_env):
    from facetrace.flows.ingest import ingest_faces

    result = ingest_faces(kind="sample")
    assert (result["seen"], result["new"], result["quarantined"]) == (100, 100, 0)
    with catalog(sqlite_settings_env.catalog_url) as session:
        source = session.get(Source, result["source_id"])
        sizes = set(session.execute(select(Image.width, Image.height)).all())
    assert source.kind == "sample" and "Labeled Faces in the Wild" in source.license
    assert source.version.startswith("scikit-image")
    assert sizes == {(25, 25)}
    assert ingest_faces(kind="sample")["new"] == 0


def test_a_file_the_ingest_cannot_use_never_fails_its_batch(prefect_harness, sqlite_settings_env, tmp_path):
    """Unreadable files and odd image modes are quarantined; the rest of the batch is catalogued."""
    from facetrace.flows.ingest import ingest_faces
    from PIL import Image as PILImage

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "fine.png").write_bytes(encode(noise_image(70, (32, 32)), "PNG"))
    PILImage.new("F", (32, 32), 0.5).save(inbox / "float.tif")  # 32-bit float TIFF
    locked = inbox / "locked.jpg"
    locked.write_bytes(encode(noise_image(71, (32, 32)), "JPEG"))
    locked.chmod(0)
    try:
        result = ingest_faces(kind="folder", path=str(inbox), label="real")
    finally:
        locked.chmod(0o644)
    assert result["seen"] == 3 and result["new"] >= 1
    assert result["seen"] == result["new"] + result["duplicate"] + result["quarantined"]
    if os.geteuid() != 0:  # root reads a 0-mode file anyway
        assert result["quarantined_by_reason"].get("unreadable") == 1


def test_a_file_refused_once_and_whole_later_is_catalogued_and_no_longer_a_rejection(
        prefect_harness, settings_env, tmp_path):
    from facetrace.flows.ingest import ingest_faces

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    whole = encode(noise_image(80, (96, 96)), "JPEG", quality=95)
    (inbox / "download.jpg").write_bytes(whole[: len(whole) // 2])  # an interrupted download
    assert ingest_faces(kind="folder", path=str(inbox), label="real")["quarantined_by_reason"] == {"truncated": 1}

    (inbox / "download.jpg").write_bytes(whole)
    result = ingest_faces(kind="folder", path=str(inbox), label="real")

    assert (result["new"], result["quarantined"]) == (1, 0)
    counts = row_counts(settings_env.catalog_url)
    assert (counts["images"], counts["sightings"], counts["rejections"]) == (1, 1, 0)
