"""The frames the suites validate, built from the catalog (read-only selects) and from the files on disk.

Group-straddling across splits and file checks are computed here, in plain pandas/numpy, so the
suites stay simple column rules and every function can be tested without Great Expectations.
"""

from __future__ import annotations

import hashlib
import io
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from sqlalchemy import Connection, Engine, func, literal, select, union_all
from sqlalchemy.orm import aliased

from facetrace.db.models import (Generation, Image, Model, Prediction, Prompt, Rejection, Sighting, Snapshot,
                                 SnapshotImage, Source, utcnow)

IMAGE_COLUMNS = ["image_id", "sha256", "path", "label", "format", "mode", "width", "height", "bytes", "phash",
                 "status", "provenance", "source_kind", "prompt_id", "prompt_text", "generation_id"]
# Types an empty result must still carry (pandas infers `object` for columns without rows).
_EMPTY_TYPES = {"image_id": "int64", "width": "int64", "height": "int64", "bytes": "int64", "is_synthetic": "int64"}


def _read(connection: Connection, stmt) -> pd.DataFrame:
    return pd.read_sql(stmt, connection)


def load_images(connection: Connection) -> pd.DataFrame:
    """One row per image, with its source kind and its prompt (from the generation, else the image)."""
    prompt_id = func.coalesce(Generation.prompt_id, Image.prompt_id)
    stmt = (
        select(
            Image.id.label("image_id"), Image.sha256, Image.path, Image.label, Image.format, Image.mode,
            Image.width, Image.height, Image.bytes, Image.phash, Image.status, Image.provenance,
            Source.kind.label("source_kind"), prompt_id.label("prompt_id"),
            # An empty or blank prompt is no prompt.
            func.nullif(func.trim(Prompt.text), "").label("prompt_text"),
            Generation.id.label("generation_id"),
        )
        .join(Source, Source.id == Image.source_id)
        .outerjoin(Generation, Generation.image_id == Image.id)
        .outerjoin(Prompt, Prompt.id == prompt_id)
        .order_by(Image.id)
    )
    frame = _read(connection, stmt)
    frame["is_synthetic"] = (frame["label"] == "synthetic").astype("int64")
    if frame.empty:
        frame = frame.astype({**{c: "str" for c in frame.columns}, **_EMPTY_TYPES})
    return frame


def load_intake(connection: Connection) -> pd.DataFrame:
    """One row per file a source offered: every sighting (accepted, new or duplicate) and every rejection."""
    accepted = select(Sighting.source_id, literal(0).label("rejected"))
    refused = select(Rejection.source_id, literal(1).label("rejected"))
    return _read(connection, union_all(accepted, refused))


def latest_snapshot_id(connection: Connection) -> int | None:
    return connection.scalar(select(func.max(Snapshot.id)))


def load_snapshot_members(connection: Connection, snapshot_id: int) -> pd.DataFrame:
    """The members of one snapshot with what groups them: content, perceptual hash, and the prompts
    of both the image (imports) and its generation, by id and by text."""
    image_prompt, generation_prompt = aliased(Prompt), aliased(Prompt)
    stmt = (
        select(
            SnapshotImage.image_id, SnapshotImage.split, SnapshotImage.group_key, Image.sha256,
            Image.dedup_group, Image.phash, Image.prompt_id.label("image_prompt_id"),
            Generation.prompt_id.label("generation_prompt_id"), image_prompt.text.label("image_prompt_text"),
            generation_prompt.text.label("generation_prompt_text"),
        )
        .join(Image, Image.id == SnapshotImage.image_id)
        .outerjoin(Generation, Generation.image_id == Image.id)
        .outerjoin(image_prompt, image_prompt.id == Image.prompt_id)
        .outerjoin(generation_prompt, generation_prompt.id == Generation.prompt_id)
        .where(SnapshotImage.snapshot_id == snapshot_id)
        .order_by(SnapshotImage.image_id)
    )
    return _read(connection, stmt)


# ---------------------------------------------------------------- split leakage

def phash_bits(phashes: pd.Series) -> np.ndarray:
    """64-bit perceptual hashes (16 hex characters) as unsigned integers."""
    return np.array([int(h, 16) for h in phashes], dtype=np.uint64)


def near_duplicates_across_splits(bits: np.ndarray, splits: np.ndarray, distance: int,
                                  chunk_cells: int = 4_000_000) -> np.ndarray:
    """For each image, how many images in *another* split lie within ``distance`` bits of it.

    Exact and brute force over each pair of splits, in chunks that bound memory (about
    ``chunk_cells`` x 8 bytes): n_train x n_other popcounts, a few seconds for 100k members.
    """
    counts = np.zeros(len(bits), dtype=np.int64)
    names = list(pd.unique(splits))
    for i, left_name in enumerate(names):
        left = np.flatnonzero(splits == left_name)
        for right_name in names[i + 1:]:
            right = np.flatnonzero(splits == right_name)
            right_bits = bits[right]
            step = max(1, chunk_cells // max(1, len(right)))
            for start in range(0, len(left), step):
                rows = left[start:start + step]
                close = np.bitwise_count(bits[rows, None] ^ right_bits[None, :]) <= distance
                counts[rows] += close.sum(axis=1)
                counts[right] += close.sum(axis=0)
    return counts


def normalise_prompts(texts: pd.Series) -> pd.Series:
    """Prompts differing only in case, spacing or trailing full stops are one recipe (the snapshot
    builder's rule, restated here so the check does not trust the code it checks)."""
    return texts.astype("string").str.replace(r"\s+", " ", regex=True).str.strip().str.strip(".").str.lower()


def prompt_group_splits(members: pd.DataFrame) -> pd.Series:
    """Per member, the most splits any of its prompt groups spans (1 when it has no prompt).

    A prompt group is every image sharing a prompt id, or a normalised prompt text, through the
    image or its generation. If each such group sits in one split, so does every chain of them."""
    keys = pd.concat([
        "id:" + members[column].astype("Int64").astype("string")
        for column in ("image_prompt_id", "generation_prompt_id")
    ] + [
        "text:" + normalise_prompts(members[column])
        for column in ("image_prompt_text", "generation_prompt_text")
    ])
    keys = keys[keys.notna() & (keys != "text:")]
    long = pd.DataFrame({"row": keys.index, "key": keys.to_numpy(), "split": members["split"].to_numpy()[keys.index]})
    long["spread"] = long.groupby("key")["split"].transform("nunique")
    spread = long.groupby("row")["spread"].max()
    return spread.reindex(range(len(members)), fill_value=1).astype("int64").set_axis(members.index)


def split_leakage(members: pd.DataFrame, distance: int) -> pd.DataFrame:
    """The splits frame: per member, over how many splits its exact-duplicate group, its prompt
    groups and its snapshot group spread, and how many near-duplicates it has in other splits
    (must be 1, 1, 1 and 0). Pairwise checks suffice: if no edge crosses a split, no chain does."""
    members = members.reset_index(drop=True)
    frame = members[["image_id", "sha256", "split", "group_key"]].copy()
    exact_group = members["dedup_group"].fillna(members["sha256"])
    frame["exact_group_splits"] = members.groupby(exact_group)["split"].transform("nunique").astype("int64")
    frame["prompt_group_splits"] = prompt_group_splits(members)
    frame["snapshot_group_splits"] = members.groupby("group_key")["split"].transform("nunique").astype("int64")
    frame["near_duplicates_across_splits"] = near_duplicates_across_splits(
        phash_bits(members["phash"]), members["split"].to_numpy(), distance)
    return frame


# ---------------------------------------------------------------- files

def check_file(store, path: str, size: int, sha256: str) -> tuple[bool, bool | None, bool | None, bool | None]:
    """(exists, size matches, sha256 matches, decodes) of one object in the artifact store (or under a
    local data root); checks that cannot run are None. Read from the store itself, never a cache."""
    from PIL import Image as PILImage

    from facetrace.tasks.store import as_store

    try:
        data = as_store(store).get_bytes(path)
    except (FileNotFoundError, ValueError):  # missing, or a path that is not a store key
        return False, None, None, None
    except OSError:  # unreadable here; an unreachable store (StoreError) fails the run instead
        return True, None, None, False
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            image.load()  # full decode: a truncated or corrupt file raises here
        decodes = True
    except Exception:  # noqa: BLE001 - any decoder failure means "does not decode"
        decodes = False
    return True, len(data) == size, hashlib.sha256(data).hexdigest() == sha256, decodes


def sample_rows(images: pd.DataFrame, sample: int, seed: int) -> pd.DataFrame:
    """All rows, or ``sample`` of them drawn with ``seed`` when the catalog is larger (0 = all)."""
    if sample <= 0 or len(images) <= sample:
        return images
    return images.sample(n=sample, random_state=seed).sort_index()


def check_files(images: pd.DataFrame, store, *, sample: int = 0, seed: int | None = None,
                workers: int = 2) -> pd.DataFrame:
    """The files frame: one row per checked object of the artifact store (or of a local data root).
    Hashing and decoding release the GIL (and a remote store's reads wait on the network), so a small
    thread pool keeps both cores busy."""
    from facetrace.tasks.store import as_store

    store = as_store(store)
    seed = random.randrange(2**31) if seed is None else seed
    chosen = sample_rows(images, sample, seed)
    args = zip(chosen["path"], chosen["bytes"], chosen["sha256"])
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        checks = list(pool.map(lambda a: check_file(store, *a), args))
    frame = pd.DataFrame(checks, columns=["exists", "size_matches", "sha256_matches", "decodes"], dtype=object)
    frame.insert(0, "path", chosen["path"].to_numpy())
    frame.insert(0, "sha256", chosen["sha256"].to_numpy())
    frame.attrs.update(sample_seed=seed, catalogued=len(images), checked=len(chosen))
    return frame


def test_flag_rate(metrics: dict | None) -> float | None:
    """The share of its test split a model called synthetic at its threshold (from the confusion)."""
    confusion = ((metrics or {}).get("test") or {}).get("confusion") or {}
    total = sum(int(confusion.get(k, 0)) for k in ("tn", "fp", "fn", "tp"))
    return (int(confusion.get("fp", 0)) + int(confusion.get("tp", 0))) / total if total else None


PREDICTION_COLUMNS = ["prediction_id", "model_id", "score", "flagged", "expected_flag_rate", "flag_drift"]


def load_prediction_drift(connection: Connection, window_days: int) -> pd.DataFrame:
    """One row per answer of the served detector in the last ``window_days``: whether it flagged the
    image (1) or not (0), the answering model's flag rate on its test split, and the difference.
    The mean of ``flag_drift`` is how far the share flagged has moved from what the test split
    predicted. Answers of models without a test confusion are left out (nothing to compare with)."""
    import datetime as dt

    since = utcnow() - dt.timedelta(days=window_days)
    rates = {model_id: test_flag_rate(metrics) for model_id, metrics in connection.execute(
        select(Model.id, Model.metrics).where(Model.id.in_(
            select(Prediction.model_id).where(Prediction.created_at >= since).distinct())))}
    frame = _read(connection, select(Prediction.id.label("prediction_id"), Prediction.model_id, Prediction.score,
                                     Prediction.decision).where(Prediction.created_at >= since)
                  .order_by(Prediction.id))
    frame["flagged"] = (frame["decision"] == "synthetic").astype("int64")
    frame["expected_flag_rate"] = frame["model_id"].map(rates).astype("float64")
    frame = frame.dropna(subset=["expected_flag_rate"]).reset_index(drop=True)
    frame["flag_drift"] = frame["flagged"] - frame["expected_flag_rate"]
    return frame[PREDICTION_COLUMNS]


def load_catalog_frames(engine: Engine, prediction_window_days: int = 7) -> dict[str, pd.DataFrame | int | None]:
    """Images, intake, (when a snapshot exists) the latest snapshot's members and the served
    detector's recent answers, in one read transaction."""
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":  # one snapshot for all reads (SQLite's BEGIN already is)
            connection.execution_options(isolation_level="REPEATABLE READ")
        images = load_images(connection)
        intake = load_intake(connection)
        snapshot_id = latest_snapshot_id(connection)
        members = load_snapshot_members(connection, snapshot_id) if snapshot_id is not None else None
        predictions = load_prediction_drift(connection, prediction_window_days)
    return {"images": images, "intake": intake, "snapshot_id": snapshot_id, "members": members,
            "predictions": predictions}
