"""Builders for ingest test data: small generated images and a corpus of hostile or unusual files.

Every builder is deterministic (seeded), so a test can predict each file's fate and sha256.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


def noise_image(seed: int, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Image.Image:
    """A distinct image per seed: smooth gradients plus noise, so JPEG sizes stay small but realistic."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    channels = [((xx * rng.uniform(0.5, 3) + yy * rng.uniform(0.5, 3) + rng.integers(0, 255)) % 256)
                for _ in range(3)]
    array = np.stack(channels, axis=-1) + rng.normal(0, 12, (h, w, 3))
    image = Image.fromarray(np.clip(array, 0, 255).astype("uint8"), "RGB")
    return image if mode == "RGB" else image.convert(mode)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, well-formed PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def exif_rotated_jpeg(seed: int = 7, stored: tuple[int, int] = (80, 40), orientation: int = 6) -> bytes:
    """A JPEG stored ``stored`` (w, h) with an EXIF orientation that turns it upright (6: rotate 90 CW)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(noise_image(seed, stored), "JPEG", quality=90, exif=exif.tobytes())


def animated_gif(seed: int = 9) -> bytes:
    frames = [noise_image(seed + i, (40, 40)).convert("P") for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def palette_png_with_transparency(seed: int = 11) -> bytes:
    image = noise_image(seed, (48, 48)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=0)


def sixteen_bit_png(seed: int = 12) -> bytes:
    rng = np.random.default_rng(seed)
    array = (np.linspace(0, 65535, 48 * 48).reshape(48, 48) + rng.normal(0, 300, (48, 48))).clip(0, 65535)
    return encode(Image.fromarray(array.astype("uint16")), "PNG")


HTML_ERROR_PAGE = (b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head>"
                   b"<body><h1>Forbidden</h1><p>Request could not be satisfied.</p></body></html>\n")

NON_UTF8_NAME = b"caf\xe9-latin1.jpg"  # Latin-1 bytes: not decodable as UTF-8


@dataclass(frozen=True)
class Expected:
    """What a corpus file must become: ``reason`` for a rejection, else an accepted image's properties."""

    reason: str | None = None
    mode: str | None = None
    size: tuple[int, int] | None = None  # upright (width, height)
    orientation: int | None = None
    duplicate_of: str | None = None


def build_bad_corpus(root: Path) -> dict[str, Expected]:
    """Write the bad-input corpus under ``root``; return {catalogued name: expected fate}.

    Names are relative to ``root`` as the catalog records them (non-UTF-8 bytes shown as ``\\xNN``).
    """
    root.mkdir(parents=True, exist_ok=True)
    good_jpeg = encode(noise_image(1, (64, 48)), "JPEG", quality=90)
    good_png = encode(noise_image(2, (64, 48)), "PNG")
    files: dict[str, tuple[bytes, Expected]] = {
        "ok.jpg": (good_jpeg, Expected(mode="RGB", size=(64, 48))),
        "ok-copy.jpg": (good_jpeg, Expected(duplicate_of="ok.jpg")),
        "ok.png": (good_png, Expected(mode="RGB", size=(64, 48))),
        "empty.jpg": (b"", Expected("empty")),
        "truncated.jpg": (encode(noise_image(3, (128, 96)), "JPEG", quality=95)[:1500], Expected("truncated")),
        "truncated.png": (encode(noise_image(4, (128, 96)), "PNG")[:2000], Expected("truncated")),
        "notes.jpg": (b"just some text, not a picture\n" * 4, Expected("not_an_image")),
        "error-page.jpg": (HTML_ERROR_PAGE, Expected("not_an_image")),
        "one-pixel.png": (encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), Expected("too_small")),
        "bomb.png": (bomb_png(), Expected("decompression_bomb")),
        "cmyk.jpg": (encode(noise_image(5, (40, 40), "CMYK"), "JPEG", quality=90), Expected(mode="CMYK", size=(40, 40))),
        "sixteen-bit.png": (sixteen_bit_png(), Expected(mode="I;16", size=(48, 48))),
        "palette-transparent.png": (palette_png_with_transparency(), Expected(mode="P", size=(48, 48))),
        "grey.png": (encode(noise_image(13, (40, 32), "L"), "PNG"), Expected(mode="L", size=(40, 32))),
        "animated.gif": (animated_gif(), Expected("animated")),
        "rotated.jpg": (exif_rotated_jpeg(), Expected(mode="RGB", size=(40, 80), orientation=6)),
    }
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    expected = {name: fate for name, (_, fate) in files.items()}

    os.symlink(root / "ok.png", root / "link.png")
    expected["link.png"] = Expected("symlink")

    weird = os.path.join(os.fsencode(root), NON_UTF8_NAME)
    with open(weird, "wb") as handle:
        handle.write(encode(noise_image(14, (50, 50)), "JPEG", quality=90))
    expected[NON_UTF8_NAME.decode("utf-8", errors="backslashreplace")] = Expected(mode="RGB", size=(50, 50))
    return expected


def build_slip_zip(path: Path) -> dict[str, Expected]:
    """A zip with two good images under ``Humans/`` and two zip-slip entries (``../`` and absolute)."""
    entries = {
        "Humans/1 (1).jpg": (encode(noise_image(21, (64, 64)), "JPEG", quality=90), Expected(mode="RGB", size=(64, 64))),
        "Humans/1 (2).png": (encode(noise_image(22, (64, 64)), "PNG"), Expected(mode="RGB", size=(64, 64))),
        "../escaped.jpg": (encode(noise_image(23, (32, 32)), "JPEG"), Expected("zip_slip")),
        "/tmp/facetrace-absolute.jpg": (encode(noise_image(24, (32, 32)), "JPEG"), Expected("zip_slip")),
    }
    with zipfile.ZipFile(path, "w") as archive:
        for name, (data, _) in entries.items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return {name: fate for name, (_, fate) in entries.items()}


def write_image_tree(root: Path, count: int, *, start: int = 0, size: tuple[int, int] = (64, 64),
                     png_every: int = 4) -> list[Path]:
    """``count`` distinct small images (mostly JPEG, every ``png_every``-th PNG) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        image = noise_image(1000 + i, size)
        if png_every and i % png_every == 0:
            path = root / f"face_{i:05d}.png"
            path.write_bytes(encode(image, "PNG"))
        else:
            path = root / f"face_{i:05d}.jpg"
            path.write_bytes(encode(image, "JPEG", quality=85))
        paths.append(path)
    return paths


# ---------------------------------------------------------------- running the real CLI in a subprocess

FACETRACE = str(Path(__import__("sys").executable).with_name("facetrace"))


def cli_env(data_dir: Path, db_url: str, home: Path, **extra: str) -> dict[str, str]:
    """Environment for a `facetrace` subprocess: this test's catalog, the session's Prefect API, no
    Kaggle credentials or proxies inherited from the machine, and a private HOME."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KAGGLE_", "FACETRACE_")) and k.lower() not in ("http_proxy", "https_proxy",
                                                                                 "no_proxy", "all_proxy")}
    home.mkdir(parents=True, exist_ok=True)
    env.update(FACETRACE_DATA_DIR=str(data_dir), FACETRACE_DB_URL=db_url, HOME=str(home),
               PREFECT_LOGGING_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    api_url = PREFECT_API_URL.value()
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env.update(extra)
    return env
