"""Real-face sources (folder, zip, Kaggle, the bundled scikit-image sample) and the batch task that
inspects, stores and catalogues their files.

A source is listed into :class:`Candidate` items (a name, a label, a way to read the bytes, or a
reason to refuse it before reading); :func:`ingest_batch` turns a batch of candidates into catalog
rows and quarantine records in one transaction.
"""

from __future__ import annotations

import csv
import io
import os
import stat
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from facetrace.db.catalog import AcceptedImage, BatchCounts, add_image, add_rejection, import_prompt
from facetrace.db.engine import get_engine, session_scope
from facetrace.tasks.storage import Limits, Quarantine, inspect_image, sha256_hex, store_bytes

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Folder names that imply a label (the original project's layout is Real/ and AI/).
LAYOUT_LABELS = {
    "real": "real", "human": "real", "humans": "real", "faces": None,
    "ai": "synthetic", "fake": "synthetic", "synthetic": "synthetic", "generated": "synthetic",
}
KAGGLE_DEFAULT = "ashwingupta3012/human-faces"


@dataclass(frozen=True)
class SourceInfo:
    kind: str
    reference: str
    license: str | None = None
    version: str | None = None
    details: dict[str, Any] | None = None


@dataclass(frozen=True)
class Candidate:
    """One file a source offers. ``read`` returns its bytes; ``refusal`` is set when it must not be read."""

    name: str
    label: str | None
    read: Callable[[], bytes] | None = None
    size: int | None = None
    refusal: tuple[str, str] | None = None
    prompt: str | None = None


@dataclass
class Listing:
    source: SourceInfo
    candidates: list[Candidate] = field(default_factory=list)


def display_name(raw: str | bytes) -> str:
    """A file name that can be stored as UTF-8 text, keeping undecodable bytes visible (``\\xff``)."""
    if isinstance(raw, bytes):
        return raw.decode("utf-8", errors="backslashreplace")
    return raw.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")


def label_from_layout(parts: Iterable[str], given: str | None) -> str | None:
    if given:
        return given
    for part in reversed(list(parts)[:-1]):
        label = LAYOUT_LABELS.get(part.lower())
        if label:
            return label
    return None


def read_provenance_csv(path: Path | None) -> dict[str, str]:
    """Map image file name -> prompt from a CSV with columns ``prompt,image_name``."""
    if path is None:
        return {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = {"prompt", "image_name"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"provenance CSV {path} lacks column(s) {sorted(missing)}; expected prompt,image_name")
        return {row["image_name"].strip(): row["prompt"].strip() for row in reader if row.get("image_name")}


def _prompt_for(name: str, prompts: dict[str, str]) -> str | None:
    base = PurePosixPath(name).name
    # The original project's duplicates are named "Copy of X.png": the same picture as X.
    return prompts.get(base) or prompts.get(base.removeprefix("Copy of "))


def list_folder(path: Path, label: str | None = None, provenance_csv: Path | None = None) -> Listing:
    """Every image-like file under ``path``; symlinks are refused, never followed."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"folder {root} does not exist or is not a directory")
    prompts = read_provenance_csv(provenance_csv)
    listing = Listing(SourceInfo("folder", str(root.resolve()), details={"provenance_csv": str(provenance_csv) if provenance_csv else None}))
    stack = [os.fsencode(root)]
    base = os.fsencode(root)
    while stack:
        current = stack.pop()
        with os.scandir(current) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel_bytes = os.path.relpath(entry.path, base)
                name = display_name(rel_bytes)
                parts = name.split("/")
                if entry.is_symlink():
                    listing.candidates.append(Candidate(name, None, refusal=("symlink", f"-> {display_name(os.readlink(entry.path))}")))
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                    continue
                if not entry.is_file(follow_symlinks=False) or name.startswith(".") or parts[-1].startswith("."):
                    continue
                if Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                file_label = label_from_layout(parts, label)
                file_path = entry.path
                listing.candidates.append(
                    Candidate(
                        name, file_label, read=lambda p=file_path: Path(os.fsdecode(p)).read_bytes(),
                        size=entry.stat(follow_symlinks=False).st_size,
                        prompt=_prompt_for(name, prompts) if file_label == "synthetic" else None,
                    )
                )
    return listing


def _unsafe_zip_name(name: str) -> bool:
    pure = PurePosixPath(name.replace("\\", "/"))
    return name.startswith(("/", "\\")) or ".." in pure.parts or (len(name) > 1 and name[1] == ":")


def list_zip(path: Path, label: str | None = None, kind: str = "zip", reference: str | None = None,
             provenance_csv: Path | None = None) -> Listing:
    """Entries of a zip archive, read in memory (nothing is extracted, so a hostile name cannot escape)."""
    archive_path = Path(path)
    if not zipfile.is_zipfile(archive_path):
        raise ValueError(f"{archive_path} is not a readable zip archive")
    prompts = read_provenance_csv(provenance_csv)
    archive = zipfile.ZipFile(archive_path)
    listing = Listing(SourceInfo(kind, reference or str(archive_path.resolve()),
                                 details={"sha256": sha256_hex(archive_path.read_bytes()), "entries": len(archive.infolist())}))
    for info in archive.infolist():
        if info.is_dir():
            continue
        name = display_name(info.filename if not (info.flag_bits & 0x800) else info.filename)
        if _unsafe_zip_name(info.filename):
            listing.candidates.append(Candidate(name, None, refusal=("zip_slip", f"entry path {info.filename!r}")))
            continue
        if stat.S_ISLNK(info.external_attr >> 16):
            listing.candidates.append(Candidate(name, None, refusal=("symlink", "symlink entry in archive")))
            continue
        parts = PurePosixPath(name).parts
        if Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
            if parts[-1].lower().endswith(".csv") and not prompts:
                continue
            continue
        file_label = label_from_layout(parts, label)
        listing.candidates.append(
            Candidate(name, file_label, read=lambda i=info: archive.read(i), size=info.file_size,
                      prompt=_prompt_for(name, prompts) if file_label == "synthetic" else None)
        )
    return listing


def list_sample(count: int = 100) -> Listing:
    """scikit-image's bundled LFW subset: its first 100 arrays are faces (25x25 grey), the rest are not."""
    import numpy as np
    import skimage
    from PIL import Image as PILImage
    from skimage.data import lfw_subset

    faces = lfw_subset()[: min(count, 100)]
    source = SourceInfo(
        "sample", "skimage.data.lfw_subset",
        license="Labeled Faces in the Wild (UMass Amherst): research use; see http://vis-www.cs.umass.edu/lfw/",
        version=f"scikit-image {skimage.__version__}",
        details={"note": "first 100 entries of lfw_subset (faces), 25x25 greyscale, stored losslessly as PNG"},
    )

    def encode(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        PILImage.fromarray((np.clip(array, 0, 1) * 255).round().astype("uint8"), "L").save(buffer, "PNG")
        return buffer.getvalue()

    return Listing(source, [Candidate(f"lfw_subset/{i:03d}.png", "real", read=lambda a=face: encode(a))
                            for i, face in enumerate(faces)])


def kaggle_credentials() -> dict[str, str]:
    """Kaggle credentials from the environment, ~/.kaggle/kaggle.json, or Prefect Secret blocks."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return {"KAGGLE_USERNAME": os.environ["KAGGLE_USERNAME"], "KAGGLE_KEY": os.environ["KAGGLE_KEY"]}
    if os.environ.get("KAGGLE_API_TOKEN"):
        return {"KAGGLE_API_TOKEN": os.environ["KAGGLE_API_TOKEN"]}
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    if (config_dir / "kaggle.json").exists() or (config_dir / "access_token").exists():
        return {}
    try:
        from prefect.blocks.system import Secret

        return {"KAGGLE_USERNAME": Secret.load("kaggle-username").get(), "KAGGLE_KEY": Secret.load("kaggle-key").get()}
    except Exception:  # noqa: BLE001 - no server, no block: fall through to the clear error below
        pass
    raise PermissionError(
        "Kaggle credentials not found: set KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN), "
        "put kaggle.json in ~/.kaggle, or create Prefect Secret blocks 'kaggle-username' and 'kaggle-key'"
    )


@task(retries=3, retry_delay_seconds=[2, 10, 30], timeout_seconds=3600, cache_policy=NO_CACHE)
def download_kaggle(slug: str, cache_dir: Path) -> Path:
    """Download a Kaggle dataset archive into the cache (once) with the official client; return the zip."""
    owner, _, name = slug.partition("/")
    if not owner or not name:
        raise ValueError(f"Kaggle dataset slug must look like owner/name, got {slug!r}")
    target_dir = Path(cache_dir) / "kaggle" / owner / name
    archive = target_dir / f"{name}.zip"
    if archive.exists() and zipfile.is_zipfile(archive):
        return archive
    credentials = kaggle_credentials()
    target_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(credentials)
    # Import the API class directly: `import kaggle` authenticates at import time and exits on failure.
    from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    api.authenticate()
    api.dataset_download_files(slug, path=str(target_dir), unzip=False, quiet=False, force=False)
    if not archive.exists():
        zips = sorted(target_dir.glob("*.zip"))
        if not zips:
            raise FileNotFoundError(f"Kaggle download of {slug} produced no zip in {target_dir}")
        archive = zips[0]
    return archive


def _inspect_and_store(candidate: Candidate, data_root: Path, limits: Limits) -> AcceptedImage:
    if candidate.refusal:
        raise Quarantine(*candidate.refusal)
    if candidate.label is None:
        raise Quarantine("unknown_label", "pass --label or use a Real/ and AI/ layout")
    if candidate.size is not None and candidate.size > limits.max_file_bytes:
        raise Quarantine("too_large", f"{candidate.size} bytes > cap {limits.max_file_bytes}")
    try:
        data = candidate.read()
    except OSError as exc:
        raise Quarantine("unreadable", f"{type(exc).__name__}: {exc}") from None
    record = inspect_image(data, limits)
    path = store_bytes(data_root, record, data)
    provenance = None
    if candidate.label == "synthetic":
        provenance = "partial" if candidate.prompt else "none"
    return AcceptedImage(candidate.name, candidate.label, path, record, provenance=provenance)


@task(retries=2, retry_delay_seconds=[1, 5], tags=["catalog"], cache_policy=NO_CACHE)
def ingest_batch(candidates: list[Candidate], source_id: int, data_root: Path, db_url: str,
                 limits: Limits, flow_run_id: str | None = None) -> BatchCounts:
    """Inspect, store and catalogue one batch; the batch's rows commit together, after its files exist."""
    counts = BatchCounts(seen=len(candidates))
    accepted: list[tuple[AcceptedImage, str | None]] = []
    refused: list[tuple[Candidate, Quarantine]] = []
    for candidate in candidates:
        try:
            accepted.append((_inspect_and_store(candidate, data_root, limits), candidate.prompt))
        except Quarantine as q:
            refused.append((candidate, q))
    with session_scope(get_engine(db_url)) as session:
        for image, prompt in accepted:
            if prompt:
                image.prompt_id = import_prompt(session, prompt, flow_run_id)
            image_id, is_new = add_image(session, source_id, image, flow_run_id)
            if is_new:
                counts.new += 1
                counts.new_image_ids.append(image_id)
            else:
                counts.duplicate += 1
        for candidate, q in refused:
            add_rejection(session, source_id, candidate.name, q.reason, q.detail, size=candidate.size,
                          flow_run_id=flow_run_id)
            counts.rejected[q.reason] += 1
    return counts
