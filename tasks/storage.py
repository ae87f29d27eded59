"""Safe, content-addressed image storage.

Every file is fully decoded before it is accepted; anything unusable raises :class:`Quarantine`
with a reason code that ends up in the ``rejections`` table. Accepted bytes are stored unchanged
(their sha256 is the catalog key) under ``images/<sha[:2]>/<sha256>.<ext>``, written to a temporary
name and renamed atomically, so a crash never leaves a half file under a real name.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a defect, never silently padded
# Our own pixel limit (Limits.max_image_pixels, checked before any decoding) is stricter than
# Pillow's warning threshold, so its warning is noise; Pillow's hard error (twice its limit) stays on.
# A global filter, not warnings.catch_warnings(), which is not thread-safe under the thread pool.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Formats we catalogue, and the extension each is stored under.
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}

# Reason codes for quarantine records (rejections.reason).
REASONS = {
    "empty": "zero-byte file",
    "too_large": "file larger than the configured cap",
    "not_an_image": "content is not a decodable image",
    "unsupported_format": "image format not accepted",
    "truncated": "image data ends early or is corrupt",
    "decompression_bomb": "declared pixel count exceeds the configured limit",
    "too_small": "image smaller than the configured minimum side",
    "animated": "animated image (more than one frame)",
    "symlink": "symbolic link (not followed)",
    "zip_slip": "archive entry with an unsafe path",
    "unknown_label": "label neither given nor implied by the folder layout",
    "unreadable": "file could not be read",
    "unconvertible": "decoded, but could not be converted to upright RGB",
    "label_conflict": "the same content arrived labelled real and synthetic; neither label is trusted",
}


class Quarantine(Exception):
    """A file that cannot be catalogued, with a reason code from :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail or REASONS[reason]}")
        self.reason = reason
        self.detail = detail or REASONS[reason]


@dataclass(frozen=True)
class ImageRecord:
    """What inspection learned about one image's bytes."""

    sha256: str
    format: str
    mode: str
    width: int
    height: int
    bytes: int
    phash: str
    exif_orientation: int | None
    frames: int

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int = 25 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    min_image_side: int = 16

    @classmethod
    def from_settings(cls) -> Limits:
        from facetrace.settings import get_settings

        s = get_settings()
        return cls(s.max_file_bytes, s.max_image_pixels, s.min_image_side)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file, streamed (model weights can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


EXIF_ORIENTATION = 0x0112
TRANSPOSED = {2, 3, 4, 5, 6, 7, 8}  # EXIF orientations other than "upright"


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB from any mode we accept (CMYK, 16-bit, palette with transparency, grayscale).

    An image that is already upright RGB comes back as itself, not a copy.
    """
    if image.getexif().get(EXIF_ORIENTATION, 1) in TRANSPOSED:
        image = ImageOps.exif_transpose(image)  # only then: it copies even an upright image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: scale to 8 bits instead of clipping everything above 255 to white.
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype("uint8"), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


def perceptual_hash(image: Image.Image) -> str:
    """``str(imagehash.phash(image))``, bit for bit, without its per-bit Python overhead.

    The same steps as imagehash 4.3 (greyscale, LANCZOS to 32x32, 2-D DCT-II with scipy.fftpack,
    the 8x8 lowest frequencies above their median), so stored hashes compare with anyone's
    ``imagehash.phash``; tests/test_ingest_flow.py holds the two to equality. On small images the
    library's median and bit-string formatting cost about as much as the resize.
    """
    import numpy as np
    import scipy.fftpack

    pixels = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS))
    low = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)[:8, :8]
    ordered = np.sort(low, axis=None)
    median = (ordered[31] + ordered[32]) / 2  # numpy.median of 64 values: the mean of the middle two
    return f"{int.from_bytes(np.packbits(low > median).tobytes(), 'big'):016x}"


def inspect_image(data: bytes, limits: Limits = Limits(), sha256: str | None = None) -> ImageRecord:
    """Decode ``data`` completely and describe it, or raise :class:`Quarantine` with the reason.

    ``sha256`` is the digest of ``data`` when the caller has it already (hashing twice costs time).
    """
    if not data:
        raise Quarantine("empty")
    if len(data) > limits.max_file_bytes:
        raise Quarantine("too_large", f"{len(data)} bytes > cap {limits.max_file_bytes}")
    if Image.MAX_IMAGE_PIXELS and limits.max_image_pixels >= 2 * Image.MAX_IMAGE_PIXELS:
        # Pillow refuses at twice its own limit: never below ours (only ever raised, so threads agree).
        Image.MAX_IMAGE_PIXELS = limits.max_image_pixels // 2 + 1
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        head = data[:64].lstrip().lower()
        hint = "looks like HTML" if head.startswith((b"<!doctype html", b"<html")) else "unrecognised content"
        raise Quarantine("not_an_image", hint) from None
    except Image.DecompressionBombError as exc:  # beyond Pillow's own hard limit: quote ours, not Pillow's
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(declared.group(1)):,} pixels" if declared else "more pixels than Pillow opens"
        raise Quarantine("decompression_bomb", f"{size} > the limit of {limits.max_image_pixels:,} "
                         "(FACETRACE_MAX_IMAGE_PIXELS)") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is a property of the file
        raise Quarantine("truncated", f"{type(exc).__name__}: {exc}") from None

    with image:
        if image.format not in EXTENSIONS:
            raise Quarantine("unsupported_format", f"format {image.format}")
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise Quarantine("decompression_bomb", f"{width}x{height} = {width * height:,} pixels > the limit of "
                             f"{limits.max_image_pixels:,} (FACETRACE_MAX_IMAGE_PIXELS)")
        frames = getattr(image, "n_frames", 1)
        if frames > 1 and image.format != "MPO":
            raise Quarantine("animated", f"{frames} frames")
        try:
            image.load()
        except Exception as exc:  # noqa: BLE001
            raise Quarantine("truncated", f"{type(exc).__name__}: {exc}") from None
        try:
            orientation = image.getexif().get(EXIF_ORIENTATION)
            upright = to_rgb(image)
            phash = perceptual_hash(upright)
        except Exception as exc:  # noqa: BLE001 - one odd file must not fail its whole batch
            raise Quarantine("unconvertible", f"{image.mode}: {type(exc).__name__}: {exc}") from None
        if min(upright.size) < limits.min_image_side:
            raise Quarantine("too_small", f"{upright.size[0]}x{upright.size[1]} < {limits.min_image_side} px")
        return ImageRecord(
            sha256=sha256 or sha256_hex(data),
            format=image.format,
            mode=image.mode,
            width=upright.size[0],
            height=upright.size[1],
            bytes=len(data),
            phash=phash,
            exif_orientation=int(orientation) if isinstance(orientation, int) and orientation else None,
            frames=frames,
        )


def relative_path(record: ImageRecord) -> str:
    return f"images/{record.sha256[:2]}/{record.sha256}.{record.extension}"


TEMP_PREFIX = ".tmp-"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def store_bytes(store, record: ImageRecord, data: bytes, *, durable: bool = True) -> str:
    """Write ``data`` under its content address (atomically) and return its key (the path relative
    to the store's root). ``store``: an :class:`~facetrace.tasks.store.ArtifactStore`, or a local data root.

    ``durable=False`` leaves flushing to the caller, who must call the store's ``sync()`` (locally
    :func:`sync_data_root`) before it commits any catalog row that points at the file (one sync per
    batch instead of one per file).
    """
    rel = relative_path(record)
    if not _HEX64.fullmatch(record.sha256):  # the address is the digest: never let a name steer the path
        raise ValueError(f"not a sha256 hex digest: {record.sha256!r}")
    if isinstance(store, (str, os.PathLike)):
        write_atomically(Path(store) / rel, data, durable=durable)
    else:
        store.put_bytes(rel, data, durable=durable)
    return rel


def write_atomically(target: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to a temporary name beside ``target``, then rename it into place.

    No existence check first: writing identical bytes again is harmless (the rename is atomic),
    costs less than verifying them, and repairs a file that a power cut left with other bytes.
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=target.parent)
    except FileNotFoundError:  # the first file under this prefix
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sync_data_root(data_root: Path) -> None:
    """Flush every pending write on the data root's file system to disk (Linux ``syncfs``; else ``sync``).

    Called once per batch, after its files are renamed into place and before its rows commit: the
    catalog never points at bytes that a power cut could still lose.
    """
    root = Path(data_root)
    root.mkdir(parents=True, exist_ok=True)
    syncfs = getattr(_libc(), "syncfs", None)
    if syncfs is not None:
        fd = os.open(root, os.O_RDONLY)
        try:
            if syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    os.sync()


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def sweep_stale_temporaries(data_root: Path, older_than_s: float = 3600.0) -> int:
    """Remove temporary files a killed writer left behind (never a real name); return how many.

    Only old ones: a concurrent ingest's fresh temporary file is still about to be renamed.
    """
    images = Path(data_root) / "images"
    if not images.is_dir():
        return 0
    cutoff, removed = time.time() - older_than_s, 0
    for tmp in images.glob(f"*/{TEMP_PREFIX}*"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed


def open_rgb(path: Path) -> Image.Image:
    """Open a catalogued file as upright RGB (what training and prediction see)."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)
