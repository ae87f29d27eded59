"""Regenerate a catalogued synthetic image from its catalog rows alone, and compare.

The image's generation row names the model (and its revision/hash), the sampler settings and the
seed; its ``execution`` record names the batch it was made in (members' seeds and prompts, its
position, the CPU thread count). Replaying that batch on a CPU gives the same bytes; on a GPU,
or with another library version, the pixels may differ a little, and the result says by how much.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facetrace.db.engine import get_engine, session_scope
from facetrace.db.generations import generation_for_sha
from facetrace.settings import get_settings
from facetrace.tasks.store import ArtifactStore
from facetrace.tasks.synthesis import (
    TINY,
    GenerationItem,
    ModelChoice,
    SamplingOptions,
    generate_images,
    get_pipeline,
    library_versions,
)
from facetrace.tasks.storage import sha256_hex


class NotGenerated(LookupError):
    """No generation row for that image: it was never generated here (or is not catalogued)."""


@dataclass(frozen=True)
class Replay:
    """Plain values read from the catalog (no ORM objects outlive the session)."""

    sha256: str
    path: str
    model_id: str
    model_revision: str | None
    model_hash: str | None
    device: str
    dtype: str
    safety_checker: str | None
    options: SamplingOptions
    batch: list[GenerationItem]
    position: int
    library_versions: dict[str, Any]


def read_replay(sha256: str) -> Replay:
    """Everything needed to run an image's batch again, from its catalog rows."""
    settings = get_settings()
    with session_scope(get_engine(settings.catalog_url)) as session:
        record = generation_for_sha(session, sha256)
        if record is None:
            raise NotGenerated(f"no generated image with sha256 {sha256} in the catalog {settings.catalog_url}")
        g, image = record.generation, record.image
        execution = g.execution or {}
        ids = execution.get("batch_prompt_ids")
        if ids and all(pid in record.batch_prompts for pid in ids):
            batch = [GenerationItem(index, record.batch_prompts[pid].text, record.batch_prompts[pid].negative_text, seed)
                     for index, seed, pid in zip(execution["batch_items"], execution["batch_seeds"], ids)]
            position = int(execution["batch_position"])
        else:  # no batch record: the image alone (exact only if it was generated alone)
            batch = [GenerationItem(g.item_index, record.prompt.text, record.prompt.negative_text, g.seed)]
            position = 0
        return Replay(
            sha256=image.sha256, path=image.path, model_id=g.model_id, model_revision=g.model_revision,
            model_hash=g.model_hash, device=g.device, dtype=g.dtype, safety_checker=g.safety_checker,
            options=SamplingOptions(g.steps, g.guidance, g.width, g.height, execution.get("torch_threads")),
            batch=batch, position=position, library_versions=dict(g.library_versions or {}),
        )


def pixel_difference(original: bytes, regenerated: bytes) -> tuple[int, float]:
    """(max, mean) absolute difference of 8-bit RGB values; sizes must match."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(original)) as a, Image.open(io.BytesIO(regenerated)) as b:
        x, y = np.asarray(a.convert("RGB"), dtype=np.int16), np.asarray(b.convert("RGB"), dtype=np.int16)
    if x.shape != y.shape:
        raise ValueError(f"regenerated image is {y.shape[1]}x{y.shape[0]}, original {x.shape[1]}x{x.shape[0]}")
    diff = np.abs(x - y)
    return int(diff.max()), float(diff.mean())


def reproduce_image(sha256: str, device: str | None = None) -> dict[str, Any]:
    """Regenerate image ``sha256`` from its catalog rows and compare it with the stored one.

    ``exact_expected`` is true for the tiny pipeline on a CPU: there the sha256 must match."""
    settings = get_settings()
    replay = read_replay(sha256)
    device = device or replay.device
    # Another device than the original gets that device's own dtype (float16 on a CPU would crawl).
    dtype = replay.dtype if device == replay.device else None
    revision = None if replay.model_id == TINY else replay.model_revision
    choice = ModelChoice(replay.model_id, revision, device, dtype, replay.safety_checker not in (None, "none"),
                         str(settings.data_dir / "cache"))
    started = time.perf_counter()
    loaded = get_pipeline(choice)
    regenerated = generate_images(loaded, replay.batch, replay.options)[replay.position]
    duration = time.perf_counter() - started

    store = ArtifactStore.from_settings(settings)
    try:
        stored = store.get_bytes(replay.path)
    except FileNotFoundError:
        stored = None
    max_diff, mean_diff = pixel_difference(stored, regenerated.png) if stored is not None else (None, None)
    new_sha = sha256_hex(regenerated.png)
    versions_now = library_versions(loaded.device)
    changed = sorted(k for k in set(replay.library_versions) | set(versions_now)
                     if replay.library_versions.get(k) != versions_now.get(k))
    return {
        "sha256": replay.sha256,
        "reproduced_sha256": new_sha,
        "match": new_sha == replay.sha256,
        "exact_expected": replay.model_id == TINY and loaded.device.startswith("cpu") and replay.device.startswith("cpu"),
        "max_pixel_difference": max_diff,
        "mean_pixel_difference": mean_diff,
        "model_id": replay.model_id,
        "model_hash_match": loaded.model_hash == replay.model_hash if replay.model_hash else None,
        "device": loaded.device,
        "original_device": replay.device,
        "batch_size": len(replay.batch),
        "batch_position": replay.position,
        "seed": replay.batch[replay.position].seed,
        "library_changes": changed,
        "stored_file": store.url_for(replay.path) if stored is not None else None,
        "duration_s": round(duration, 3),
    }
