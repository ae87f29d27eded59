"""Validation at scale: the catalog suites on a 100,000-row catalog (target: under 30 s, i.e. at
least 3,333 rows/s), the split-leakage suite on a 100,000-member snapshot, and the file suite
against a bare read-and-hash loop over the same files.

The catalog is synthetic and bulk-inserted (no image files behind its rows); the file benchmark
stores real small PNG files.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from pathlib import Path

import numpy as np

ROWS = 100_000
FILES = 2_000
BUDGET_S = 30.0


def _engine(workdir: Path, name: str):
    from facetrace.db.engine import get_engine

    return get_engine(f"sqlite:///{workdir / name}")


def build_catalog(engine, rows: int = ROWS, seed: int = 0) -> None:
    """A realistic mix, bulk-inserted: 60% real, 25% generated (with prompts and generation rows),
    15% imported synthetic; one sighting per image, 3% rejections, and a 70/15/15 snapshot."""
    from sqlalchemy import insert

    from facetrace.db.models import Generation, Image, Prompt, Rejection, Sighting, Snapshot, SnapshotImage, Source

    rng = np.random.default_rng(seed)
    kinds = rng.choice(np.array(["real", "generated", "imported"]), size=rows, p=[0.6, 0.25, 0.15])
    phashes = rng.integers(0, 2**63, rows, dtype=np.int64)
    with engine.begin() as conn:
        conn.execute(insert(Source), [{"id": 1, "kind": "kaggle", "reference": "bench/real"},
                                      {"id": 2, "kind": "generated", "reference": "tiny"},
                                      {"id": 3, "kind": "folder", "reference": "/bench/ai"}])
        conn.execute(insert(Prompt), [{"id": p, "text": f"a portrait, variation {p}", "method": "template"}
                                      for p in range(1, 1001)])
        images, generations, sightings = [], [], []
        for i in range(rows):
            sha = hashlib.sha256(i.to_bytes(8, "little")).hexdigest()
            kind = kinds[i]
            source = {"real": 1, "generated": 2, "imported": 3}[kind]
            prompt = int(i % 1000) + 1
            images.append({
                "id": i + 1, "sha256": sha, "path": f"images/{sha[:2]}/{sha}.png",
                "label": "real" if kind == "real" else "synthetic", "source_id": source,
                "original_name": f"{i}.png", "format": "PNG" if i % 3 else "JPEG", "mode": "RGB",
                "width": 256, "height": 256, "bytes": 20_000 + i % 5000, "phash": f"{int(phashes[i]):016x}",
                "frames": 1, "dedup_group": sha, "status": "ok",
                "prompt_id": prompt if kind == "imported" and i % 2 else None,
                "provenance": ("partial" if i % 2 else "none") if kind == "imported" else None,
            })
            sightings.append({"source_id": source, "original_name": f"{i}.png", "image_id": i + 1})
            if kind == "generated":
                generations.append({
                    "image_id": i + 1, "prompt_id": prompt, "request_key": "bench", "item_index": i,
                    "model_id": "tiny", "pipeline_class": "StableDiffusionPipeline",
                    "scheduler_class": "PNDMScheduler", "scheduler_config": {}, "steps": 2, "guidance": 7.5,
                    "seed": i, "width": 256, "height": 256, "dtype": "float32", "device": "cpu",
                    "library_versions": {},
                })
        conn.execute(insert(Image), images)
        conn.execute(insert(Generation), generations)
        conn.execute(insert(Sighting), sightings)
        conn.execute(insert(Rejection), [{"source_id": 1, "original_name": f"bad{i}.jpg", "reason": "truncated"}
                                         for i in range(rows * 3 // 100)])
        conn.execute(insert(Snapshot), [{"id": 1, "seed": 0, "image_count": rows, "content_hash": "0" * 64}])
        # Splits follow the prompt group (else the image), so no prompt group straddles a split.
        split_of = np.array(["train"] * 70 + ["validation"] * 15 + ["test"] * 15)
        prompt_of = {g["image_id"]: g["prompt_id"] for g in generations}
        members = [{"snapshot_id": 1, "image_id": row["id"], "group_key": row["sha256"],
                    "split": split_of[(prompt_of.get(row["id"]) or row["prompt_id"] or row["id"]) % 100]}
                   for row in images]
        conn.execute(insert(SnapshotImage), members)


def store_files(data_dir: Path, count: int = FILES):
    """``count`` real 96 px PNG files stored and catalogued the way ingest does."""
    from PIL import Image as PILImage

    from facetrace.db.catalog import AcceptedImage, add_image, ensure_source
    from facetrace.db.engine import session_scope
    from facetrace.tasks.storage import inspect_image, store_bytes

    engine = _engine(data_dir, "files.sqlite")
    rng = np.random.default_rng(1)
    with session_scope(engine) as session:
        source = ensure_source(session, "folder", "/bench/files")
        for i in range(count):
            out = io.BytesIO()
            PILImage.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(out, "PNG")
            data = out.getvalue()
            record = inspect_image(data)
            add_image(session, source, AcceptedImage(f"{i}.png", "real", store_bytes(data_dir, record, data), record))
    return engine


def rows(workdir: Path) -> list[dict]:
    from sqlalchemy import text
    import pandas as pd

    from facetrace.expectations.frames import check_files, load_catalog_frames, split_leakage
    from facetrace.expectations.runner import open_context, validate_frames
    from facetrace.expectations.suites import Thresholds

    thresholds = Thresholds(file_sample=0)
    engine = _engine(workdir, "catalog.sqlite")
    build_catalog(engine)

    # Baseline: only reading the images table into pandas.
    started = time.perf_counter()
    with engine.connect() as conn:
        plain = pd.read_sql(text("SELECT * FROM images"), conn)
    read_s = time.perf_counter() - started
    assert len(plain) == ROWS

    # The catalog and intake suites end to end: load the frames, validate, build the data docs.
    started = time.perf_counter()
    context = open_context(workdir / "validation")
    loaded = load_catalog_frames(engine)
    outcomes, index = validate_frames(context, {"catalog": loaded["images"], "intake": loaded["intake"]},
                                      thresholds)
    catalog_s = time.perf_counter() - started
    assert all(not o.critical_failure for o in outcomes), [(e.description, e.observed)
                                                           for o in outcomes for e in o.failures]
    assert index is not None and index.is_file()

    # Split leakage on a 100k-member snapshot (brute-force near-duplicate search across splits).
    started = time.perf_counter()
    frame = split_leakage(loaded["members"], thresholds.near_duplicate_distance)
    (splits,), _ = validate_frames(context, {"splits": frame}, thresholds, docs=False)
    splits_s = time.perf_counter() - started
    assert splits.success, [(e.description, e.observed) for e in splits.failures]

    # Files: a bare single-threaded read + sha256 loop vs the files suite (read, size, hash, decode).
    data_dir = workdir / "files"
    data_dir.mkdir()
    files_engine = store_files(data_dir)
    with files_engine.connect() as conn:
        images = pd.read_sql(text("SELECT sha256, path, bytes FROM images"), conn)
    started = time.perf_counter()
    for path in images["path"]:
        hashlib.sha256((data_dir / path).read_bytes()).hexdigest()
    bare_s = time.perf_counter() - started
    started = time.perf_counter()
    files_frame = check_files(images, data_dir, sample=0, workers=min(2, os.cpu_count() or 1))
    check_s = time.perf_counter() - started
    (files,), _ = validate_frames(context, {"files": files_frame}, thresholds, docs=False)
    files_s = time.perf_counter() - started
    assert files.success

    target_rate = ROWS / BUDGET_S
    catalog_rate = ROWS / catalog_s
    return [
        {"name": f"validate: catalog+intake suites, {ROWS} rows, with data docs ({catalog_s:.1f} s; "
                 f"budget {BUDGET_S:.0f} s)",
         "value": catalog_rate, "unit": "rows/s", "baseline": target_rate, "ratio": catalog_rate / target_rate,
         "target": 1.0},
        {"name": f"validate: catalog+intake suites vs bare pandas.read_sql of images ({read_s:.2f} s)",
         "value": catalog_rate, "unit": "rows/s", "baseline": ROWS / read_s, "ratio": read_s / catalog_s,
         "target": None},
        {"name": f"validate: splits suite, {ROWS}-member snapshot ({splits_s:.1f} s; budget {BUDGET_S:.0f} s)",
         "value": ROWS / splits_s, "unit": "rows/s", "baseline": target_rate,
         "ratio": (ROWS / splits_s) / target_rate, "target": 1.0},
        {"name": f"validate: files suite (read+hash+decode on 2 threads {check_s:.2f} s, GX "
                 f"{files_s - check_s:.2f} s) vs bare read+hash loop, {FILES} PNG",
         "value": FILES / files_s, "unit": "files/s", "baseline": FILES / bare_s, "ratio": bare_s / files_s,
         "target": None},
    ]
