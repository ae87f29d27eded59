"""Safe, content-addressed image storage.

Every file is fully decoded before it is accepted; anything unusable raises :class:`Quarantine`
with a reason code that ends up in the ``rejections`` table. Accepted bytes are stored unchanged
(their sha256 is the catalog key) under ``images/<sha[:2]>/<sha256>.<ext>``, written to a temporary
name and renamed atomically, so a crash never leaves a half file under a real name.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import imagehash
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a defect, never silently padded

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


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB from any mode we accept (CMYK, 16-bit, palette with transparency, grayscale)."""
    image = ImageOps.exif_transpose(image)
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


def inspect_image(data: bytes, limits: Limits = Limits()) -> ImageRecord:
    """Decode ``data`` completely and describe it, or raise :class:`Quarantine` with the reason."""
    if not data:
        raise Quarantine("empty")
    if len(data) > limits.max_file_bytes:
        raise Quarantine("too_large", f"{len(data)} bytes > cap {limits.max_file_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        head = data[:64].lstrip().lower()
        hint = "looks like HTML" if head.startswith((b"<!doctype html", b"<html")) else "unrecognised content"
        raise Quarantine("not_an_image", hint) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Quarantine("decompression_bomb", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is a property of the file
        raise Quarantine("truncated", f"{type(exc).__name__}: {exc}") from None

    with image:
        if image.format not in EXTENSIONS:
            raise Quarantine("unsupported_format", f"format {image.format}")
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise Quarantine("decompression_bomb", f"{width}x{height} > {limits.max_image_pixels} pixels")
        frames = getattr(image, "n_frames", 1)
        if frames > 1 and image.format != "MPO":
            raise Quarantine("animated", f"{frames} frames")
        try:
            image.load()
        except Exception as exc:  # noqa: BLE001
            raise Quarantine("truncated", f"{type(exc).__name__}: {exc}") from None
        orientation = image.getexif().get(0x0112) if hasattr(image, "getexif") else None
        upright = to_rgb(image)
        if min(upright.size) < limits.min_image_side:
            raise Quarantine("too_small", f"{upright.size[0]}x{upright.size[1]} < {limits.min_image_side} px")
        return ImageRecord(
            sha256=sha256_hex(data),
            format=image.format,
            mode=image.mode,
            width=upright.size[0],
            height=upright.size[1],
            bytes=len(data),
            phash=str(imagehash.phash(upright)),
            exif_orientation=int(orientation) if orientation else None,
            frames=frames,
        )


def relative_path(record: ImageRecord) -> str:
    return f"images/{record.sha256[:2]}/{record.sha256}.{record.extension}"


def store_bytes(data_root: Path, record: ImageRecord, data: bytes) -> str:
    """Write ``data`` under its content address (atomically) and return the path relative to the root."""
    rel = relative_path(record)
    root = Path(data_root).resolve()
    target = (root / rel).resolve()
    if root not in target.parents:  # content addresses are hex, but never trust a join
        raise ValueError(f"refusing to write outside the data root: {target}")
    if target.exists() and target.stat().st_size == len(data):
        return rel
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return rel


def open_rgb(path: Path) -> Image.Image:
    """Open a catalogued file as upright RGB (what training and prediction see)."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)
