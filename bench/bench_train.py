"""Training input pipeline and prediction throughput, each against a baseline measured in the same run.

- input pipeline: images/s per epoch after the first, of the project's pipeline (decode once into the
  on-disk tensor cache, then memmap batches + augmentation + prefetch) vs
  ``keras.utils.image_dataset_from_directory`` (decodes and resizes every file every epoch) followed by
  the same augmentation, on the same files at the same size. Target: at least 3x. A second row
  compares both without augmentation.
- training precision: Xception training images/s per epoch (after the first) in Keras'
  ``mixed_bfloat16`` vs float32, on the same tensors; what ``FACETRACE_TRAIN_PRECISION=auto`` relies on.
- prediction: images/s of ``predict_files`` (batched, the `facetrace predict` path) vs the same
  files predicted one call per image.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGES_PER_CLASS = int(os.environ.get("FACETRACE_BENCH_TRAIN_IMAGES", "150"))
IMAGE_SIZE = 96
EPOCHS = 3  # the first builds the cache (project) or warms up (Keras); the rest are timed


def write_images(root: Path, per_class: int) -> list[str]:
    """Real-like JPEGs of assorted sizes and synthetic-like 512x512 PNGs, as in the original data."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for label, folder in (("real", "Real"), ("synthetic", "AI")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (512, 512) if label == "synthetic" else (int(rng.integers(400, 800)), int(rng.integers(500, 900)))
            yy, xx = np.mgrid[0:h, 0:w]
            pixels = 128 + 70 * np.sin(xx / (8.0 + i % 5))[..., None] * np.array([1.0, 0.7, 0.4]) \
                + 40 * np.cos(yy / 11.0)[..., None]
            image = Image.fromarray(np.clip(pixels + rng.normal(0, 12, (h, w, 3)), 0, 255).astype("uint8"))
            path = root / folder / f"{label}-{i:04d}.{'png' if label == 'synthetic' else 'jpg'}"
            image.save(path, **({"quality": 90} if label == "real" else {}))
            paths.append(str(path))
    return paths


def images_per_second(dataset, count: int, epochs: int) -> list[float]:
    rates = []
    for _ in range(epochs):
        started = time.perf_counter()
        seen = 0
        for batch, _labels in dataset:
            seen += int(batch.shape[0])
        assert seen == count, (seen, count)
        rates.append(seen / (time.perf_counter() - started))
    return rates


def training_rate(tensors: np.ndarray, labels: np.ndarray, backbone: str, precision: str, epochs: int = 4) -> float:
    """Training images/s of one backbone at one precision, epochs after the first (graph tracing)."""
    from facetrace.tasks import training

    config = training.TrainConfig(backbone=backbone, precision=precision)
    model = training.build_model(backbone, tensors.shape[1], None, precision=precision)
    training._compile(model, config, 1e-3)
    dataset = training.make_dataset(tensors, labels, batch_size=32, shuffle=True, augment=config.augment,
                                    drop_remainder=True)
    seen = (len(tensors) // 32) * 32
    rates = []
    for _ in range(epochs):
        started = time.perf_counter()
        model.fit(dataset, epochs=1, verbose=0)
        rates.append(seen / (time.perf_counter() - started))
    return float(np.mean(rates[1:]))


def rows(workdir: Path) -> list[dict]:
    from facetrace.tasks import augment, precision, training
    from facetrace.tasks.prediction import predict_files

    training.configure_tensorflow(int(os.environ.get("FACETRACE_TRAIN_THREADS", "2")))
    import keras

    faces = workdir / "faces"
    paths = write_images(faces, IMAGES_PER_CLASS)
    labels = np.array([0.0 if "/Real/" in p else 1.0 for p in paths], np.float32)
    count = len(paths)
    config = training.default_config("mobilenet_v2", image_size=IMAGE_SIZE)

    # The project's pipeline as training runs it (augmentation on), and without augmentation.
    started = time.perf_counter()
    tensors = training.cached_tensors(paths, [str(i) for i in range(count)], config.preprocess,
                                      workdir / "cache" / "train.npy")
    augmented = training.make_dataset(tensors, labels, batch_size=32, shuffle=True, augment=config.augment)
    for _batch in augmented:  # epoch 1: decode into the cache, then one pass
        pass
    first_epoch = count / (time.perf_counter() - started)
    ours = images_per_second(augmented, count, EPOCHS - 1)
    plain = images_per_second(training.make_dataset(tensors, labels, batch_size=32, shuffle=True), count, EPOCHS)

    # The baseline decodes and resizes every file every epoch; with augmentation it runs the very same
    # augmentation function, so the two augmented pipelines differ only in how images are read.
    import tensorflow as tf

    baseline_ds = keras.utils.image_dataset_from_directory(
        faces, labels="inferred", label_mode="binary", image_size=(IMAGE_SIZE, IMAGE_SIZE), batch_size=32,
        shuffle=True, seed=0, verbose=False)
    augmenter = augment.make_augmenter(config.augment, IMAGE_SIZE, seed=0)
    baseline_augmented = baseline_ds.map(lambda x, y: (augmenter(tf.cast(x, tf.uint8)), y),
                                         num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    theirs = images_per_second(baseline_ds, count, EPOCHS)
    theirs_augmented = images_per_second(baseline_augmented, count, EPOCHS)
    ours_steady, plain_steady = float(np.mean(ours)), float(np.mean(plain[1:]))
    theirs_steady, theirs_augmented_steady = float(np.mean(theirs[1:])), float(np.mean(theirs_augmented[1:]))
    print(f"  project pipeline: first epoch (decode + cache) {first_epoch:.0f} images/s; "
          f"Keras baseline epochs {', '.join(f'{r:.0f}' for r in theirs)} images/s", file=sys.stderr)

    # Training precision: bfloat16 vs float32 compute for Xception on the same tensors.
    float32_rate = training_rate(tensors, labels, "xception", "float32")
    bfloat16_rate = training_rate(tensors, labels, "xception", "mixed_bfloat16")
    native = "yes" if precision.cpu_has_bfloat16() else "no"
    # What FACETRACE_TRAIN_PRECISION=auto decides from on this machine (bfloat16 only at >= 1.05x).
    precision.record_precision_probe("xception", float32_rate, bfloat16_rate)
    chosen = precision.resolve_precision("auto", "xception")

    # Prediction: batched files -> probabilities, vs one model call per file.
    model = training.build_model("mobilenet_v2", IMAGE_SIZE, None)
    sample = paths[:: max(1, count // 64)][:64]
    predict_files(model, config.preprocess, 0.5, sample[:4])  # warm-up (graph tracing)
    started = time.perf_counter()
    predict_files(model, config.preprocess, 0.5, sample, batch_size=32)
    batched = len(sample) / (time.perf_counter() - started)
    started = time.perf_counter()
    for path in sample:
        picture = training.prepare_file(path, config.preprocess)[None].astype(np.float32)
        model(picture, training=False)
    single = len(sample) / (time.perf_counter() - started)
    shutil.rmtree(faces, ignore_errors=True)
    return [
        {"name": f"training input pipeline with augmentation, images/s per epoch after the first ({count} files, "
                 f"{IMAGE_SIZE} px; baseline: keras image_dataset_from_directory + the same augmentation)",
         "value": ours_steady, "unit": "images/s", "baseline": theirs_augmented_steady,
         "ratio": ours_steady / theirs_augmented_steady, "target": 3.0},
        {"name": "training input pipeline without augmentation (cached tensors), vs image_dataset_from_directory",
         "value": plain_steady, "unit": "images/s", "baseline": theirs_steady, "ratio": plain_steady / theirs_steady,
         "target": None},
        {"name": f"Xception training, images/s per epoch after the first, mixed_bfloat16 vs float32 "
                 f"({IMAGE_SIZE} px; CPU with native bfloat16: {native}; auto now picks {chosen})",
         "value": bfloat16_rate, "unit": "images/s", "baseline": float32_rate, "ratio": bfloat16_rate / float32_rate,
         "target": None},
        {"name": "predict throughput, batched files (vs one call per image)", "value": batched, "unit": "images/s",
         "baseline": single, "ratio": batched / single, "target": None},
    ]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for row in rows(Path(tmp)):
            print(row)
