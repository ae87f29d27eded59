"""Emptying the inbox: after an ingest's batches commit, each file it catalogued moves to
``processed/`` and each file it quarantined to ``rejected/`` (beside the inbox, keeping its relative
path, never overwriting), so the next scan reads only what is new.

Only the inbox deployment (and `facetrace ingest folder --move-to DIR`) moves files; a plain
ingest of a user's folder leaves it untouched.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE


def free_name(target: Path) -> Path:
    """``target``, or ``name-1.ext``, ``name-2.ext``... : the first name nobody uses yet."""
    if not os.path.lexists(target):
        return target
    n = 1
    while os.path.lexists(candidate := target.with_name(f"{target.stem}-{n}{target.suffix}")):
        n += 1
    return candidate


def move_without_overwriting(source: Path, target: Path) -> Path:
    """Move ``source`` to ``target`` (or a suffixed name beside it when taken); return where it went.

    A hard link then an unlink: the link fails instead of replacing a file that appeared meanwhile.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        destination = free_name(target)
        try:
            os.link(source, destination, follow_symlinks=False)
        except FileExistsError:
            continue  # taken between the check and the link: next suffix
        except OSError:  # another file system, or links not supported: a rename after the check
            os.rename(source, destination)
            return destination
        os.unlink(source)
        return destination


@task(cache_policy=NO_CACHE)
def move_ingested_files(root: Path, names: Iterable[str], rejected: Iterable[str], archive_dir: Path) -> dict[str, int]:
    """Move the listed files of ``root``: quarantined ones to ``archive_dir/rejected/``, the rest
    (catalogued: new or already known) to ``archive_dir/processed/``. Returns counts per place."""
    logger = get_run_logger()
    rejected = set(rejected)
    moved = {"processed": 0, "rejected": 0, "left": 0}
    for name in names:
        place = "rejected" if name in rejected else "processed"
        source = Path(root) / name
        if not os.path.lexists(source):  # gone meanwhile, or a name not decodable as given
            moved["left"] += 1
            continue
        try:
            move_without_overwriting(source, Path(archive_dir) / place / name)
            moved[place] += 1
        except OSError as exc:
            logger.warning("could not move %s to %s/: %s", source, place, exc)
            moved["left"] += 1
    return moved
