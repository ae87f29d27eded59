"""Checks on a source that need neither Prefect nor the catalog, so the command line can refuse a
source that cannot work (a missing path, no Kaggle credentials) in a fraction of a second, before
any flow run or server starts. The work on sources themselves is in :mod:`facetrace.tasks.faces`.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
KAGGLE_DEFAULT = "ashwingupta3012/human-faces"
KAGGLE_CREDENTIALS_HELP = (
    "Kaggle credentials not found: set KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN), "
    "put kaggle.json in ~/.kaggle, or create Prefect Secret blocks 'kaggle-username' and 'kaggle-key'"
)


def local_kaggle_credentials() -> dict[str, str] | None:
    """Kaggle credentials from the environment ({} when the client finds its own files), else None."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return {"KAGGLE_USERNAME": os.environ["KAGGLE_USERNAME"], "KAGGLE_KEY": os.environ["KAGGLE_KEY"]}
    if os.environ.get("KAGGLE_API_TOKEN"):
        return {"KAGGLE_API_TOKEN": os.environ["KAGGLE_API_TOKEN"]}
    config_dirs = [Path(os.environ["KAGGLE_CONFIG_DIR"])] if os.environ.get("KAGGLE_CONFIG_DIR") else [
        Path.home() / ".kaggle", Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "kaggle"]
    if any((d / "kaggle.json").is_file() or (d / "access_token").is_file() for d in config_dirs):
        return {}
    return None


def prefect_api_available(data_dir: Path) -> bool:
    """A Prefect API that could hold Secret blocks: a configured one, or this data root's running server.

    Without one, looking for blocks would start a temporary server (seconds) to find nothing.
    """
    from facetrace.local_server import configured_api_url, read_state

    return bool(configured_api_url() or read_state(data_dir))


def kaggle_cache_dir(slug: str, cache_dir: Path) -> Path:
    owner, _, name = slug.partition("/")
    if not owner or not name or "/" in name or owner in (".", "..") or name in (".", ".."):
        raise ValueError(f"Kaggle dataset slug must look like owner/name, got {slug!r}")
    return Path(cache_dir) / "kaggle" / owner / name


def cached_kaggle_archive(slug: str, cache_dir: Path) -> Path | None:
    """The complete archive of ``slug`` already in the cache, if any (a partial download is not a zip)."""
    target_dir = kaggle_cache_dir(slug, cache_dir)
    archive = target_dir / f"{slug.partition('/')[2]}.zip"
    return archive if archive.is_file() and zipfile.is_zipfile(archive) else None


def check_source(kind: str, path: str | None = None, slug: str | None = None) -> None:
    """Refuse, before any run starts, a source that cannot work: a missing path or Kaggle credentials.

    The CLI calls this first so that such a mistake is one line on stderr, not a failed flow run.
    """
    from facetrace.settings import get_settings

    if kind in ("folder", "zip"):
        if not path:
            raise ValueError(f"a {kind} source needs a path")
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} does not exist")
        if kind == "folder" and not Path(path).is_dir():
            raise ValueError(f"{path} is not a folder (use `ingest zip` for an archive)")
    elif kind == "kaggle":
        data_dir = get_settings().data_dir
        if (cached_kaggle_archive(slug or KAGGLE_DEFAULT, data_dir / "cache") is None
                and local_kaggle_credentials() is None and not prefect_api_available(data_dir)):
            raise PermissionError(KAGGLE_CREDENTIALS_HELP)
    elif kind != "sample":
        raise ValueError(f"unknown source kind {kind!r}; expected folder, zip, kaggle or sample")
