"""Prediction on files: each path read defensively (missing, empty, oversized, not an image, a
decompression bomb: one-line reasons, never a crash), prepared exactly as in training, scored in batches."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from facetrace.tasks.training import PreprocessConfig, predict_scores, prepare_image


@dataclass
class Prediction:
    path: str
    probability: float | None = None
    decision: str | None = None
    error: str | None = None


def read_for_prediction(path: str | os.PathLike, config: PreprocessConfig, max_bytes: int,
                        max_pixels: int) -> np.ndarray:
    """A file -> the model's input, or ValueError with a one-line reason (missing, not an image, bomb...)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError("no such file" if not path.exists() else "not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise ValueError("empty file")
    if size > max_bytes:
        raise ValueError(f"file larger than {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.size[0] * image.size[1] > max_pixels:
                    raise ValueError(f"{image.size[0]}x{image.size[1]} exceeds {max_pixels} pixels")
                image.load()
                return prepare_image(image, config)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a property of the file
        kind = "not an image" if type(exc).__name__ == "UnidentifiedImageError" else "unreadable image"
        raise ValueError(f"{kind} ({type(exc).__name__}: {str(exc)[:120]})") from None


def predict_files(model, config: PreprocessConfig, threshold: float, paths: Sequence[str], *, batch_size: int = 32,
                  max_bytes: int = 25 * 1024 * 1024, max_pixels: int = 40_000_000,
                  threads: int = 2, flip: bool = False) -> list[Prediction]:
    """P(synthetic) and the decision at ``threshold`` per file, in order; unreadable files get an error."""
    results: list[Prediction] = []
    for start in range(0, len(paths), batch_size):
        chunk = [Prediction(str(p)) for p in paths[start:start + batch_size]]
        pictures, ready = [], []

        def read(item: Prediction):
            try:
                return read_for_prediction(item.path, config, max_bytes, max_pixels)
            except ValueError as exc:
                return exc

        # PIL releases the GIL while decoding and resizing: files are read on a few threads.
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for item, outcome in zip(chunk, pool.map(read, chunk)):
                if isinstance(outcome, ValueError):
                    item.error = str(outcome)
                else:
                    pictures.append(outcome)
                    ready.append(item)
        if pictures:
            scores = predict_scores(model, np.stack(pictures), batch_size=batch_size, flip=flip)
            for item, score in zip(ready, scores):
                item.probability = float(score)
                item.decision = "synthetic" if score >= threshold else "real"
        results.extend(chunk)
    return results
