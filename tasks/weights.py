"""ImageNet weights for the backbones: fetched through Keras' own mechanism, cached under the data root.

``keras.utils.get_file`` fetches the no-top file keras.applications itself uses (same file names,
same origin), checks it against the hash Keras pins where it pins one, and caches it. Three things are
added for a training job that must also run offline:

- a short network timeout, so an unreachable origin costs seconds, not a hung run;
- a mirror (``FACETRACE_WEIGHTS_MIRROR``): a folder or an http(s) base URL holding Keras' file names,
  for air-gapped sites (``facetrace weights fetch`` fills the cache ahead of an offline run);
- a structural check of every file (an HDF5 weights file with layer names), so a truncated download
  from an origin for which Keras pins no hash (MobileNetV2) is refused too.

A file that fails either check is deleted and refused (:class:`WeightsUnavailable`), never loaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from facetrace.tasks.storage import file_sha256

log = logging.getLogger(__name__)

# Where keras.applications fetches its files (keras/src/applications/{mobilenet_v2,xception}.py).
KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/keras-applications/"
ORIGIN_FOLDERS = {"mobilenet_v2": "mobilenet_v2/", "xception": "xception/"}
# The hashes keras.applications passes to get_file (md5); Keras pins none for MobileNetV2's files.
KNOWN_HASHES: dict[str, str] = {
    "xception_weights_tf_dim_ordering_tf_kernels_notop.h5": "b0042744bf5b25fce3cb969f33bebb97",
}
MOBILENET_ROWS = (96, 128, 160, 192, 224)  # the input sizes Keras publishes MobileNetV2 files for


class WeightsUnavailable(RuntimeError):
    """The weights could not be fetched, or what was fetched failed its checks."""


@dataclass(frozen=True)
class WeightsFile:
    """A verified weights file and where it came from (recorded with the model)."""

    name: str
    path: str
    sha256: str
    origin: str
    hash_checked: bool  # against the hash Keras pins for this file

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def weight_file_name(backbone: str, image_size: int, alpha: float = 1.0) -> str:
    """Keras' no-top file name for ``backbone`` (MobileNetV2: the published size nearest the input)."""
    from facetrace.tasks.training import backbone_spec

    rows = image_size if image_size in MOBILENET_ROWS else 224
    return backbone_spec(backbone).weight_file.format(alpha=float(alpha), size=rows)


def origin_url(backbone: str, name: str, mirror: str | None) -> str:
    """Keras' URL for the file, or the file's place in a mirror (a folder or an http(s) base URL)."""
    if not mirror:
        return KERAS_ORIGIN + ORIGIN_FOLDERS[backbone] + name
    if mirror.startswith(("http://", "https://")):
        return mirror.rstrip("/") + "/" + name
    if "://" in mirror:
        raise ValueError(f"weights mirror {mirror!r}: expected a folder or an http(s) base URL")
    return (Path(mirror).expanduser().resolve() / name).as_uri()


def cache_dir(data_dir: str | os.PathLike) -> Path:
    """The weights cache under the data root (Keras' layout: ``<root>/models/<file name>``)."""
    return Path(data_dir) / "cache" / "keras"


_TIMEOUT_LOCK = threading.Lock()


@contextlib.contextmanager
def socket_timeout(seconds: float):
    """Keras' get_file opens its URL without a timeout; the process default bounds it meanwhile.
    Held under a lock: fetches in parallel fits do not restore each other's value early."""
    with _TIMEOUT_LOCK:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(seconds)
        try:
            yield
        finally:
            socket.setdefaulttimeout(previous)


def check_structure(path: Path) -> None:
    """An HDF5 file of Keras layer weights, or ValueError."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            names = handle.attrs.get("layer_names")
            if names is None or len(names) == 0:
                raise ValueError("no layer_names attribute: not a Keras weights file")
            for name in names[-3:]:  # the last layers are read too: a truncated file fails here
                group = handle[name.decode() if isinstance(name, bytes) else name]
                for weight in group.attrs.get("weight_names", []):
                    key = weight.decode() if isinstance(weight, bytes) else weight
                    group[key][()]
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError/KeyError for damaged files
        raise ValueError(f"unreadable weights file ({type(exc).__name__}: {str(exc)[:120]})") from None


def fetch_weights(backbone: str, image_size: int, *, alpha: float = 1.0, mirror: str | None = None,
                  data_dir: str | os.PathLike, timeout_s: float = 10.0) -> WeightsFile:
    """The verified no-top ImageNet file for ``backbone``, from the cache or fetched (then cached).

    Raises :class:`WeightsUnavailable` with a one-line reason when it cannot be had or is damaged.
    """
    import keras

    name = weight_file_name(backbone, image_size, alpha)
    origin = origin_url(backbone, name, mirror)
    expected = KNOWN_HASHES.get(name)
    root = cache_dir(data_dir)
    target = root / "models" / name
    # Keras falls back to /tmp/.keras when the cache folder is not there (yet) to write into.
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with socket_timeout(timeout_s):
            path = Path(keras.utils.get_file(name, origin, file_hash=expected, cache_subdir="models",
                                             cache_dir=str(root.resolve())))
    except Exception as exc:  # noqa: BLE001 - URL errors, timeouts, and Keras' hash mismatch
        if isinstance(exc, ValueError) and "hash" in str(exc):
            target.unlink(missing_ok=True)  # get_file leaves a file that failed its hash in the cache
            raise WeightsUnavailable(f"{name} from {origin} is corrupted: its hash is not Keras' {expected}") from None
        target.unlink(missing_ok=True)
        # Keras words URL errors "URL fetch failure on <origin>: <errno> -- <reason>": keep the reason.
        detail = str(exc).rsplit(" -- ", 1)[-1][:160]
        raise WeightsUnavailable(f"{name} could not be fetched from {origin} ({detail})") from None
    try:
        check_structure(path)
    except ValueError as exc:
        path.unlink(missing_ok=True)
        raise WeightsUnavailable(f"{name} from {origin} is corrupted: {exc}") from None
    return WeightsFile(name=name, path=str(path), sha256=file_sha256(path), origin=origin,
                       hash_checked=expected is not None)


def fetch_from_settings(backbone: str, image_size: int, alpha: float = 1.0) -> WeightsFile:
    """:func:`fetch_weights` with the mirror, timeout and data root of the settings."""
    from facetrace.settings import get_settings

    settings = get_settings()
    return fetch_weights(backbone, image_size, alpha=alpha, mirror=settings.weights_mirror,
                         data_dir=settings.data_dir, timeout_s=settings.weights_timeout_s)
