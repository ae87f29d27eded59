"""The artifact store: what a remote (S3) store costs against the local data root, in one run.

- ingest: images/s of the `ingest_faces` flow into an S3 store (moto's standalone server on loopback,
  a process of its own) vs into the local folder, same images, fresh catalogs. Target: at least 0.5.
- training input preparation: images/s of `prepare_tensors` (fetch through the read-through cache,
  sha256 check, decode, format-neutral re-encode) from a cold object cache (every image downloaded
  from the store) vs a warm one (every image already cached: no remote read), the tensor cache
  removed before each so that both decode every image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

COUNT = int(os.environ.get("FACETRACE_BENCH_STORE_IMAGES", "400"))
REPEATS = int(os.environ.get("FACETRACE_BENCH_STORE_REPEATS", "2"))
TARGET = 0.5


def start_s3() -> tuple[subprocess.Popen, str]:
    """moto's standalone S3 server in a process of its own (as a real store would be: not sharing this
    process's GIL) on a free loopback port, with a bucket; the AWS variables set for s3fs."""
    import socket

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1")
    deadline = time.monotonic() + 60
    while True:
        try:
            boto3.client("s3").create_bucket(Bucket="facetrace-bench")
            return server, "s3://facetrace-bench"
        except Exception:  # noqa: BLE001 - not listening yet
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)


def use(data_dir: Path, store_url: str | None):
    from facetrace.db.engine import dispose_engines, get_engine
    from facetrace.settings import get_settings

    os.environ["FACETRACE_DATA_DIR"] = str(data_dir)
    os.environ.pop("FACETRACE_DB_URL", None)
    if store_url:
        os.environ["FACETRACE_STORE_URL"] = store_url
    else:
        os.environ.pop("FACETRACE_STORE_URL", None)
    settings = get_settings(fresh=True)
    dispose_engines()
    get_engine(settings.catalog_url)  # created and migrated outside the timed region
    return settings


def ingest_seconds(source: Path, data_dir: Path, store_url: str | None) -> float:
    from facetrace.flows.ingest import ingest_faces

    use(data_dir, store_url)
    started = time.perf_counter()
    result = ingest_faces(kind="folder", path=str(source), label="real" if "real" in source.name else "synthetic")
    seconds = time.perf_counter() - started
    if result["new"] != COUNT // 2:
        raise RuntimeError(f"ingest catalogued {result['new']} of {COUNT // 2}: {result}")
    return seconds


def rows(workdir: Path) -> list[dict]:
    from bench_ingest import generate_faces, project_faces
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    real = project_faces(workdir / "real", COUNT // 2)[0].parent
    synthetic = generate_faces(workdir / "synthetic", COUNT // 2, seed=7, sides=(512, 512))[0].parent
    server, bucket = start_s3()
    try:
        with prefect_test_harness(server_startup_timeout=120):
            ingest_seconds(real, workdir / "warmup", None)  # imports, the API, mappers
            local_times, s3_times = [], []
            for attempt in range(REPEATS):  # interleaved, so a busy moment hits both alike
                local_times.append(ingest_seconds(real, workdir / f"local-{attempt}", None))
                s3_times.append(ingest_seconds(real, workdir / f"s3-{attempt}", f"{bucket}/run-{attempt}"))
                print(f"  ingest run {attempt + 1}: local {local_times[-1]:.2f}s, S3 {s3_times[-1]:.2f}s",
                      file=sys.stderr)
            local_rate, s3_rate = COUNT / 2 / min(local_times), COUNT / 2 / min(s3_times)
            ingest_row = {"name": f"ingest into the S3 store vs the local folder ({COUNT // 2} face photos)",
                          "value": s3_rate, "unit": "images/s", "baseline": local_rate, "ratio": s3_rate / local_rate,
                          "target": TARGET}

            # Training input: a catalog of both classes in the S3 store, read on a machine that never saw it.
            ingest_seconds(synthetic, workdir / "s3-0", f"{bucket}/run-0")
            cold, warm = prepare_rates(workdir / "trainer", f"{bucket}/run-0", workdir / "s3-0" / "catalog.sqlite")
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key in ("FACETRACE_STORE_URL", "FACETRACE_DATA_DIR"):
            os.environ.pop(key, None)
    prepare_row = {"name": f"training input from a cold object cache (S3) vs a warm one ({COUNT} images)",
                   "value": cold, "unit": "images/s", "baseline": warm, "ratio": cold / warm, "target": None}
    return [ingest_row, prepare_row]


def prepare_rates(data_dir: Path, store_url: str, catalog: Path) -> tuple[float, float]:
    from facetrace.settings import get_settings
    from facetrace.tasks.splits import read_snapshot, snapshot_catalog
    from facetrace.tasks.store import ObjectCache
    from facetrace.tasks.training import PreprocessConfig, prepare_tensors

    use(data_dir, store_url)
    url = f"sqlite:///{catalog}"
    os.environ["FACETRACE_DB_URL"] = url
    settings = get_settings(fresh=True)
    split = read_snapshot(url, snapshot_catalog.fn(url, seed=0))
    config = PreprocessConfig(image_size=settings.image_size)
    timings = {}
    for state in ("cold", "warm"):
        shutil.rmtree(data_dir / "cache" / "tensors", ignore_errors=True)
        if state == "cold":
            shutil.rmtree(data_dir / "cache" / "objects", ignore_errors=True)
        started = time.perf_counter()
        prepare_tensors.fn(split, config, data_dir, settings.train_threads)
        timings[state] = time.perf_counter() - started
        cached = ObjectCache.from_settings().size()
        print(f"  prepare_tensors {state}: {timings[state]:.2f}s, object cache {cached / 1e6:.1f} MB", file=sys.stderr)
    total = sum(len(split.part(p)) for p in ("train", "validation", "test"))
    return total / timings["cold"], total / timings["warm"]
