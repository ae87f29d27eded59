"""Training: the input pipeline (decode, format-neutral re-encoding, on-disk tensor cache, tf.data;
the augmentation itself is in :mod:`facetrace.tasks.augment`) and the backbones (keras.applications
MobileNetV2 and Xception with a small head).

Format-neutral mode (on by default) is the reason scores here mean something: the original data has
every synthetic face as a 512x512 PNG and every real one as a JPEG of another size, so a model can
separate them by file format alone. Every image, whatever its class, is centre-cropped to a square
and re-encoded through the same JPEG encoder at the same quality and size before a model sees it, in
training, evaluation and prediction alike (:func:`prepare_image` is the one function all three use).

TensorFlow is imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
from PIL import Image
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from facetrace.settings import TrainInput
from facetrace.tasks.augment import make_augmenter, make_cropper
from facetrace.tasks.precision import resolve_precision
from facetrace.tasks.splits import SnapshotSplit
from facetrace.tasks.storage import file_sha256, open_rgb, to_rgb

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class PreprocessConfig:
    """How a file becomes the model's input tensor; stored with every model so prediction matches."""

    image_size: int = 96
    format_neutral: bool = True
    jpeg_quality: int = 90  # the shared re-encoding (format-neutral mode)
    reencode_size: int | None = None  # re-encode at this size, then resize to image_size (None: at image_size)

    def key(self) -> str:
        """A short hash of everything that changes the cached tensors."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation; every knob can be turned off (0 or False)."""

    flip: bool = True
    rotation_degrees: float = 8.0
    zoom: float = 0.1  # random crop of up to this fraction, resized back
    jpeg_probability: float = 0.5  # re-encode again at a random quality in jpeg_quality_range
    jpeg_quality_range: tuple[int, int] = (60, 95)
    blur_probability: float = 0.2
    blur_sigma: float = 1.0

    @property
    def enabled(self) -> bool:
        return bool(self.flip or self.rotation_degrees or self.zoom or self.jpeg_probability or self.blur_probability)


@dataclass(frozen=True)
class TrainConfig:
    backbone: str = "mobilenet_v2"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    dropout: float = 0.2
    patience: int = 10  # early stopping on validation ROC AUC
    warmup_epochs: int = 1
    bn_momentum: float = 0.9  # used when training from random initialisation (see build_model)
    width_multiplier: float = 1.0  # MobileNetV2 alpha
    # Train on random crops of this many pixels of the prepared image and score the whole image (the
    # network is fully convolutional): the model sees texture at the prepared resolution for the cost
    # of crop-sized steps. None: train on whole images.
    crop_size: int | None = None
    # Score each image and its mirror image and average them (prediction, evaluation, the threshold).
    test_time_flip: bool = True
    # What the backbone sees: "pixels" (the image), "residual" (a fixed high-pass of it, RESIDUAL_KERNEL)
    # or "both" (6 channels); layers of the model, so prediction needs nothing more.
    input_filter: str = "pixels"
    fine_tune_epochs: int = 5  # ImageNet weights only: epochs after unfreezing the top layers
    fine_tune_layers: int = 30
    time_budget_s: float | None = None  # stop early (best weights kept) when training runs past this
    # Compute dtype policy: float32 | mixed_bfloat16 | auto (mixed_bfloat16 where the backbone gains
    # from it and the CPU computes bfloat16 natively, else float32). Stored resolved with the model.
    precision: str = "auto"
    seed: int = 0
    # auto: ImageNet, fetched through Keras (mirror, cache) when reachable, else random init with a warning;
    # imagenet: the same but an error when unavailable; none: random init; PATH: that weights file.
    weights: str = "auto"

    def hyperparameters(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_hyperparameters(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        # Models registered before the test-time flip existed were evaluated (and thresholded) without it.
        values.setdefault("test_time_flip", False)
        values.setdefault("precision", "float32")  # and trained in float32
        values["preprocess"] = PreprocessConfig(**values.get("preprocess", {}))
        augment = dict(values.get("augment", {}))
        if "jpeg_quality_range" in augment:
            augment["jpeg_quality_range"] = tuple(augment["jpeg_quality_range"])
        values["augment"] = AugmentConfig(**augment)
        return cls(**values)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    application: str  # keras.applications attribute
    min_size: int
    last_conv: str  # the layer Grad-CAM explains
    weight_file: str  # the no-top ImageNet file name Keras caches (may contain {size} / {alpha})
    default_epochs: int = 30
    # Whether bfloat16 compute may pay (a measurement on the machine decides, see resolve_precision;
    # earlier notes said Xception 1.15x-1.7x, a later full `make bench` 0.93x; MobileNetV2: no gain).
    bfloat16_gain: bool = False


BACKBONES: dict[str, BackboneSpec] = {
    "mobilenet_v2": BackboneSpec(
        "mobilenet_v2", "MobileNetV2", 32, "out_relu",
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{size}_no_top.h5", default_epochs=40),
    "xception": BackboneSpec(
        "xception", "Xception", 71, "block14_sepconv2_act",
        "xception_weights_tf_dim_ordering_tf_kernels_notop.h5", default_epochs=30, bfloat16_gain=True),
}


def default_config(backbone: str, *, image_size: int | None = None, epochs: int | None = None, seed: int = 0,
                   **overrides: Any) -> TrainConfig:
    """The defaults for ``backbone``: input size and re-encoding from the settings, the backbone's epochs."""
    from facetrace.settings import get_settings

    spec = backbone_spec(backbone)
    settings = get_settings()
    size = image_size or settings.image_size
    overrides.setdefault("input_filter", settings.train_input)
    smallest = smallest_input(spec, overrides["input_filter"])
    if size < smallest:
        # Each backbone gets its own input size: one that is too small for it is raised, not refused.
        log.warning("%s needs at least %d px; using %d instead of %d", backbone, smallest, smallest, size)
        size = smallest
    preprocess = PreprocessConfig(image_size=size, format_neutral=settings.format_neutral,
                                  jpeg_quality=settings.reencode_quality, reencode_size=settings.reencode_size)
    overrides.setdefault("precision", settings.train_precision)
    overrides.setdefault("crop_size", _crop_size(settings.train_crop_size, size, spec))
    return TrainConfig(backbone=backbone, preprocess=preprocess,
                       epochs=epochs or spec.default_epochs, seed=seed, **overrides)


def _crop_size(crop: int | None, size: int, spec: BackboneSpec) -> int | None:
    """The training crop for an input of ``size`` px: None when it would not crop at all."""
    if not crop or crop >= size:
        return None
    if crop < spec.min_size:
        log.warning("%s needs crops of at least %d px; using %d instead of %d", spec.name, spec.min_size,
                    spec.min_size, crop)
        crop = spec.min_size
    return crop if crop < size else None


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}") from None


# ---------------------------------------------------------------- the preprocessing function


def centre_square(image: Image.Image) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def jpeg_roundtrip(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality), subsampling=2, optimize=False)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        decoded.load()
        return decoded.convert("RGB")


def prepare_image(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """Upright RGB picture -> the uint8 (size, size, 3) tensor a model sees.

    Format-neutral: centre square, resize, one JPEG re-encoding shared by every class, so neither the
    aspect ratio nor the original container (PNG vs JPEG) survives. Otherwise: a plain square resize.
    """
    image = to_rgb(image)
    size = config.image_size
    resample = Image.Resampling.LANCZOS
    if config.format_neutral:
        image = centre_square(image)
        encode_size = config.reencode_size or size
        image = image.resize((encode_size, encode_size), resample, reducing_gap=2.0)
        image = jpeg_roundtrip(image, config.jpeg_quality)
        if encode_size != size:
            image = image.resize((size, size), resample, reducing_gap=2.0)
    else:
        image = image.resize((size, size), resample, reducing_gap=2.0)
    return np.asarray(image, dtype=np.uint8)


def prepare_file(path: str | os.PathLike, config: PreprocessConfig) -> np.ndarray:
    return prepare_image(open_rgb(Path(path)), config)


def prepare_bytes(data: bytes, config: PreprocessConfig) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return prepare_image(image, config)


# ---------------------------------------------------------------- TensorFlow set-up


def configure_tensorflow(threads: int | None = None) -> None:
    """Quiet logs and bounded thread pools (the CPU is shared); a no-op once TF has started."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(max(1, threads))
        except RuntimeError:  # TF already initialised: its pools are fixed for this process
            pass


# ---------------------------------------------------------------- tensor cache


def _cache_matches(meta_path: Path, shas: Sequence[str], config: PreprocessConfig) -> bool:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("sha256") == list(shas) and meta.get("preprocess") == asdict(config)


def decode_in_parallel(paths: Sequence[str], config: PreprocessConfig, threads: int = 2):
    """Yield prepared uint8 arrays in order; tf.data runs the PIL decoder on ``threads`` workers."""
    import tensorflow as tf

    def load(path: bytes) -> np.ndarray:
        return prepare_file(path.decode(), config)

    size = config.image_size
    dataset = tf.data.Dataset.from_tensor_slices(list(paths)).map(
        lambda p: tf.ensure_shape(tf.numpy_function(load, [p], tf.uint8, stateful=False), (size, size, 3)),
        num_parallel_calls=max(1, threads), deterministic=True,
    )
    yield from dataset.as_numpy_iterator()


def cached_tensors(paths: Sequence[str], shas: Sequence[str], config: PreprocessConfig, file: Path,
                   threads: int = 2) -> np.ndarray:
    """The prepared images as a read-only memmap (N, size, size, 3) uint8, built once per key.

    ``file`` names the cache (callers key it by snapshot, split, size and preprocessing); a sidecar
    JSON lists the sha256 of each row, so a stale or foreign file is rebuilt rather than trusted.
    The file is written under a temporary name and renamed: concurrent builders never see half a cache.
    """
    file = Path(file)
    meta_path = file.with_suffix(".json")
    if file.exists() and _cache_matches(meta_path, shas, config):
        return np.load(file, mmap_mode="r")
    file.parent.mkdir(parents=True, exist_ok=True)
    size = config.image_size
    tmp = file.with_name(f".tmp-{uuid.uuid4().hex}-{file.name}")
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
        for index, tensor in enumerate(decode_in_parallel(paths, config, threads)):
            array[index] = tensor
        array.flush()
        del array
        tmp_meta = meta_path.with_name(f".tmp-{uuid.uuid4().hex}-{meta_path.name}")
        tmp_meta.write_text(json.dumps({"sha256": list(shas), "preprocess": asdict(config)}))
        os.replace(tmp, file)
        os.replace(tmp_meta, meta_path)
    finally:
        tmp.unlink(missing_ok=True)
    return np.load(file, mmap_mode="r")


# ---------------------------------------------------------------- tf.data


def make_dataset(images: np.ndarray, labels: np.ndarray | None, *, batch_size: int, shuffle: bool = False,
                 seed: int = 0, augment: AugmentConfig | None = None, drop_remainder: bool = False,
                 crop: int | None = None):
    """Batches of (float32 pixels 0-255, float32 labels) read from a memmap, augmented, prefetched.

    ``crop``: a random square of that many pixels per image (training on crops), before augmentation.

    Whole batches are gathered from the memmap with one sorted fancy index (sequential disk reads),
    so the cost per epoch after the first is a memory copy, not a JPEG decode.
    """
    import tensorflow as tf

    count = len(images)
    size = images.shape[1]
    targets = np.zeros(count, np.float32) if labels is None else np.asarray(labels, np.float32)

    def gather(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = np.sort(index)
        return np.asarray(images[index]), targets[index]

    dataset = tf.data.Dataset.range(count)
    if shuffle:
        dataset = dataset.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder and count > batch_size)

    def load(index):
        pixels, y = tf.numpy_function(gather, [index], (tf.uint8, tf.float32), stateful=False)
        pixels = tf.ensure_shape(pixels, (None, size, size, 3))
        return pixels, tf.ensure_shape(y, (None,))

    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    if crop and crop < size:
        cropper = make_cropper(crop, seed)
        dataset = dataset.map(lambda x, y: (cropper(x), y), num_parallel_calls=tf.data.AUTOTUNE)
        size = crop
    if augment is not None and augment.enabled:
        augmenter = make_augmenter(augment, size, seed)
        dataset = dataset.map(lambda x, y: (augmenter(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        dataset = dataset.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------- backbones


def keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser() / "models"


def resolve_weights(backbone: str, image_size: int, requested: str = "auto", weights_dir: Path | None = None,
                    alpha: float = 1.0) -> str | None:
    """The weights file to start from, or None (random initialisation, with a warning); see
    :func:`resolve_weights_file`."""
    found = resolve_weights_file(backbone, image_size, requested, weights_dir, alpha)
    return None if found is None else found.path


def resolve_weights_file(backbone: str, image_size: int, requested: str = "auto", weights_dir: Path | None = None,
                         alpha: float = 1.0):
    """A verified :class:`~facetrace.tasks.weights.WeightsFile`, or None for random initialisation.

    ``none``: random. A path: that file. ``auto`` (default) and ``imagenet``: Keras' no-top file from
    ``weights_dir`` or Keras' own cache when there, else fetched through Keras (the mirror setting,
    a short timeout, the hash checked) into the cache under the data root. When it cannot be had,
    ``auto`` warns and starts from random initialisation; ``imagenet`` raises.
    """
    from facetrace.tasks import weights as imagenet

    if requested == "none":
        return None
    if requested not in ("auto", "imagenet"):
        if not Path(requested).is_file():
            raise FileNotFoundError(f"weights file {requested} does not exist")
        return imagenet.WeightsFile(name=Path(requested).name, path=str(requested), sha256=file_sha256(requested),
                                    origin="file", hash_checked=False)
    backbone_spec(backbone)
    name = imagenet.weight_file_name(backbone, image_size, alpha)
    for directory in [d for d in (weights_dir, keras_cache_dir()) if d]:
        candidate = Path(directory) / name
        if candidate.is_file():
            return imagenet.WeightsFile(name=name, path=str(candidate), sha256=file_sha256(candidate),
                                        origin=str(directory), hash_checked=False)
    try:
        return imagenet.fetch_from_settings(backbone, image_size, alpha)
    except imagenet.WeightsUnavailable as exc:
        if requested == "imagenet":
            raise
        reason = str(exc)
    message = (f"no ImageNet weights for {backbone} ({reason}): "
               "training from random initialisation (BatchNormalization momentum lowered, all layers trained)")
    warnings.warn(message, stacklevel=2)
    log.warning(message)
    return None


@contextlib.contextmanager
def dtype_policy(name: str):
    """Layers built inside take this Keras dtype policy (keras.applications build with the default
    one). Keras keeps the default per thread, so fits running side by side do not see each other's."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


# The second-order high-pass of SRM steganalysis (Fridrich & Kodovsky 2012), applied to each channel of
# the [-1, 1] image without padding (borders would be an edge of their own). The gain brings the residual
# of prepared 96 px faces to a standard deviation of about 0.5 (measured: 0.05 before it, in both classes).
RESIDUAL_KERNEL = np.array([[-1, 2, -1], [2, -4, 2], [-1, 2, -1]], dtype=np.float32) / 4.0
RESIDUAL_GAIN = 10.0
INPUT_FILTERS = get_args(TrainInput)
INPUT_LAYERS = ("pixels", "scale", "residual", "crop_pixels", "pixels_and_residual")  # before the backbone


def smallest_input(spec: BackboneSpec, input_filter: str) -> int:
    """The smallest image a backbone takes with this input filter (the high-pass costs 1 px a side)."""
    return spec.min_size + (2 if input_filter != "pixels" else 0)


def build_model(backbone: str, image_size: int, weights: str | None, *, dropout: float = 0.2,
                bn_momentum: float = 0.9, alpha: float = 1.0, any_size: bool = False,
                precision: str = "float32", input_filter: str = "pixels"):
    """Input 0-255 RGB -> backbone -> global average pooling -> dropout -> sigmoid P(synthetic).

    The scaling the backbones expect ([-1, 1]) is a layer of the model, so a saved model takes raw
    pixels and prediction cannot forget it. Without pre-trained weights, BatchNormalization momentum is
    lowered from Keras' 0.999: on a few hundred images the moving statistics otherwise never catch up
    with the weights and the model predicts a constant at evaluation (measured: ROC AUC 0.5 vs 0.96).
    ``any_size``: the input takes any height and width (trained on crops, scored on whole images).
    ``precision``: the layers' dtype policy (saved with them); the output stays float32.
    ``input_filter``: "residual" puts a fixed (non-trainable) high-pass layer before the backbone, so it
    sees noise residuals instead of the picture (1 px less on each side); "both" gives it the picture and
    the residual as 6 channels (pre-trained weights: see :func:`_copy_weights`).
    """
    import keras

    spec = backbone_spec(backbone)
    if image_size < spec.min_size:
        raise ValueError(f"{backbone} needs images of at least {spec.min_size} px, got {image_size}")
    if input_filter not in INPUT_FILTERS:
        raise ValueError(f"unknown input filter {input_filter!r}; expected one of {', '.join(INPUT_FILTERS)}")
    if image_size < smallest_input(spec, input_filter):
        raise ValueError(f"{backbone} with the {input_filter} filter needs images of at least "
                         f"{smallest_input(spec, input_filter)} px, got {image_size}")
    with dtype_policy(resolve_precision(precision, backbone)):
        inputs = keras.Input((None, None, 3) if any_size else (image_size, image_size, 3), name="pixels")
        scaled = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")(inputs)
        if input_filter != "pixels":
            highpass = keras.layers.DepthwiseConv2D(3, padding="valid", use_bias=False, trainable=False,
                                                    name="residual")
            residual = highpass(scaled)
            highpass.set_weights([np.tile(RESIDUAL_KERNEL[:, :, None, None] * RESIDUAL_GAIN, (1, 1, 3, 1))])
            # "both": the picture (1 px a side cropped to match) and its residual, 6 channels.
            scaled = residual if input_filter == "residual" else keras.layers.Concatenate(
                name="pixels_and_residual")([keras.layers.Cropping2D(1, name="crop_pixels")(scaled), residual])
        application = getattr(keras.applications, spec.application)
        kwargs: dict[str, Any] = {"alpha": alpha} if backbone == "mobilenet_v2" else {}
        base = application(include_top=False, weights=None, input_tensor=scaled, **kwargs)
        if weights is not None:
            # A 3-channel twin loads the weights ("imagenet" or a file); a 6-channel stem is widened.
            _copy_weights(application(include_top=False, weights=weights, input_shape=(image_size, image_size, 3),
                                      **kwargs), base)
        elif bn_momentum:
            for layer in base.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.momentum = bn_momentum
        x = keras.layers.GlobalAveragePooling2D(name="pool")(base.output)
        x = keras.layers.Dropout(dropout, name="dropout")(x)
        outputs = keras.layers.Dense(1, activation="sigmoid", name="prediction", dtype="float32")(x)
        model = keras.Model(inputs, outputs, name=f"facetrace_{backbone}")
        model.backbone_layer_names = [layer.name for layer in base.layers if layer.name not in INPUT_LAYERS]
        # The convolution that meets the residual channels: pre-trained, it fine-tunes with the top layers.
        model.stem_layer_names = [] if input_filter != "both" else [next(
            name for name in model.backbone_layer_names if getattr(model.get_layer(name), "kernel", None) is not None)]
        return model


def _copy_weights(reference, base) -> None:
    """Copy ``reference``'s weights into ``base`` layer by layer. A kernel of ``base`` with more input
    channels (the first convolution when it sees the picture and its residual) takes the reference's on
    the picture's channels and zeros on the rest: the model starts as the pre-trained one looking at the
    picture alone, and training decides what the residual adds."""
    for layer in reference.layers:
        values = layer.get_weights()
        if not values:
            continue
        target = base.get_layer(layer.name)
        fitted = []
        for value, current in zip(values, target.get_weights(), strict=True):
            if value.shape != current.shape:
                inflated = np.zeros_like(current)
                inflated[:, :, : value.shape[2], :] = value
                value = inflated
            fitted.append(value)
        target.set_weights(fitted)


# ---------------------------------------------------------------- fit


@dataclass
class TrainedModel:
    backbone: str
    path: str
    sha256: str
    weights: str  # imagenet | file | random
    hyperparameters: dict[str, Any]
    history: dict[str, list[float]]
    epochs_run: int
    best_epoch: int
    seconds: float
    tensorboard: str | None = None
    weights_source: dict[str, Any] | None = None  # the ImageNet (or given) file: name, sha256, origin


def _class_weights(labels: np.ndarray) -> dict[int, float] | None:
    positives = float(labels.sum())
    negatives = float(len(labels) - positives)
    if positives == 0 or negatives == 0:
        return None
    total = positives + negatives
    return {0: total / (2 * negatives), 1: total / (2 * positives)}


def learning_rate_at(step: int, total: int, warmup: int, peak: float, floor: float = 0.01) -> float:
    """Linear warm-up to ``peak``, then cosine decay to ``floor * peak``."""
    if warmup and step < warmup:
        return peak * (0.1 + 0.9 * step / warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _compile(model, config: TrainConfig, learning_rate: float) -> None:
    import keras

    # A plain float learning rate, set per step by a callback: a schedule object would be traced
    # once per variable into the training graph (hundreds of conds, a minute of tracing on 2 cores).
    optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=config.weight_decay)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.BinaryCrossentropy(label_smoothing=config.label_smoothing),
                  metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")])


def recalibrate_batch_norm(model, images: np.ndarray, batch_size: int = 128, limit: int = 1024) -> None:
    """Re-estimate every BatchNormalization layer's moving statistics from clean training images.

    From random initialisation the weights move faster than any moving average can follow, so at
    evaluation the stored statistics describe an older network and the model can collapse to a
    constant. A forward pass in training mode with momentum k/(k+1) for batch k sets them to the
    exact average over the batches ("precise BN"); weights are untouched.
    """
    import keras

    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not layers or len(images) == 0:
        return
    rng = np.random.default_rng(0)
    index = np.sort(rng.permutation(len(images))[:limit])
    saved = [layer.momentum for layer in layers]
    try:
        for k, start in enumerate(range(0, len(index), batch_size)):
            for layer in layers:
                layer.momentum = k / (k + 1)
            model(np.asarray(images[index[start:start + batch_size]], np.float32), training=True)
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum


def _callbacks(config: TrainConfig, validation: bool, tensorboard_dir: Path | None, deadline: float | None,
               calibration_images: np.ndarray | None, schedule: tuple[int, int, float, int]):
    import keras

    total, warmup, peak, epochs = schedule

    class CosineSchedule(keras.callbacks.Callback):
        """Warm-up then cosine decay, per step. Under a time budget the schedule is fitted to the
        time left: once epochs have been timed, the planned epoch count shrinks to what fits before
        the deadline and the cosine is stretched over that, so a budgeted run still ends at a low
        learning rate instead of being cut off at a high one."""

        def __init__(self) -> None:
            super().__init__()
            self.step = 0
            self.total = total
            self.steps_per_epoch = max(1, total // max(1, epochs))
            self.started = None
            self.durations: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.monotonic()

        def on_train_batch_begin(self, batch, logs=None):
            self.model.optimizer.learning_rate = learning_rate_at(self.step, self.total, warmup, peak)
            self.step += 1

        def on_epoch_end(self, epoch, logs=None):
            self.durations.append(time.monotonic() - self.started)
            if deadline is None:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                self.model.stop_training = True
                return
            if len(self.durations) < 2:
                return  # the first epoch includes graph tracing: plan from the later ones
            typical = float(np.median(self.durations[1:]))
            recent = max(self.durations[1:][-3:])  # the slowest of the last epochs: the CPU may be shared
            # Half an epoch is kept back for the final BatchNormalization recalibration and saving
            # (measured: planning on the median alone overran a 660 s budget by 67 s).
            planned = min(epochs, epoch + 1 + int(max(0.0, left - 0.5 * typical) // max(recent, 1e-3)))
            self.total = max(self.step + 1, planned * self.steps_per_epoch)
            if epoch + 1 >= planned:
                self.model.stop_training = True

    class PreciseBatchNorm(keras.callbacks.Callback):
        """Recalibrate BatchNormalization before each validation, so early stopping sees real scores.

        From 256 images: enough for the statistics, and a quarter of the cost of 1,024 (measured on 840
        training images at 96 px: Xception 15 s per recalibration from all of them, 5 s from 256,
        against 34 s for the training epoch itself). The final recalibration uses more."""

        def on_test_begin(self, logs=None):
            recalibrate_batch_norm(self.model, calibration_images, limit=256)

    callbacks: list[Any] = [CosineSchedule()]
    if calibration_images is not None:
        callbacks.insert(0, PreciseBatchNorm())
    if validation:
        # Not before a quarter of the planned epochs: on a small validation split an early epoch can
        # top the ROC AUC by chance, and a network learning from scratch is still far from done then.
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=config.patience,
                                                       restore_best_weights=True, verbose=0,
                                                       start_from_epoch=epochs // 4))
    if tensorboard_dir is not None:
        # Keras' own TensorBoard callback (the `tensorboard` package is installed): train/ and validation/
        # runs with epoch_loss, epoch_auc, epoch_accuracy and epoch_learning_rate; `tensorboard --logdir`
        # on the run's report folder shows them. No graph or profile: they cost time on a shared CPU.
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(tensorboard_dir), histogram_freq=0,
                                                     write_graph=False, profile_batch=0, update_freq="epoch"))
    return callbacks


def fit_model(model, train_images: np.ndarray, train_labels: np.ndarray, val_images: np.ndarray | None,
              val_labels: np.ndarray | None, config: TrainConfig, *, pretrained: bool,
              tensorboard_dir: Path | None = None, verbose: int = 0) -> tuple[dict[str, list[float]], int, int]:
    """Fit in place. Random init: all layers, one phase. Pre-trained: frozen backbone, then top layers.

    Returns (history, epochs run, best epoch). Early stopping watches validation ROC AUC and restores
    the best weights; a time budget, when set, ends training early (keeping the best weights).
    """
    import keras

    train = make_dataset(train_images, train_labels, batch_size=config.batch_size, shuffle=True,
                         seed=config.seed, augment=config.augment, drop_remainder=True, crop=config.crop_size)
    has_val = val_images is not None and len(val_images) > 0 and len(set(np.asarray(val_labels).tolist())) == 2
    val = (make_dataset(val_images, val_labels, batch_size=max(64, config.batch_size))
           if has_val else None)
    steps = max(1, len(train_images) // config.batch_size) if len(train_images) > config.batch_size else 1
    weights = _class_weights(np.asarray(train_labels))
    deadline = time.monotonic() + config.time_budget_s if config.time_budget_s else None
    history: dict[str, list[float]] = {}
    best = {"epoch": 0}
    # Layers trained from scratch need their statistics re-estimated; ImageNet ones stay frozen.
    calibration = None if pretrained else train_images

    def run(epochs: int, learning_rate: float, log_dir: Path | None) -> keras.callbacks.History:
        _compile(model, config, learning_rate)
        schedule = (steps * epochs, steps * config.warmup_epochs, learning_rate, epochs)
        callbacks = _callbacks(config, has_val, log_dir, deadline, calibration, schedule)
        done_before = len(history.get("loss", []))
        result = model.fit(train, validation_data=val, epochs=epochs, class_weight=weights, verbose=verbose,
                           shuffle=False,  # the dataset shuffles itself
                           callbacks=callbacks)
        for key, values in result.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        stopper = next((c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping)), None)
        # The epoch whose weights were kept (early stopping restores it), counted over all phases.
        restored = stopper is not None and stopper.best_weights is not None
        best["epoch"] = done_before + (stopper.best_epoch + 1 if restored else len(result.history.get("loss", [])))
        return result

    if pretrained:
        backbone_layers = set(getattr(model, "backbone_layer_names", []))
        for layer in model.layers:
            if layer.name in backbone_layers:
                layer.trainable = False
        run(config.epochs, config.learning_rate, tensorboard_dir / "frozen" if tensorboard_dir else None)
        if config.fine_tune_epochs > 0 and not (deadline and time.monotonic() > deadline):
            # Unfreeze the top layers; BatchNormalization stays frozen so its ImageNet statistics hold.
            # With the residual as input, the first convolution too: its residual channels start at zero.
            top = [lyr for lyr in model.layers if lyr.name in backbone_layers][-config.fine_tune_layers:]
            stem = [model.get_layer(name) for name in getattr(model, "stem_layer_names", [])]
            for layer in top + stem:
                if not isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = True
            run(config.fine_tune_epochs, config.learning_rate / 10,
                tensorboard_dir / "fine_tune" if tensorboard_dir else None)
    else:
        run(config.epochs, config.learning_rate, tensorboard_dir)
        # Early stopping restored the best epoch's weights with that epoch's statistics; make them exact.
        recalibrate_batch_norm(model, train_images)
    return history, len(history.get("loss", [])), best["epoch"]


def train_backbone(train_images: np.ndarray, train_labels: np.ndarray, val_images: np.ndarray | None,
                   val_labels: np.ndarray | None, config: TrainConfig, out_dir: Path, *,
                   weights_dir: Path | None = None, tensorboard_dir: Path | None = None,
                   threads: int | None = None, verbose: int = 0) -> TrainedModel:
    """Build, fit and save one backbone as ``out_dir/model.keras``; returns what the registry needs."""
    configure_tensorflow(threads)
    import keras

    started = time.perf_counter()
    minimum = backbone_spec(config.backbone).min_size
    if config.crop_size and config.crop_size < minimum:
        raise ValueError(f"{config.backbone} needs crops of at least {minimum} px, got {config.crop_size}")
    keras.utils.set_random_seed(config.seed)
    weights_file = resolve_weights_file(config.backbone, config.preprocess.image_size, config.weights, weights_dir,
                                        config.width_multiplier)
    weights = None if weights_file is None else weights_file.path
    config = dataclasses.replace(config, precision=resolve_precision(config.precision, config.backbone))
    model = build_model(config.backbone, config.preprocess.image_size, weights, dropout=config.dropout,
                        bn_momentum=config.bn_momentum, alpha=config.width_multiplier,
                        any_size=bool(config.crop_size and config.crop_size < config.preprocess.image_size),
                        precision=config.precision, input_filter=config.input_filter)
    history, epochs_run, best_epoch = fit_model(
        model, train_images, train_labels, val_images, val_labels, config, pretrained=weights is not None,
        tensorboard_dir=tensorboard_dir, verbose=verbose)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = save_inference_model(model, out_dir / "model.keras")
    return TrainedModel(
        backbone=config.backbone, path=str(path), sha256=file_sha256(path),
        weights="random" if weights_file is None else ("file" if weights_file.origin == "file" else "imagenet"),
        weights_source=None if weights_file is None else weights_file.as_dict(),
        hyperparameters=config.hyperparameters(), history=history, epochs_run=epochs_run, best_epoch=best_epoch,
        seconds=time.perf_counter() - started, tensorboard=str(tensorboard_dir) if tensorboard_dir else None)


def save_inference_model(model, path: str | os.PathLike) -> Path:
    """Save ``model`` for prediction only: architecture, weights and dtype policies, no optimizer state
    and no compile configuration (AdamW keeps two moments per weight: Xception's file was 250 MB, 166 MB
    of it optimizer state). A fresh, never-compiled clone carries the trained weights to disk."""
    import keras

    # (keras.models.clone_model would compile the clone like the original, optimizer and all.)
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    path = Path(path)
    clone.save(path)
    return path


def load_model(path: str | os.PathLike, expected_sha256: str | None = None):
    """Load a saved detector with Keras safe mode, refusing a file whose sha256 changed.

    ``path``: the model's store key as the catalog holds it (read through this machine's cache), or
    a local absolute path. A changed file raises ValueError (:class:`~facetrace.tasks.store.AlteredObject`).
    """
    from facetrace.tasks.store import artifact_file

    path = artifact_file(path, expected_sha256)
    configure_tensorflow()
    import keras

    return keras.saving.load_model(path, safe_mode=True, compile=False)


def predict_scores(model, images: np.ndarray, batch_size: int = 64, *, flip: bool = False) -> np.ndarray:
    """P(synthetic) for prepared uint8 images (N, size, size, 3); ``flip`` averages each image's score
    with its mirror image's (a face is a face either way round, a model's errors often are not)."""
    if len(images) == 0:
        return np.zeros(0, np.float32)
    if flip:
        return (predict_scores(model, images, batch_size) +
                predict_scores(model, np.ascontiguousarray(np.asarray(images)[:, :, ::-1]), batch_size)) / 2
    dataset = make_dataset(images, None, batch_size=batch_size)
    return np.asarray(model.predict(dataset, verbose=0)).reshape(-1).astype(np.float32)


def score_batch(model, images: np.ndarray, *, flip: bool = False) -> np.ndarray:
    """P(synthetic) for one in-memory batch of prepared uint8 images, as :func:`predict_scores`
    gives it, in one forward pass (with ``flip``, the mirror images ride in the same batch).

    For long-running callers (the API scores thousands of small batches): no tf.data pipeline is
    built per call, whose traced functions pile up in the process (measured: resident memory grew
    31% between 1,000 and 10,000 requests with predict_scores)."""
    count = len(images)
    if count == 0:
        return np.zeros(0, np.float32)
    pixels = np.asarray(images, np.float32)
    if flip:
        pixels = np.concatenate([pixels, pixels[:, :, ::-1]])
    scores = np.asarray(model.predict_on_batch(pixels)).reshape(-1).astype(np.float32)
    return (scores[:count] + scores[count:]) / 2 if flip else scores


class ScoreMemo:
    """Scores already computed, keyed by (model sha256, flip, the exact input tensors).

    Evaluating an ensemble after its members would run every member network a second time on the
    same prepared images (validation, test, each robustness variant); with the memo, the ensemble's
    scores are the mean of its members' remembered ones. Bounded; a miss just computes.
    """

    def __init__(self, limit: int = 64) -> None:
        from collections import OrderedDict

        self.limit = limit
        self._scores: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def scores(self, model, sha256: str, images: np.ndarray, *, flip: bool = False) -> np.ndarray:
        images = np.ascontiguousarray(images)
        key = (sha256, flip, images.shape, hashlib.blake2b(images.data, digest_size=16).hexdigest())
        if key in self._scores:
            self._scores.move_to_end(key)
            return self._scores[key]
        result = predict_scores(model, images, flip=flip)
        self._scores[key] = result
        while len(self._scores) > self.limit:
            self._scores.popitem(last=False)
        return result


SCORES = ScoreMemo()


# ---------------------------------------------------------------- ensemble


ENSEMBLE = "ensemble"


def build_ensemble(members: Sequence, image_size: int):
    """One Keras model whose P(synthetic) is the mean of its members' on the same prepared input.

    The members stay whole inside it (nested models named ``facetrace_<backbone>``), so the saved
    ensemble loads in safe mode like any detector and each member can still be explained on its own.
    """
    import keras

    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    outputs = keras.layers.Average(name="prediction")([member(inputs) for member in members])
    return keras.Model(inputs, outputs, name="facetrace_ensemble")


def save_ensemble(trained: Sequence[TrainedModel], out_dir: Path) -> TrainedModel | None:
    """The mean of several trained backbones as one saved candidate, or None when it cannot be formed.

    Members must share their preprocessing (one prepared input feeds all of them): backbones given
    different input sizes are not combined. Averaging two independently trained networks cancels
    part of each one's errors; the registry then judges the ensemble like any other candidate.
    """
    if len(trained) < 2:
        return None
    configs = [TrainConfig.from_hyperparameters(t.hyperparameters) for t in trained]
    if any(c.preprocess != configs[0].preprocess for c in configs[1:]):
        log.info("no ensemble: the backbones were prepared differently (%s)",
                 ", ".join(f"{c.backbone} {c.preprocess.image_size} px" for c in configs))
        return None
    started = time.perf_counter()
    members = [load_model(t.path, t.sha256) for t in trained]
    model = build_ensemble(members, configs[0].preprocess.image_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.keras"
    model.save(path)
    hyperparameters = {"backbone": ENSEMBLE, "preprocess": asdict(configs[0].preprocess),
                       "test_time_flip": all(c.test_time_flip for c in configs),
                       "members": [{"backbone": t.backbone, "path": t.path, "sha256": t.sha256} for t in trained]}
    return TrainedModel(
        backbone=ENSEMBLE, path=str(path), sha256=file_sha256(path),
        weights="+".join(sorted({t.weights for t in trained})), hyperparameters=hyperparameters, history={},
        epochs_run=max(t.epochs_run for t in trained), best_epoch=0,
        seconds=sum(t.seconds for t in trained) + time.perf_counter() - started)


# ---------------------------------------------------------------- Prefect tasks


@task(name="prepare-tensors", cache_policy=NO_CACHE, retries=1)
def prepare_tensors(split: SnapshotSplit, preprocess: PreprocessConfig, data_dir: Path,
                    threads: int) -> dict[str, str]:
    """Decode, crop, re-encode and resize every image once; cached on disk per snapshot, split and size."""
    from facetrace.tasks.store import ObjectCache, image_paths

    root = Path(data_dir) / "cache" / "tensors" / f"snapshot-{split.snapshot_id}" / \
        f"{preprocess.image_size}px-{preprocess.key()}"
    objects = ObjectCache.from_settings(data_dir=data_dir)
    files = {}
    for part in ("train", "validation", "test"):
        images = split.part(part)
        file = root / f"{part}.npy"
        shas = [i.sha256 for i in images]
        # Images come from the artifact store through the object cache (sha256 checked), only when
        # these tensors are not built yet: a warm tensor cache reads no image at all.
        built = file.exists() and _cache_matches(file.with_suffix(".json"), shas, preprocess)
        cached_tensors([] if built else image_paths(images, objects), shas, preprocess, file, threads=threads)
        files[part] = str(file)
    return files


def load_tensors(files: dict[str, str]) -> dict[str, np.ndarray]:
    """The cached splits as read-only memmaps."""
    return {part: np.load(path, mmap_mode="r") for part, path in files.items()}


@task(name="fit-backbone", cache_policy=NO_CACHE, task_run_name="fit-{config.backbone}")
def fit_backbone(split: SnapshotSplit, config: TrainConfig, tensor_files: dict[str, str], model_dir: Path,
                 tensorboard_dir: Path, weights_dir: Path | None, threads: int,
                 deadline: float | None = None) -> TrainedModel:
    """Train one backbone on a snapshot's cached tensors (one task per backbone; they may run at once).

    ``deadline`` (epoch seconds): the fit's time budget is whatever is left of it when the fit starts,
    so time a fit queued ahead of this one did not use is not lost."""
    if deadline is not None:
        config = dataclasses.replace(config, time_budget_s=max(1.0, deadline - time.time()))
    tensors = load_tensors(tensor_files)
    labels = {part: np.array([i.target for i in split.part(part)], np.float32) for part in tensors}
    get_run_logger().info("training %s on %d images (%d validation) at %d px%s", config.backbone,
                          len(labels["train"]), len(labels["validation"]), config.preprocess.image_size,
                          f", {config.time_budget_s:.0f} s left" if config.time_budget_s else "")
    return train_backbone(tensors["train"], labels["train"], tensors["validation"], labels["validation"], config,
                          model_dir, weights_dir=weights_dir, tensorboard_dir=tensorboard_dir, threads=threads)
