"""Compute precision of a fit: float32, or mixed bfloat16 where this machine was measured to gain.

``auto`` (the default) is float32 unless a measurement on this machine (``make bench`` records one per
backbone, keyed by a fingerprint of CPU, core count and TensorFlow) found mixed bfloat16 at least
:data:`BFLOAT16_MIN_SPEEDUP` times as fast. Native bfloat16 in the CPU alone is no promise: a full
bench measured Xception at 0.93x of float32 on such a CPU.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

PRECISIONS = ("float32", "mixed_bfloat16")


def cpu_has_bfloat16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX); without it oneDNN emulates it."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[-1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


# auto picks bfloat16 only where it was measured at least this much faster than float32 on this machine.
BFLOAT16_MIN_SPEEDUP = 1.05


def machine_fingerprint(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """What a precision measurement depends on: CPU model and its bfloat16 flags, core count, TensorFlow."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        text = ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    try:
        from importlib.metadata import version

        tf_version = version("tensorflow-cpu")
    except Exception:  # noqa: BLE001 - another TensorFlow distribution
        tf_version = "?"
    return f"{model} | bf16 {'native' if cpu_has_bfloat16(cpuinfo) else 'emulated'} | {os.cpu_count()} cpus | tf {tf_version}"


def precision_probe_file() -> Path:
    from facetrace.settings import get_settings

    return get_settings().data_dir / "cache" / "precision-probe.json"


def record_precision_probe(backbone: str, float32_rate: float, bfloat16_rate: float, *, file: Path | None = None,
                           fingerprint: str | None = None) -> dict[str, Any]:
    """Remember a measurement (training images/s in each precision) for this machine and backbone."""
    file = Path(file or precision_probe_file())
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        data = {}
    entry = {"float32": float32_rate, "mixed_bfloat16": bfloat16_rate, "ratio": bfloat16_rate / float32_rate,
             "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    data.setdefault(fingerprint or machine_fingerprint(), {})[backbone] = entry
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".tmp-{uuid.uuid4().hex}-{file.name}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, file)
    return entry


def measured_bfloat16_speedup(backbone: str, *, file: Path | None = None, fingerprint: str | None = None) -> float | None:
    """bfloat16 / float32 training speed measured on this machine for ``backbone``, or None."""
    try:
        data = json.loads(Path(file or precision_probe_file()).read_text())
    except (OSError, ValueError):
        return None
    entry = data.get(fingerprint or machine_fingerprint(), {}).get(backbone)
    return None if not entry else float(entry["ratio"])


_UNMEASURED = object()


def resolve_precision(precision: str, backbone: str, *, native_bfloat16: bool | None = None,
                      measured_speedup: Any = _UNMEASURED) -> str:
    """``auto`` becomes mixed_bfloat16 only for a backbone that may gain, on a CPU with native bfloat16,
    where a measurement on this machine (:func:`record_precision_probe`, written by `make bench`)
    found it at least :data:`BFLOAT16_MIN_SPEEDUP` times as fast; otherwise float32. (Native bfloat16
    alone is no promise: a full bench measured Xception at 0.93x of float32 on such a CPU.)"""
    if precision == "auto":
        native = cpu_has_bfloat16() if native_bfloat16 is None else native_bfloat16
        from facetrace.tasks.training import backbone_spec  # the backbones' table lives with the models

        if not (native and backbone_spec(backbone).bfloat16_gain):
            return "float32"
        speedup = measured_bfloat16_speedup(backbone) if measured_speedup is _UNMEASURED else measured_speedup
        return "mixed_bfloat16" if speedup is not None and speedup >= BFLOAT16_MIN_SPEEDUP else "float32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected auto or one of {', '.join(PRECISIONS)}")
    return precision
