"""The input pipeline: format-neutral preprocessing, the tensor cache, tf.data batches and
augmentation, the backbones' set-up without ImageNet weights, and the robustness sets."""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facetrace.tasks import augment as augmentation
from facetrace.tasks import precision, training
from facetrace.tasks.evaluation import (
    binary_metrics,
    build_format_swapped,
    confound_audit,
    expected_calibration_error,
    tpr_at_fpr,
    variant_bytes,
)
from facetrace.tasks.training import PreprocessConfig, cached_tensors, prepare_bytes, prepare_file


def face_like(width: int = 120, height: int = 90, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = 128 + 80 * np.sin(xx / 9.0 + seed)[..., None] * np.array([1.0, 0.6, 0.3]) + 30 * np.cos(yy / 5.0)[..., None]
    return Image.fromarray(np.clip(base + rng.normal(0, 6, (height, width, 3)), 0, 255).astype("uint8"))


def save(image: Image.Image, path: Path, fmt: str, **params) -> Path:
    image.save(path, format=fmt, **params)
    return path


# ---------------------------------------------------------------- format-neutral mode


def test_the_same_picture_as_png_and_as_jpeg_reaches_the_model_through_the_same_reencoding(tmp_path, monkeypatch):
    picture = face_like(160, 100)
    png = save(picture, tmp_path / "face.png", "PNG")
    jpeg = save(picture, tmp_path / "face.jpg", "JPEG", quality=97)
    config = PreprocessConfig(image_size=48, jpeg_quality=85)

    calls = []
    original = training.jpeg_roundtrip

    def spy(image, quality):
        calls.append((image.size, quality))
        return original(image, quality)

    monkeypatch.setattr(training, "jpeg_roundtrip", spy)
    from_png, from_jpeg = prepare_file(png, config), prepare_file(jpeg, config)
    # Both went through exactly one JPEG encoding, at the configured size and quality...
    assert calls == [((48, 48), 85), ((48, 48), 85)]
    assert from_png.shape == from_jpeg.shape == (48, 48, 3) and from_png.dtype == np.uint8
    # ...and what comes out is that re-encoding of the centre square, whatever the container was.
    expected = np.asarray(original(training.centre_square(picture).resize((48, 48), Image.Resampling.LANCZOS,
                                                                         reducing_gap=2.0), 85))
    assert np.array_equal(from_png, expected)
    assert np.abs(from_png.astype(int) - from_jpeg.astype(int)).mean() < 3.0


def test_format_neutral_crops_the_centre_square_so_the_aspect_ratio_leaves_no_trace(tmp_path):
    wide = np.zeros((60, 180, 3), np.uint8)
    wide[:, 60:120] = 200  # the centre square is uniformly bright; the sides are black
    image = Image.fromarray(wide)
    neutral = prepare_bytes(_png(image), PreprocessConfig(image_size=32))
    squashed = prepare_bytes(_png(image), PreprocessConfig(image_size=32, format_neutral=False))
    assert neutral.mean() > 190  # only the centre square survives
    assert squashed.mean() < 100  # the plain resize keeps the black sides


def test_exif_rotation_and_odd_modes_are_handled_by_the_canonical_decoder(tmp_path):
    rgba = Image.new("RGBA", (40, 80), (255, 0, 0, 0))
    grey16 = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    for picture in (rgba, grey16):
        out = prepare_bytes(_png(picture), PreprocessConfig(image_size=24))
        assert out.shape == (24, 24, 3)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- cache and tf.data


def test_tensor_cache_is_built_once_and_rebuilt_when_the_images_change(tmp_path):
    paths = [str(save(face_like(seed=i), tmp_path / f"{i}.png", "PNG")) for i in range(5)]
    config = PreprocessConfig(image_size=32)
    file = tmp_path / "cache" / "train.npy"
    first = cached_tensors(paths, [f"sha{i}" for i in range(5)], config, file)
    assert first.shape == (5, 32, 32, 3)
    assert np.array_equal(first[3], prepare_file(paths[3], config))  # rows in order
    stamp = file.stat().st_mtime_ns
    again = cached_tensors(paths, [f"sha{i}" for i in range(5)], config, file)
    assert file.stat().st_mtime_ns == stamp and np.array_equal(first, again)
    assert json.loads(file.with_suffix(".json").read_text())["sha256"][0] == "sha0"
    changed = cached_tensors(paths[:4], [f"sha{i}" for i in range(4)], config, file)
    assert changed.shape[0] == 4
    assert not list(file.parent.glob(".tmp-*"))


def test_dataset_batches_shuffles_and_augments_within_range():
    images = np.stack([np.full((32, 32, 3), i * 10, np.uint8) for i in range(10)])
    labels = np.arange(10) % 2
    plain = list(training.make_dataset(images, labels, batch_size=4).as_numpy_iterator())
    assert [len(x) for x, _ in plain] == [4, 4, 2]
    assert plain[0][0].dtype == np.float32 and np.array_equal(plain[0][0][1], np.full((32, 32, 3), 10.0))
    augment = training.AugmentConfig(rotation_degrees=10, zoom=0.1, jpeg_probability=1.0, blur_probability=1.0)
    batches = list(training.make_dataset(images, labels, batch_size=4, shuffle=True, augment=augment,
                                         drop_remainder=True).as_numpy_iterator())
    assert len(batches) == 2
    for x, y in batches:
        assert x.shape == (4, 32, 32, 3) and x.min() >= 0 and x.max() <= 255
        # Each image is still (nearly) its flat grey level: augmentation bends, it does not relabel.
        for picture, label in zip(x, y):
            level = picture.mean() / 10
            assert abs(level - round(level)) < 0.3 and int(round(level)) % 2 == int(label)


def test_the_flip_drawn_inside_the_affine_resampling_is_the_exact_mirror_image():
    import tensorflow as tf

    images = np.random.default_rng(3).integers(0, 255, (16, 12, 12, 3)).astype(np.float32)
    generator = tf.random.Generator.from_seed(0)
    # No rotation, no zoom: each output is the image itself or its mirror image, pixel for pixel.
    out = augmentation._random_affine(tf.constant(images), generator, 0.0, 0.0, 12, flip=True).numpy()
    mirrored = [np.allclose(o, i[:, ::-1], atol=1e-3) for o, i in zip(out, images)]
    same = [np.allclose(o, i, atol=1e-3) for o, i in zip(out, images)]
    assert all(m != s for m, s in zip(mirrored, same))  # exactly one of the two, for every image
    assert 0 < sum(mirrored) < len(images)  # both drawn


def test_blur_changes_only_the_images_drawn_for_it():
    images = np.random.default_rng(4).integers(0, 255, (32, 16, 16, 3)).astype(np.uint8)
    augment = augmentation.make_augmenter(training.AugmentConfig(False, 0, 0, 0, (60, 95), 0.5, 1.0), 16, seed=1)
    out = augment(images).numpy()
    untouched = [np.array_equal(o, i.astype(np.float32)) for o, i in zip(out, images)]
    assert 0 < sum(untouched) < len(images)
    blurred = [o for o, same in zip(out, untouched) if not same]
    assert all(o.std() < i.std() for o, i, same in zip(out, images, untouched) if not same) and blurred


def test_crop_training_takes_a_random_window_of_each_image_and_the_model_scores_whole_images(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 255, (12, 64, 64, 3)).astype(np.uint8)
    labels = (np.arange(12) % 2).astype(np.float32)
    windows = list(training.make_dataset(images, labels, batch_size=12, crop=32).as_numpy_iterator())[0][0]
    assert windows.shape == (12, 32, 32, 3)
    for window, source in zip(windows.astype(np.uint8), images):  # no shuffle: rows in order
        found = [(top, left) for top in range(33) for left in range(33)
                 if np.array_equal(source[top:top + 32, left:left + 32], window)]
        assert len(found) == 1
    # Each image draws its own window: twelve copies of one picture give different crops.
    same = np.repeat(images[:1], 12, axis=0)
    crops = list(training.make_dataset(same, labels, batch_size=12, crop=32).as_numpy_iterator())[0][0]
    assert len({crop.tobytes() for crop in crops}) > 1

    config = training.TrainConfig(backbone="mobilenet_v2", preprocess=PreprocessConfig(image_size=64), epochs=1,
                                  batch_size=4, width_multiplier=0.35, crop_size=32)
    fitted = training.train_backbone(images[:8], labels[:8], images[8:], labels[8:], config, tmp_path / "m")
    model = training.load_model(fitted.path, fitted.sha256)
    assert model.input_shape == (None, None, None, 3)  # fully convolutional: crops in training, whole images now
    scores = training.predict_scores(model, images)
    assert scores.shape == (12,) and np.isfinite(scores).all()
    assert training.TrainConfig.from_hyperparameters(fitted.hyperparameters).crop_size == 32
    with pytest.raises(ValueError, match="at least 32 px"):
        training.train_backbone(images[:8], labels[:8], None, None,
                                dataclasses.replace(config, crop_size=16), tmp_path / "small")


def test_the_crop_setting_reaches_each_backbone_raised_to_its_minimum_or_dropped_when_it_would_not_crop(
        monkeypatch, caplog):
    from facetrace.settings import get_settings

    assert training.default_config("mobilenet_v2").crop_size is None  # whole images unless asked
    monkeypatch.setenv("FACETRACE_TRAIN_CROP_SIZE", "48")
    monkeypatch.setenv("FACETRACE_IMAGE_SIZE", "192")
    get_settings(fresh=True)
    try:
        assert training.default_config("mobilenet_v2").crop_size == 48
        with caplog.at_level("WARNING", logger="facetrace.tasks.training"):
            assert training.default_config("xception").crop_size == 71  # Xception's smallest input
        assert "crops of at least 71 px" in caplog.text
        assert training.default_config("mobilenet_v2", image_size=48).crop_size is None  # the whole image
        assert training.default_config("xception", image_size=71).crop_size is None  # raised to 71: no crop
        monkeypatch.setenv("FACETRACE_TRAIN_CROP_SIZE", "0")
        get_settings(fresh=True)
        assert training.default_config("mobilenet_v2").crop_size is None
    finally:
        monkeypatch.delenv("FACETRACE_TRAIN_CROP_SIZE")
        monkeypatch.delenv("FACETRACE_IMAGE_SIZE")
        get_settings(fresh=True)


# ---------------------------------------------------------------- backbones without ImageNet weights


def test_missing_imagenet_weights_warn_and_fall_back_to_random_initialisation(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.warns(UserWarning, match="random initialisation"):
        assert training.resolve_weights("xception", 96, "auto") is None
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "xception_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert training.resolve_weights("xception", 96, "auto", weights) == str(
            weights / "xception_weights_tf_dim_ordering_tf_kernels_notop.h5")
    assert training.resolve_weights("mobilenet_v2", 96, "none") is None
    with pytest.raises(ValueError, match="unknown backbone"):
        training.default_config("resnet")


def test_random_init_lowers_batchnorm_momentum_and_precise_bn_matches_the_data():
    import keras

    model = training.build_model("mobilenet_v2", 32, None, bn_momentum=0.9, alpha=0.35)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(layer.momentum == 0.9 for layer in norms)
    assert model.output_shape == (None, 1)
    first = norms[0]
    images = np.random.default_rng(0).integers(0, 255, (40, 32, 32, 3)).astype(np.uint8)
    training.recalibrate_batch_norm(model, images, batch_size=16)
    # The first BN follows the first convolution: its moving mean is now that layer's mean activation.
    probe = keras.Model(model.input, model.get_layer(first.name).input)
    activations = np.asarray(probe(images.astype(np.float32)))
    assert np.allclose(np.asarray(first.moving_mean), activations.mean(axis=(0, 1, 2)), atol=1e-2)
    assert first.momentum == 0.9  # restored after recalibration


def test_learning_rate_warms_up_then_decays_along_a_cosine():
    rates = [training.learning_rate_at(step, total=100, warmup=10, peak=1e-3) for step in range(101)]
    assert rates[0] == pytest.approx(1e-4) and rates[10] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(rates[:10], rates[1:11]))  # warm-up rises
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))  # then only falls
    assert rates[100] == pytest.approx(1e-5)  # to 1% of the peak


def test_a_short_fit_saves_a_model_that_loads_in_safe_mode_and_refuses_a_changed_file(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (24, 32, 32, 3)).astype(np.uint8)
    labels = (np.arange(24) % 2).astype(np.float32)
    # Three epochs planned, but a budget already spent: the run stops after its first epoch.
    config = training.TrainConfig(backbone="mobilenet_v2", preprocess=PreprocessConfig(image_size=32), epochs=3,
                                  batch_size=8, width_multiplier=0.35, time_budget_s=0.001)
    fitted = training.train_backbone(images[:16], labels[:16], images[16:], labels[16:], config, tmp_path / "m",
                                     tensorboard_dir=tmp_path / "tb")
    assert Path(fitted.path).name == "model.keras" and fitted.weights == "random" and fitted.epochs_run == 1
    # Keras' TensorBoard callback wrote what `tensorboard --logdir tb` reads (TensorBoard's own reader).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {run: EventAccumulator(str(tmp_path / "tb" / run)).Reload() for run in ("train", "validation")}
    scalars = {run: set(acc.Tags()["scalars"]) | set(acc.Tags().get("tensors", [])) for run, acc in runs.items()}
    assert {"epoch_loss", "epoch_auc", "epoch_learning_rate"} <= scalars["train"]
    assert {"epoch_loss", "epoch_auc"} <= scalars["validation"]
    model = training.load_model(fitted.path, fitted.sha256)
    scores = training.predict_scores(model, images[:5])
    assert scores.shape == (5,) and ((0 <= scores) & (scores <= 1)).all()
    # Stored as trained: "auto" precision resolved (MobileNetV2 gains nothing from bfloat16).
    assert training.TrainConfig.from_hyperparameters(fitted.hyperparameters) == dataclasses.replace(
        config, precision="float32")
    Path(fitted.path).write_bytes(Path(fitted.path).read_bytes() + b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        training.load_model(fitted.path, fitted.sha256)


def test_auto_precision_takes_bfloat16_only_where_measured_faster_on_this_machine(tmp_path):
    with_bf16, without = tmp_path / "bf16", tmp_path / "plain"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 fma\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f fma\n")
    assert precision.cpu_has_bfloat16(with_bf16) and not precision.cpu_has_bfloat16(without)
    assert not precision.cpu_has_bfloat16(tmp_path / "absent")
    # Native bfloat16 is not enough: auto takes it only where a measurement here found it faster.
    assert precision.resolve_precision("auto", "xception", native_bfloat16=True, measured_speedup=None) == "float32"
    assert precision.resolve_precision("auto", "xception", native_bfloat16=True, measured_speedup=0.93) == "float32"
    assert precision.resolve_precision("auto", "xception", native_bfloat16=True,
                                      measured_speedup=1.2) == "mixed_bfloat16"
    assert precision.resolve_precision("auto", "xception", native_bfloat16=False, measured_speedup=1.2) == "float32"
    assert precision.resolve_precision("auto", "mobilenet_v2", native_bfloat16=True, measured_speedup=1.2) == "float32"
    # The measurement is cached per machine: another machine's does not count here.
    probe = tmp_path / "probe.json"
    precision.record_precision_probe("xception", 100.0, 93.0, file=probe, fingerprint="machine A")
    precision.record_precision_probe("xception", 100.0, 130.0, file=probe, fingerprint="machine B")
    assert precision.measured_bfloat16_speedup("xception", file=probe, fingerprint="machine A") == pytest.approx(0.93)
    assert precision.measured_bfloat16_speedup("xception", file=probe, fingerprint="machine B") == pytest.approx(1.3)
    assert precision.measured_bfloat16_speedup("xception", file=probe, fingerprint="machine C") is None
    assert precision.measured_bfloat16_speedup("mobilenet_v2", file=probe, fingerprint="machine B") is None
    assert precision.resolve_precision("mixed_bfloat16", "mobilenet_v2") == "mixed_bfloat16"
    with pytest.raises(ValueError, match="precision"):
        precision.resolve_precision("float16", "xception")
    # Models registered before the setting existed were trained in float32.
    assert training.TrainConfig.from_hyperparameters({"backbone": "xception"}).precision == "float32"


def test_a_bfloat16_model_keeps_float32_weights_and_output_and_loads_in_safe_mode(tmp_path):
    import threading

    import keras

    from facetrace.tasks.evaluation import grad_cam

    images = np.random.default_rng(5).integers(0, 255, (16, 32, 32, 3)).astype(np.uint8)
    labels = (np.arange(16) % 2).astype(np.float32)
    config = training.TrainConfig(backbone="mobilenet_v2", preprocess=PreprocessConfig(image_size=32), epochs=1,
                                  batch_size=8, width_multiplier=0.35, precision="mixed_bfloat16")
    built: dict[str, str] = {}

    def fit() -> None:  # in a thread, as the flow's fits run: the policy must not leak to other threads
        built["fitted"] = training.train_backbone(images[:12], labels[:12], images[12:], labels[12:], config,
                                                  tmp_path / "m")
        built["policy_in_thread"] = keras.config.dtype_policy().name

    before = keras.config.dtype_policy().name
    worker = threading.Thread(target=fit)
    worker.start()
    worker.join()
    assert before == "float32" and keras.config.dtype_policy().name == "float32"
    assert built["policy_in_thread"] == "float32"  # restored after the build
    fitted = built["fitted"]
    assert fitted.hyperparameters["precision"] == "mixed_bfloat16"
    model = training.load_model(fitted.path, fitted.sha256)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs and all(layer.compute_dtype == "bfloat16" for layer in convs)
    assert all(w.dtype == "float32" for w in model.trainable_weights)  # mixed: float32 weights
    assert model.get_layer("prediction").compute_dtype == "float32"
    scores = training.predict_scores(model, images[:4], flip=True)
    assert scores.dtype == np.float32 and ((0 <= scores) & (scores <= 1)).all()
    heat = grad_cam(model, images[:2], "out_relu")
    assert heat.shape[0] == 2 and heat.dtype.kind == "f" and 0 <= heat.min() and heat.max() <= 1


def test_the_test_time_flip_averages_each_image_with_its_mirror_image():
    import keras

    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Conv2D(4, 3),
                              keras.layers.Flatten(), keras.layers.Dense(1, activation="sigmoid")])
    images = np.random.default_rng(4).integers(0, 255, (6, 16, 16, 3)).astype(np.uint8)
    plain = training.predict_scores(model, images)
    mirrored = training.predict_scores(model, images[:, :, ::-1].copy())
    assert not np.allclose(plain, mirrored)  # a random network is not mirror-symmetric
    assert np.allclose(training.predict_scores(model, images, flip=True), (plain + mirrored) / 2, atol=1e-6)
    # Models registered before the flip existed keep being scored (and thresholded) without it.
    assert training.TrainConfig.from_hyperparameters({"backbone": "xception"}).test_time_flip is False
    assert training.TrainConfig().test_time_flip is True


def test_score_memo_runs_a_network_once_per_input_and_flip():
    class Counting:
        calls = 0

        def predict(self, dataset, verbose=0):
            Counting.calls += 1
            return np.concatenate([x.numpy().mean(axis=(1, 2, 3)) / 255 for x, _ in dataset])[:, None]

    memo, net = training.ScoreMemo(limit=2), Counting()
    images = np.random.default_rng(0).integers(0, 255, (5, 8, 8, 3)).astype(np.uint8)
    first = memo.scores(net, "sha-a", images)
    assert np.array_equal(memo.scores(net, "sha-a", images.copy()), first) and Counting.calls == 1
    memo.scores(net, "sha-a", images, flip=True)  # another question: computed (image and mirror image)
    assert Counting.calls == 3
    memo.scores(net, "sha-b", images)  # another model: computed; the oldest entry makes room
    memo.scores(net, "sha-a", images)
    assert Counting.calls == 5


def test_an_ensemble_is_the_mean_of_its_members_and_loads_in_safe_mode(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 255, (12, 71, 71, 3)).astype(np.uint8)
    labels = (np.arange(12) % 2).astype(np.float32)
    fitted = []
    for backbone, extra in (("mobilenet_v2", {"width_multiplier": 0.35}), ("xception", {})):
        config = training.TrainConfig(backbone=backbone, preprocess=PreprocessConfig(image_size=71), epochs=1,
                                      batch_size=4, **extra)
        fitted.append(training.train_backbone(images[:8], labels[:8], images[8:], labels[8:], config,
                                              tmp_path / backbone))
    combined = training.save_ensemble(fitted, tmp_path / "ensemble")
    assert combined.backbone == "ensemble" and Path(combined.path).is_file()
    assert [m["backbone"] for m in combined.hyperparameters["members"]] == ["mobilenet_v2", "xception"]
    model = training.load_model(combined.path, combined.sha256)
    nested = [layer.name for layer in model.layers if hasattr(layer, "layers")]
    assert nested == ["facetrace_mobilenet_v2", "facetrace_xception"]  # the evaluation finds members by name
    members = [training.predict_scores(training.load_model(f.path, f.sha256), images) for f in fitted]
    assert np.allclose(training.predict_scores(model, images), np.mean(members, axis=0), atol=1e-5)
    config = training.TrainConfig.from_hyperparameters(combined.hyperparameters)
    assert config.preprocess == PreprocessConfig(image_size=71) and config.test_time_flip
    # Members prepared differently cannot share one input: no ensemble.
    other = training.TrainedModel(**{**fitted[1].__dict__, "hyperparameters": {
        **fitted[1].hyperparameters, "preprocess": {**fitted[1].hyperparameters["preprocess"], "image_size": 96}}})
    assert training.save_ensemble([fitted[0], other], tmp_path / "none") is None
    assert training.save_ensemble(fitted[:1], tmp_path / "one") is None


# ---------------------------------------------------------------- evaluation helpers


def test_format_swapped_set_swaps_the_formats_and_keeps_the_labels(tmp_path):
    real = save(face_like(seed=1), tmp_path / "real.jpg", "JPEG", quality=90)
    fake = save(face_like(seed=2), tmp_path / "fake.png", "PNG")
    written = build_format_swapped([(str(real), "real"), (str(fake), "synthetic")], tmp_path / "swapped")
    assert [(label, fmt) for _, label, fmt in written] == [("real", "PNG"), ("synthetic", "JPEG")]
    for path, label, fmt in written:
        with Image.open(path) as image:
            assert image.format == fmt
            assert image.size == (120, 90)
    # The other robustness variants transform as named.
    with Image.open(io.BytesIO(variant_bytes(fake, "synthetic", "half"))) as half:
        assert half.size == (60, 45) and half.format == "PNG"
    with Image.open(io.BytesIO(variant_bytes(fake, "synthetic", "jpeg50"))) as jpeg:
        assert jpeg.format == "JPEG"


def test_metrics_on_known_scores():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    m = binary_metrics(labels, scores, threshold=0.5)
    assert m["confusion"] == {"tn": 3, "fp": 1, "fn": 1, "tp": 3}
    assert m["accuracy"] == 0.75 and m["precision"] == 0.75 and m["recall"] == 0.75
    assert m["roc_auc"] == pytest.approx(15 / 16)
    assert tpr_at_fpr(labels, scores, 0.0) == 0.75 and tpr_at_fpr(labels, scores, 0.25) == 1.0
    assert expected_calibration_error(np.array([1, 0]), np.array([1.0, 0.0])) == 0.0
    one_class = binary_metrics([1, 1], [0.2, 0.9])
    assert np.isnan(one_class["roc_auc"])


def test_confound_audit_spots_metadata_that_gives_the_label_away():
    from types import SimpleNamespace as Item

    rng = np.random.default_rng(0)
    items = []
    for i in range(120):
        synthetic = i % 2
        if synthetic:  # every synthetic image a 512x512 PNG, as in the original data
            items.append(Item(format="PNG", width=512, height=512, bytes=int(rng.integers(3e5, 5e5)), target=1))
        else:
            w = int(rng.integers(300, 1200))
            items.append(Item(format="JPEG", width=w, height=int(w * 1.3), bytes=int(rng.integers(3e4, 3e5)), target=0))
    audit = confound_audit(items[:80], items[80:])
    assert audit.roc_auc > 0.9 and audit.warns and "WARNING" in audit.message()
    shuffled = [Item(format="JPEG", width=100, height=100, bytes=1000, target=i % 2) for i in range(60)]
    assert not confound_audit(shuffled[:40], shuffled[40:]).warns


def test_a_local_imagenet_style_weights_file_is_loaded_and_the_backbone_is_frozen_then_fine_tuned(tmp_path):
    """Stands in for the real ImageNet file (not downloadable here): same name, same layout."""
    import h5py
    import keras
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    reference = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.35)
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    file = weights_dir / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
    with h5py.File(file, "w") as handle:
        save_weights_to_hdf5_group(handle, reference)
    resolved = training.resolve_weights("mobilenet_v2", 32, "auto", weights_dir, alpha=0.35)
    assert resolved == str(file)
    model = training.build_model("mobilenet_v2", 32, resolved, alpha=0.35)
    first_conv = np.asarray(model.get_layer("Conv1").kernel)
    assert np.array_equal(first_conv, np.asarray(reference.get_layer("Conv1").kernel))
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert all(layer.momentum == 0.999 for layer in norms)  # pre-trained statistics keep Keras' momentum

    rng = np.random.default_rng(2)
    images = rng.integers(0, 255, (16, 32, 32, 3)).astype(np.uint8)
    labels = (np.arange(16) % 2).astype(np.float32)
    config = training.TrainConfig(preprocess=PreprocessConfig(image_size=32), epochs=1, batch_size=8,
                                  fine_tune_epochs=1, fine_tune_layers=10, width_multiplier=0.35)
    head_before = np.asarray(model.get_layer("prediction").kernel).copy()
    history, epochs_run, _ = training.fit_model(model, images, labels, images[:8], labels[:8], config, pretrained=True)
    assert epochs_run == 2  # one frozen epoch, one fine-tuning epoch
    assert np.array_equal(np.asarray(model.get_layer("Conv1").kernel), first_conv)  # never unfrozen
    assert not np.array_equal(np.asarray(model.get_layer("prediction").kernel), head_before)
    top_conv = model.get_layer("Conv_1")  # within the top 10 layers: fine-tuned
    assert top_conv.trainable


def test_the_residual_filter_is_a_fixed_high_pass_saved_with_the_model(tmp_path):
    from scipy.signal import correlate2d

    rng = np.random.default_rng(4)
    images = rng.integers(0, 255, (12, 40, 40, 3)).astype(np.uint8)
    labels = (np.arange(12) % 2).astype(np.float32)
    config = training.TrainConfig(backbone="mobilenet_v2", preprocess=PreprocessConfig(image_size=40), epochs=1,
                                  batch_size=4, width_multiplier=0.35, input_filter="residual")
    fitted = training.train_backbone(images[:8], labels[:8], images[8:], labels[8:], config, tmp_path / "m")
    model = training.load_model(fitted.path, fitted.sha256)
    layer = model.get_layer("residual")
    assert not layer.trainable
    # What the backbone sees: each channel of the [-1, 1] image through the kernel, no padding (40 -> 38 px).
    seen = np.asarray(keras_model_upto(model, "residual")(images[:2].astype(np.float32)))
    scaled = images[:2].astype(np.float64) / 127.5 - 1.0
    expected = np.array([[correlate2d(image[..., c], training.RESIDUAL_KERNEL, mode="valid")
                          for c in range(3)] for image in scaled]).transpose(0, 2, 3, 1) * training.RESIDUAL_GAIN
    assert seen.shape == (2, 38, 38, 3) and np.allclose(seen, expected, atol=1e-4)
    # Fitting left the kernel as built, and a flat picture has no residual: every brightness scores alike.
    flat = np.stack([np.full((40, 40, 3), v, np.uint8) for v in (0, 90, 255)])
    assert np.ptp(training.predict_scores(model, flat)) < 1e-5
    assert training.TrainConfig.from_hyperparameters(fitted.hyperparameters).input_filter == "residual"
    assert training.TrainConfig.from_hyperparameters({}).input_filter == "pixels"  # models from before it
    with pytest.raises(ValueError, match="unknown input filter"):
        training.build_model("mobilenet_v2", 40, None, alpha=0.35, input_filter="sobel")
    with pytest.raises(ValueError, match="residual filter needs images of at least 73 px"):
        training.build_model("xception", 72, None, input_filter="residual")


def test_the_input_setting_reaches_each_backbone_with_room_for_the_filter(monkeypatch, caplog):
    from pydantic import ValidationError

    from facetrace.settings import get_settings

    assert training.default_config("xception").input_filter == "pixels"
    monkeypatch.setenv("FACETRACE_TRAIN_INPUT", "both")
    monkeypatch.setenv("FACETRACE_IMAGE_SIZE", "71")
    get_settings(fresh=True)
    try:
        with caplog.at_level("WARNING", logger="facetrace.tasks.training"):
            config = training.default_config("xception")
        assert config.input_filter == "both" and config.preprocess.image_size == 73  # 71 after the filter
        assert "at least 73 px" in caplog.text
        assert training.default_config("mobilenet_v2", input_filter="pixels").input_filter == "pixels"
        monkeypatch.setenv("FACETRACE_TRAIN_INPUT", "sobel")
        with pytest.raises(ValidationError, match="train_input"):
            get_settings(fresh=True)
    finally:
        monkeypatch.delenv("FACETRACE_TRAIN_INPUT")
        monkeypatch.delenv("FACETRACE_IMAGE_SIZE")
        get_settings(fresh=True)


def test_both_inputs_give_the_backbone_the_picture_and_its_residual_and_start_from_pretrained_weights(tmp_path):
    """With a weights file (ImageNet's layout), the 6-channel stem holds the file's kernel on the picture's
    channels and zeros on the residual's: the backbone starts out as the pre-trained one on the picture."""
    import h5py
    import keras
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    reference = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(40, 40, 3), alpha=0.35)
    file = tmp_path / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
    with h5py.File(file, "w") as handle:
        save_weights_to_hdf5_group(handle, reference)
    model = training.build_model("mobilenet_v2", 40, str(file), alpha=0.35, input_filter="both")
    assert model.get_layer("pixels_and_residual").output.shape[-1] == 6
    stem, original = np.asarray(model.get_layer("Conv1").kernel), np.asarray(reference.get_layer("Conv1").kernel)
    assert stem.shape == (3, 3, 6, 16)
    assert np.array_equal(stem[:, :, :3], original) and not stem[:, :, 3:].any()
    top = model.get_layer("Conv_1").kernel
    assert np.array_equal(np.asarray(top), np.asarray(reference.get_layer("Conv_1").kernel))
    # So its features are the pre-trained features of the picture (the 38 px centre the residual covers).
    images = np.random.default_rng(5).integers(0, 255, (3, 40, 40, 3)).astype(np.float32)
    features = keras_model_upto(model, "out_relu")(images)
    centre = keras.applications.MobileNetV2(include_top=False, weights=str(file), input_shape=(38, 38, 3), alpha=0.35)
    expected = centre(images[:, 1:-1, 1:-1] / 127.5 - 1.0)
    assert np.allclose(np.asarray(features), np.asarray(expected), atol=1e-4)
    # Fine-tuning trains that first convolution too, so the residual's channels can come to matter.
    labels = (np.arange(12) % 2).astype(np.float32)
    config = training.TrainConfig(preprocess=PreprocessConfig(image_size=40), epochs=1, batch_size=4,
                                  fine_tune_epochs=1, fine_tune_layers=5, width_multiplier=0.35)
    pictures = np.random.default_rng(6).integers(0, 255, (12, 40, 40, 3)).astype(np.uint8)
    training.fit_model(model, pictures, labels, pictures[:4], labels[:4], config, pretrained=True)
    assert np.asarray(model.get_layer("Conv1").kernel)[:, :, 3:].any()
    # Without weights it trains and scores like any model, and the residual is a real part of its input.
    config = training.TrainConfig(backbone="mobilenet_v2", preprocess=PreprocessConfig(image_size=40), epochs=1,
                                  batch_size=4, width_multiplier=0.35, input_filter="both")
    fitted = training.train_backbone(pictures[:8], labels[:8], pictures[8:], labels[8:], config, tmp_path / "m")
    loaded = training.load_model(fitted.path, fitted.sha256)
    seen = np.asarray(keras_model_upto(loaded, "pixels_and_residual")(pictures[:2].astype(np.float32)))
    residual = np.asarray(keras_model_upto(loaded, "residual")(pictures[:2].astype(np.float32)))
    assert np.allclose(seen[..., :3], pictures[:2, 1:-1, 1:-1] / 127.5 - 1.0, atol=1e-5)
    assert np.array_equal(seen[..., 3:], residual)
    assert np.isfinite(training.predict_scores(loaded, pictures)).all()


def keras_model_upto(model, name: str):
    import keras

    return keras.Model(model.input, model.get_layer(name).output)


def test_models_are_saved_without_optimizer_state_and_predict_the_same(tmp_path):
    import zipfile

    import h5py

    model = training.build_model("mobilenet_v2", 32, None, alpha=0.35, precision="mixed_bfloat16")
    config = training.TrainConfig(preprocess=PreprocessConfig(image_size=32), batch_size=8, width_multiplier=0.35)
    training._compile(model, config, 1e-3)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 32, 32, 3)).astype(np.float32)
    model.fit(images, (np.arange(8) % 2).astype(np.float32), epochs=1, verbose=0)
    model.save(tmp_path / "full.keras")
    path = training.save_inference_model(model, tmp_path / "model.keras")

    def groups(file):
        with zipfile.ZipFile(file) as archive, archive.open("model.weights.h5") as raw:
            with h5py.File(io.BytesIO(raw.read()), "r") as weights:
                return set(weights.keys())

    assert "optimizer" in groups(tmp_path / "full.keras") and "optimizer" not in groups(path)
    assert path.stat().st_size < 0.6 * (tmp_path / "full.keras").stat().st_size  # AdamW's two moments gone
    loaded = training.load_model(path)
    assert np.array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))
    assert loaded.get_layer("Conv1").dtype_policy.name == "mixed_bfloat16"
