"""ImageNet weights: fetched through Keras from a mirror, cached, checked; random init when unreachable.

The served files are made here from the same Keras architectures (Keras' file names and HDF5
layout), so the real origin is never contacted (conftest points the mirror at a closed port).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from facetrace.tasks import training, weights

MOBILENET_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5"


def write_keras_weights(path: Path, seed: int = 3):
    """A MobileNetV2 (alpha 0.35) no-top weights file in Keras' legacy HDF5 layout, random weights."""
    import h5py
    import keras
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    keras.utils.set_random_seed(seed)
    reference = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(96, 96, 3), alpha=0.35)
    with h5py.File(path, "w") as handle:
        save_weights_to_hdf5_group(handle, reference)
    return reference


class Mirror:
    """A folder served over HTTP on a free loopback port, counting the requests it answers."""

    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                mirror.requests.append(self.path)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def served(tmp_path, monkeypatch):
    root = tmp_path / "mirror"
    root.mkdir()
    reference = write_keras_weights(root / MOBILENET_FILE)
    monkeypatch.setenv("FACETRACE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))  # nothing pre-cached by Keras itself
    with Mirror(root) as mirror:
        monkeypatch.setenv("FACETRACE_WEIGHTS_MIRROR", mirror.url)
        from facetrace.settings import get_settings

        get_settings(fresh=True)
        yield mirror, root, reference
    get_settings(fresh=True)


def test_auto_fetches_from_the_mirror_caches_under_the_data_root_and_loads_the_served_tensors(served, tmp_path):
    mirror, root, reference = served
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the weights were found
        found = training.resolve_weights_file("mobilenet_v2", 96, "auto", alpha=0.35)
    assert mirror.requests == ["/" + MOBILENET_FILE]
    assert Path(found.path) == tmp_path / "data" / "cache" / "keras" / "models" / MOBILENET_FILE
    assert found.sha256 == hashlib.sha256((root / MOBILENET_FILE).read_bytes()).hexdigest()
    assert found.origin == mirror.url + MOBILENET_FILE

    model = training.build_model("mobilenet_v2", 96, found.path, alpha=0.35)
    for name in ("Conv1", "block_8_depthwise", "Conv_1"):
        for loaded, served_tensor in zip(model.get_layer(name).get_weights(), reference.get_layer(name).get_weights()):
            assert np.array_equal(loaded, served_tensor)

    # Cached: a second resolution does not go back to the mirror (an offline run after a fetch).
    again = training.resolve_weights_file("mobilenet_v2", 96, "auto", alpha=0.35)
    assert again.path == found.path and len(mirror.requests) == 1


def test_training_with_auto_weights_records_them_and_runs_frozen_then_fine_tune(served, tmp_path):
    mirror, root, reference = served
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (16, 96, 96, 3)).astype(np.uint8)
    labels = (np.arange(16) % 2).astype(np.float32)
    config = training.TrainConfig(preprocess=training.PreprocessConfig(image_size=96), epochs=1, batch_size=8,
                                  fine_tune_epochs=1, fine_tune_layers=10, width_multiplier=0.35, precision="float32",
                                  augment=training.AugmentConfig(jpeg_probability=0, blur_probability=0))
    fitted = training.train_backbone(images, labels, images[:8], labels[:8], config, tmp_path / "model")
    assert fitted.weights == "imagenet"
    assert fitted.weights_source["sha256"] == hashlib.sha256((root / MOBILENET_FILE).read_bytes()).hexdigest()
    assert fitted.weights_source["name"] == MOBILENET_FILE
    assert fitted.epochs_run == 2  # one frozen epoch, then one fine-tuning epoch
    saved = training.load_model(fitted.path, fitted.sha256)
    # The first convolution was frozen in both phases: it still holds the served ImageNet tensor.
    assert np.array_equal(saved.get_layer("Conv1").get_weights()[0], reference.get_layer("Conv1").get_weights()[0])


def test_a_file_whose_hash_is_not_keras_pinned_one_is_refused_and_not_kept(served, tmp_path, monkeypatch):
    mirror, root, _ = served
    good = (root / MOBILENET_FILE).read_bytes()
    monkeypatch.setitem(weights.KNOWN_HASHES, MOBILENET_FILE, hashlib.md5(good).hexdigest())
    corrupted = bytearray(good)
    corrupted[len(corrupted) // 2] ^= 0xFF
    (root / MOBILENET_FILE).write_bytes(bytes(corrupted))
    with pytest.raises(weights.WeightsUnavailable, match="corrupted"):
        training.resolve_weights_file("mobilenet_v2", 96, "imagenet", alpha=0.35)
    assert not (tmp_path / "data" / "cache" / "keras" / "models" / MOBILENET_FILE).exists()
    with pytest.warns(UserWarning, match="random initialisation"):
        assert training.resolve_weights_file("mobilenet_v2", 96, "auto", alpha=0.35) is None


def test_a_truncated_file_without_a_pinned_hash_is_refused_by_its_structure(served, tmp_path):
    mirror, root, _ = served
    assert MOBILENET_FILE not in weights.KNOWN_HASHES
    good = (root / MOBILENET_FILE).read_bytes()
    (root / MOBILENET_FILE).write_bytes(good[: len(good) // 2])
    with pytest.raises(weights.WeightsUnavailable, match="corrupted"):
        training.resolve_weights_file("mobilenet_v2", 96, "imagenet", alpha=0.35)
    assert not (tmp_path / "data" / "cache" / "keras" / "models" / MOBILENET_FILE).exists()


def test_an_unreachable_or_silent_mirror_falls_back_to_random_initialisation(tmp_path, monkeypatch):
    from facetrace.settings import get_settings

    monkeypatch.setenv("FACETRACE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    # A closed port (conftest's default) is refused at once.
    get_settings(fresh=True)
    with pytest.warns(UserWarning, match="random initialisation"):
        assert training.resolve_weights("xception", 96, "auto") is None
    # A server that accepts the connection and never answers: the short timeout ends the wait
    # (without it, this test would hang until pytest's own timeout).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("FACETRACE_WEIGHTS_MIRROR", f"http://127.0.0.1:{silent.getsockname()[1]}/")
        monkeypatch.setenv("FACETRACE_WEIGHTS_TIMEOUT_S", "0.5")
        get_settings(fresh=True)
        with pytest.warns(UserWarning, match="could not be fetched.*timed out"):
            assert training.resolve_weights_file("xception", 96, "auto") is None
    with pytest.raises(weights.WeightsUnavailable):
        training.resolve_weights_file("xception", 96, "imagenet")
    assert not list((tmp_path / "data" / "cache" / "keras" / "models").glob("*.h5"))
    get_settings(fresh=True)


def test_a_folder_mirror_and_the_origin_urls_use_keras_file_names(tmp_path):
    assert weights.origin_url("xception", "x.h5", None) == (
        "https://storage.googleapis.com/tensorflow/keras-applications/xception/x.h5")
    assert weights.origin_url("mobilenet_v2", "m.h5", None).endswith("/keras-applications/mobilenet_v2/m.h5")
    assert weights.origin_url("xception", "x.h5", "https://mirror.example/keras/") == "https://mirror.example/keras/x.h5"
    assert weights.origin_url("xception", "x.h5", str(tmp_path)) == (tmp_path / "x.h5").as_uri()
    with pytest.raises(ValueError, match="folder or an http"):
        weights.origin_url("xception", "x.h5", "ftp://somewhere/")
    assert weights.weight_file_name("mobilenet_v2", 100) == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    assert weights.weight_file_name("xception", 96) == "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"
    write_keras_weights(tmp_path / MOBILENET_FILE)
    found = weights.fetch_weights("mobilenet_v2", 96, alpha=0.35, mirror=str(tmp_path), data_dir=tmp_path / "data")
    assert Path(found.path).read_bytes() == (tmp_path / MOBILENET_FILE).read_bytes()


def test_the_weights_verb_prefetches_for_an_offline_run_and_fails_with_a_reason(served, tmp_path, capsys,
                                                                               monkeypatch):
    from facetrace.cli.app import main

    mirror, root, _ = served
    monkeypatch.setitem(training.BACKBONES, "mobilenet_v2", training.dataclasses.replace(
        training.BACKBONES["mobilenet_v2"], weight_file=MOBILENET_FILE))
    assert main(["weights", "fetch", "--backbones", "mobilenet_v2", "--image-size", "96"]) == 0
    assert (tmp_path / "data" / "cache" / "keras" / "models" / MOBILENET_FILE).is_file()
    assert main(["weights", "fetch", "--backbones", "xception"]) == 2  # not on this mirror
    assert "xception" in capsys.readouterr().err
