"""Real-face sources (folder, zip, Kaggle, the bundled scikit-image sample) and the batch task that
inspects, stores and catalogues their files.

A source is listed into :class:`Candidate` items (a name, a label, a way to read the bytes, or a
reason to refuse it before reading); :func:`ingest_batch` turns a batch of candidates into catalog
rows and quarantine records in one transaction.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import os
import stat
import threading
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from sqlalchemy.orm import Session

from facetrace.db.catalog import (
    AcceptedImage,
    BatchCounts,
    KnownImage,
    RejectedFile,
    add_images,
    add_rejections,
    import_prompt,
    known_images,
    quarantine_images,
)
from facetrace.db.engine import get_engine, session_scope
from facetrace.tasks.sources import (  # noqa: F401 - KAGGLE_DEFAULT, cached_kaggle_archive: re-exported
    IMAGE_SUFFIXES,
    KAGGLE_CREDENTIALS_HELP,
    KAGGLE_DEFAULT,
    cached_kaggle_archive,
    kaggle_cache_dir,
    local_kaggle_credentials,
    prefect_api_available,
)
from facetrace.tasks.storage import (
    Limits,
    Quarantine,
    inspect_image,
    sha256_hex,
    store_bytes,
)
from facetrace.tasks.store import ArtifactStore, as_store

# Folder names that imply a label (the original project's layout is Real/ and AI/).
LAYOUT_LABELS = {
    "real": "real", "human": "real", "humans": "real", "faces": None,
    "ai": "synthetic", "fake": "synthetic", "synthetic": "synthetic", "generated": "synthetic",
}


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


# Readers are module-level functions and picklable objects, not lambdas: a batch of candidates
# must travel to other processes (Dask workers) intact.
def read_file_bytes(path: bytes) -> bytes:
    return Path(os.fsdecode(path)).read_bytes()


class ZipArchive:
    """A zip archive opened once per process; pickling sends the path only, not the open file."""

    def __init__(self, path: Path, opened: zipfile.ZipFile | None = None) -> None:
        self.path = Path(path)
        self._zip = opened
        self._lock = threading.Lock()

    def read(self, info: zipfile.ZipInfo) -> bytes:
        with self._lock:
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.path)
        return self._zip.read(info)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])


def encode_grey_png(array: Any) -> bytes:
    """A float greyscale array in [0, 1] as lossless PNG bytes."""
    import numpy as np
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.fromarray((np.clip(array, 0, 1) * 255).round().astype("uint8"), "L").save(buffer, "PNG")
    return buffer.getvalue()


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
                        name, file_label, read=functools.partial(read_file_bytes, file_path),
                        size=entry.stat(follow_symlinks=False).st_size,
                        prompt=_prompt_for(name, prompts) if file_label == "synthetic" else None,
                    )
                )
    return listing


def _unsafe_zip_name(name: str) -> bool:
    pure = PurePosixPath(name.replace("\\", "/"))
    return name.startswith(("/", "\\")) or ".." in pure.parts or (len(name) > 1 and name[1] == ":")


def _archive_junk(name: str) -> bool:
    """macOS resource forks and hidden files that archivers add: not the dataset's pictures."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return any(part == "__MACOSX" or (part.startswith(".") and part not in (".", "..")) for part in parts)


def list_zip(path: Path, label: str | None = None, kind: str = "zip", reference: str | None = None,
             provenance_csv: Path | None = None, license: str | None = None,
             details: dict[str, Any] | None = None) -> Listing:
    """Entries of a zip archive, read in memory (nothing is extracted, so a hostile name cannot escape)."""
    archive_path = Path(path)
    if not zipfile.is_zipfile(archive_path):
        raise ValueError(f"{archive_path} is not a readable zip archive")
    prompts = read_provenance_csv(provenance_csv)
    archive = zipfile.ZipFile(archive_path)
    reader = ZipArchive(archive_path, archive)
    with open(archive_path, "rb") as handle:  # streamed: a Kaggle archive can be gigabytes
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    listing = Listing(SourceInfo(kind, reference or str(archive_path.resolve()), license=license,
                                 details={**(details or {}), "sha256": digest, "entries": len(archive.infolist())}))
    for info in archive.infolist():
        if info.is_dir() or _archive_junk(info.filename):
            continue
        name = display_name(info.filename)
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
            Candidate(name, file_label, read=functools.partial(reader.read, info), size=info.file_size,
                      prompt=_prompt_for(name, prompts) if file_label == "synthetic" else None)
        )
    return listing


def list_sample(count: int = 100) -> Listing:
    """scikit-image's bundled LFW subset: its first 100 arrays are faces (25x25 grey), the rest are not."""
    import skimage
    from skimage.data import lfw_subset

    faces = lfw_subset()[: min(count, 100)]
    source = SourceInfo(
        "sample", "skimage.data.lfw_subset",
        license="Labeled Faces in the Wild (UMass Amherst): research use; see http://vis-www.cs.umass.edu/lfw/",
        version=f"scikit-image {skimage.__version__}",
        details={"note": "first 100 entries of lfw_subset (faces), 25x25 greyscale, stored losslessly as PNG"},
    )

    return Listing(source, [Candidate(f"lfw_subset/{i:03d}.png", "real", read=functools.partial(encode_grey_png, face))
                            for i, face in enumerate(faces)])


def kaggle_credentials() -> dict[str, str]:
    """Kaggle credentials from the environment, kaggle.json, or Prefect Secret blocks.

    Raises PermissionError naming the environment variables when there are none, so a missing
    secret is one clear line rather than the client's own exit deep inside a download. Blocks are
    looked up only where a Prefect API exists (see :func:`prefect_api_available`).
    """
    found = local_kaggle_credentials()
    if found is not None:
        return found
    from facetrace.settings import get_settings

    if prefect_api_available(get_settings().data_dir):
        try:
            from prefect.blocks.system import Secret

            return {"KAGGLE_USERNAME": Secret.load("kaggle-username").get(),
                    "KAGGLE_KEY": Secret.load("kaggle-key").get()}
        except Exception:  # noqa: BLE001 - no block: fall through to the clear error below
            pass
    raise PermissionError(KAGGLE_CREDENTIALS_HELP)


def _retry_download(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    """Retry network trouble, not a missing secret or a bad slug: those fail at once, with their message."""
    try:
        state.result()
    except (PermissionError, FileNotFoundError, ValueError, SystemExit):
        return False
    except Exception:  # noqa: BLE001
        return True
    return True


@task(retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_retry_download, timeout_seconds=3600,
      cache_policy=NO_CACHE)
def download_kaggle(slug: str, cache_dir: Path) -> Path:
    """Download a Kaggle dataset archive into the cache (once) with the official client; return the zip.

    The dataset's metadata (title, licenses) is saved beside it as ``dataset-metadata.json``.
    """
    cached = cached_kaggle_archive(slug, cache_dir)
    if cached is not None:
        return cached
    target_dir = kaggle_cache_dir(slug, cache_dir)
    credentials = kaggle_credentials()
    target_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(credentials)
    # Import the API class directly: `import kaggle` authenticates at import time and exits on failure.
    from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    api.authenticate()
    try:
        api.dataset_metadata(slug, path=str(target_dir))
    except Exception as exc:  # noqa: BLE001 - the licence is worth recording, not worth failing for
        get_run_logger().warning("Kaggle metadata of %s unavailable (%s); its licence stays unknown", slug, exc)
    try:
        api.dataset_download_files(slug, path=str(target_dir), unzip=False, quiet=True, force=False)
    except Exception as exc:  # noqa: BLE001 - name what the server said in the user's terms
        raise _kaggle_refusal(slug, exc) or exc
    archive = cached_kaggle_archive(slug, cache_dir)
    if archive is None:
        raise FileNotFoundError(f"Kaggle download of {slug} left no complete zip in {target_dir}")
    return archive


def _kaggle_refusal(slug: str, error: Exception) -> Exception | None:
    """A permanent refusal by the Kaggle API as an error that says what to fix (and is not retried)."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return PermissionError(f"Kaggle refused the credentials for {slug} (HTTP {status}): check KAGGLE_USERNAME "
                               "and KAGGLE_KEY, and that the dataset's terms are accepted on kaggle.com")
    if status == 404:
        return FileNotFoundError(f"Kaggle dataset {slug} not found (HTTP 404)")
    return None


def kaggle_source_details(slug: str, archive: Path) -> tuple[str | None, dict[str, Any]]:
    """(licence, details) of a downloaded Kaggle dataset, from the metadata saved beside its archive."""
    details: dict[str, Any] = {"url": f"https://www.kaggle.com/datasets/{slug}"}
    meta_path = archive.parent / "dataset-metadata.json"
    if not meta_path.is_file():
        return None, details
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if isinstance(meta, dict) and isinstance(meta.get("info"), dict):  # kaggle 2.x saves the whole response
            meta = meta["info"]
    except (OSError, ValueError):
        return None, details
    if not isinstance(meta, dict):
        return None, details
    licenses = [entry.get("name") for entry in meta.get("licenses") or [] if isinstance(entry, dict)]
    details.update({key: meta[key] for key in ("title", "subtitle", "datasetId", "ownerUser") if meta.get(key)})
    return (", ".join(filter(None, licenses)) or None), details


def read_candidate(candidate: Candidate, limits: Limits) -> bytes:
    """The candidate's bytes, or :class:`Quarantine` when it must not or cannot be read."""
    if candidate.refusal:
        raise Quarantine(*candidate.refusal)
    if candidate.label is None:
        raise Quarantine("unknown_label", "pass --label or use a Real/ and AI/ layout")
    if candidate.size is not None and candidate.size > limits.max_file_bytes:
        raise Quarantine("too_large", f"{candidate.size} bytes > cap {limits.max_file_bytes}")
    try:
        return candidate.read()
    except Exception as exc:  # noqa: BLE001 - OSError, a bad zip CRC, an encrypted entry: all the file's
        raise Quarantine("unreadable", f"{type(exc).__name__}: {exc}") from None


def inspect_and_store(candidate: Candidate, data: bytes, sha256: str, store: ArtifactStore | Path, limits: Limits,
                      *, durable: bool = True) -> AcceptedImage:
    """Decode and store one file's bytes under their content address (see :func:`store_bytes`)."""
    record = inspect_image(data, limits, sha256=sha256)
    path = store_bytes(store, record, data, durable=durable)
    return AcceptedImage(candidate.name, candidate.label, path, record, provenance=provenance_of(candidate))


def provenance_of(candidate: Candidate) -> str | None:
    """How much of a synthetic image's making we know at import: its prompt at best, never the generation."""
    if candidate.label != "synthetic":
        return None
    return "partial" if candidate.prompt else "none"


def _catalogued(db_url: str, sha256s: list[str]) -> dict[str, KnownImage]:
    """Digests the catalog already holds; a short read of its own, outside the batch's write."""
    if not sha256s:
        return {}
    with Session(get_engine(db_url)) as session:
        return known_images(session, sha256s)


def _label_conflict(name: str, label: str, other: str, sha256: str, size: int) -> RejectedFile:
    return RejectedFile(name, "label_conflict", f"labelled {label} here, {other}: neither label is trusted; the "
                        "image is quarantined and left out of training", sha256=sha256, size=size)


@task(retries=2, retry_delay_seconds=[1, 5], cache_policy=NO_CACHE)
def ingest_batch(candidates: list[Candidate], source_id: int, store: ArtifactStore | Path, db_url: str,
                 limits: Limits, flow_run_id: str | None = None) -> BatchCounts:
    """Inspect, store and catalogue one batch; the batch's rows commit together, after its objects exist.

    ``store``: the artifact store (or a local data root). An unreachable store fails the batch before
    any of its rows is written (:class:`~facetrace.tasks.store.StoreError`); its retries, or a re-run,
    write the same content addresses again.

    Content the catalog already holds (by sha256) is not decoded again: a re-run costs a read and a
    hash per file. The batch's bytes are held in memory together (at most batch size x file cap).
    """
    store = as_store(store)
    refused: list[RejectedFile] = []
    readable: list[tuple[Candidate, bytes, str]] = []
    for candidate in candidates:
        try:
            data = read_candidate(candidate, limits)
        except Quarantine as q:
            refused.append(RejectedFile(candidate.name, q.reason, q.detail, size=candidate.size))
            continue
        readable.append((candidate, data, sha256_hex(data)))

    known = _catalogued(db_url, [sha for _, _, sha in readable])
    already: list[tuple[str, int]] = []
    accepted: list[AcceptedImage] = []
    outcome: dict[str, AcceptedImage | Quarantine] = {}  # one decode per content within the batch
    # Content seen under both labels (here, or here and in the catalog): its label cannot be trusted,
    # so the conflicting name is a rejection and the image is quarantined (out of every snapshot).
    first_label = {sha: (image.label, f"image {image.id}") for sha, image in known.items()}
    conflicted: set[str] = set()
    for candidate, data, sha in readable:
        label, where = first_label.setdefault(sha, (candidate.label, candidate.name))
        if candidate.label != label:
            refused.append(_label_conflict(candidate.name, candidate.label, f"{label} as {where}", sha, len(data)))
            conflicted.add(sha)
            continue
        if sha in known:
            if not store.exists(known[sha].path):  # a lost object is restored from its source
                store.put_bytes(known[sha].path, data, durable=True)
            already.append((candidate.name, known[sha].id))
            continue
        if sha not in outcome:
            try:
                outcome[sha] = inspect_and_store(candidate, data, sha, store, limits, durable=False)
            except Quarantine as q:
                outcome[sha] = q
        result = outcome[sha]
        if isinstance(result, Quarantine):
            refused.append(RejectedFile(candidate.name, result.reason, result.detail, sha256=sha, size=len(data)))
        else:
            accepted.append(dataclasses.replace(result, original_name=candidate.name, label=candidate.label,
                                                provenance=provenance_of(candidate)))
    if accepted:
        store.sync()  # objects durable in the store before any row that points at them commits

    prompts = {candidate.name: candidate.prompt for candidate in candidates if candidate.prompt}
    with session_scope(get_engine(db_url)) as session:
        prompt_ids: dict[str, int] = {}
        for text in sorted({prompts[image.original_name] for image in accepted if image.original_name in prompts}):
            prompt_ids[text] = import_prompt(session, text, flow_run_id)
        for image in accepted:
            if image.original_name in prompts:
                image.prompt_id = prompt_ids[prompts[image.original_name]]
        new_ids, duplicates, late = add_images(session, source_id, accepted, flow_run_id, already=already)
        for image in late:  # catalogued under the other label by a concurrent batch since the look-up
            refused.append(_label_conflict(image.original_name, image.label, "the other label in the catalog",
                                           image.record.sha256, image.record.bytes))
            conflicted.add(image.record.sha256)
        add_rejections(session, source_id, refused, flow_run_id)
        quarantine_images(session, conflicted)
    return BatchCounts(seen=len(candidates), new=len(new_ids), duplicate=duplicates,
                       rejected=Counter(r.reason for r in refused), new_image_ids=new_ids,
                       rejected_names=[r.original_name for r in refused])
