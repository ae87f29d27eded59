"""What an ingest tells its user and does with the files: a run that catalogued nothing fails with
the reason and a hint; the bomb rejection quotes the configured limit; the inbox is emptied as it is
read (catalogued files to processed/, quarantined ones to rejected/), and a user's folder is not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ingest_corpus import bomb_png, encode, noise_image


def _faces(folder: Path, count: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = folder / f"face{i}.png"
        path.write_bytes(encode(noise_image(i, (32, 32)), "PNG"))
        paths.append(path)
    return paths


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # ignored globally by tasks/storage.py
def test_bomb_rejection_quotes_the_configured_limit_not_pillows(monkeypatch):
    from PIL import Image

    from facetrace.tasks.storage import Limits, Quarantine, inspect_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test

    for data, limit in ((bomb_png(), 40_000_000), (encode(noise_image(1, (64, 64)), "PNG"), 1_000)):
        with pytest.raises(Quarantine) as refused:
            inspect_image(data, Limits(max_image_pixels=limit))
        assert refused.value.reason == "decompression_bomb"
        assert f"{limit:,}" in refused.value.detail and "FACETRACE_MAX_IMAGE_PIXELS" in refused.value.detail
        assert "178956970" not in refused.value.detail and "178,956,970" not in refused.value.detail
    # A configured limit above Pillow's own hard limit is honoured (Pillow's is raised to match).
    with pytest.raises(Quarantine) as refused:
        inspect_image(bomb_png(20_000, 20_000), Limits(max_image_pixels=500_000_000))
    assert refused.value.reason == "truncated"  # opened and decoded: the declared size was allowed


def test_an_ingest_that_catalogues_nothing_fails_with_the_reason_and_a_hint(prefect_harness, sqlite_settings_env,
                                                                            tmp_path, capsys):
    from facetrace.cli.app import main

    flat = tmp_path / "flat"
    _faces(flat, 3)
    assert main(["ingest", "folder", str(flat)]) == 1  # no --label, no Real/ or AI/ folders
    out, err = capsys.readouterr()
    assert "unknown_label" in out  # the table still shows what happened
    assert err.count("\n") == 1, err
    assert err.startswith("facetrace ingest: nothing catalogued: all 3 files quarantined (unknown_label: 3)")
    assert "pass --label real|synthetic or use Real/ and AI/ folders" in err

    assert main(["ingest", "folder", str(flat), "--label", "real"]) == 0  # the hint works
    assert main(["ingest", "folder", str(flat), "--label", "real"]) == 0  # all known already: not a failure
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["ingest", "folder", str(empty)]) == 1
    assert capsys.readouterr().err.strip().endswith(f"in {empty}")


def test_the_inbox_moves_each_recorded_file_out_and_never_overwrites(prefect_harness, sqlite_settings_env, tmp_path):
    from facetrace.flows.ingest import ingest_faces

    data_dir = sqlite_settings_env.data_dir
    inbox = data_dir / "inbox"
    good = _faces(inbox / "real", 3)
    (inbox / "real" / "broken.png").write_bytes(b"<html>not a picture</html>")
    (inbox / "notes.txt").write_text("not an image: not listed, so left alone")
    # Earlier files of the same names already moved: the new ones get a suffix, nothing is replaced.
    (data_dir / "processed" / "real").mkdir(parents=True)
    (data_dir / "processed" / "real" / "face0.png").write_bytes(b"earlier")

    first = ingest_faces(kind="folder", path=str(inbox), archive_dir=str(data_dir))
    assert (first["new"], first["quarantined"]) == (3, 1)
    assert first["moved"] == {"processed": 3, "rejected": 1, "left": 0}
    assert sorted(p.relative_to(inbox).as_posix() for p in inbox.rglob("*") if p.is_file()) == ["notes.txt"]
    assert (data_dir / "processed" / "real" / "face0.png").read_bytes() == b"earlier"
    assert (data_dir / "processed" / "real" / "face0-1.png").read_bytes() == encode(noise_image(0, (32, 32)), "PNG")
    assert sorted(p.name for p in (data_dir / "processed" / "real").iterdir()) == [
        "face0-1.png", "face0.png", "face1.png", "face2.png"]
    assert (data_dir / "rejected" / "real" / "broken.png").read_bytes() == b"<html>not a picture</html>"
    assert not any(p.exists() for p in good)

    # The next scan costs only what is new: the three earlier files are not read again.
    _faces(inbox / "real", 2, start=10)
    second = ingest_faces(kind="folder", path=str(inbox), archive_dir=str(data_dir))
    assert (second["seen"], second["new"]) == (2, 2)
    assert second["moved"] == {"processed": 2, "rejected": 0, "left": 0}


def test_a_users_folder_is_never_moved_unless_asked(prefect_harness, sqlite_settings_env, tmp_path, capsys):
    from facetrace.cli.app import main

    folder = tmp_path / "mine" / "Real"
    pictures = _faces(folder, 2)
    assert main(["ingest", "folder", str(folder.parent)]) == 0
    assert all(p.exists() for p in pictures)

    archive = tmp_path / "done"
    assert main(["ingest", "folder", str(folder.parent), "--move-to", str(archive)]) == 0
    assert not any(p.exists() for p in pictures)
    assert sorted(p.name for p in (archive / "processed" / "Real").iterdir()) == ["face0.png", "face1.png"]
    assert f"moved to {archive}/processed" in capsys.readouterr().out
    assert main(["ingest", "sample", "--move-to", str(archive)]) == 2  # folders only


def test_moving_never_replaces_a_file_that_appears_at_the_target(tmp_path):
    from facetrace.tasks.inbox import move_without_overwriting

    source, target = tmp_path / "a.png", tmp_path / "out" / "a.png"
    target.parent.mkdir()
    for n in range(3):
        (tmp_path / "a.png").write_bytes(f"{n}".encode())
        moved = move_without_overwriting(source, target)
        assert moved.read_bytes() == f"{n}".encode() and not source.exists()
    assert sorted(os.listdir(target.parent)) == ["a-1.png", "a-2.png", "a.png"]
