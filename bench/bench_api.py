"""`facetrace api` under bounded loopback load, against `facetrace predict` in the same run.

- throughput: 8 concurrent clients send 2,000 single-image requests of face photos (the shared
  seed faces when present, else generated ones) to a real uvicorn process; images/s, and p50/p99
  latency per request. Baseline: one `facetrace predict IMAGE` process per image (the only way to
  use the champion before the API), timed over a few calls. Target: at least 20x the images/s.
- memory: resident set size of the server after 10,000 requests vs after 1,000 (the first 1,000
  warm every cache). Target: within 10% (ratio = RSS@1k / RSS@10k >= 0.9).

The detector is a MobileNetV2 at 96 px (the default input size), width 1.0, fitted for one epoch:
the same network cost as a real champion, without the training time. Predictions are recorded in
the catalog (SQLite) as in production. Environment: FACETRACE_BENCH_API_REQUESTS (default 2000),
FACETRACE_BENCH_API_MEMORY_REQUESTS (default 10000), FACETRACE_BENCH_API_CLI_CALLS (default 3).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CLIENTS = 8
REQUESTS = int(os.environ.get("FACETRACE_BENCH_API_REQUESTS", "2000"))
MEMORY_REQUESTS = int(os.environ.get("FACETRACE_BENCH_API_MEMORY_REQUESTS", "10000"))
CLI_CALLS = int(os.environ.get("FACETRACE_BENCH_API_CLI_CALLS", "3"))
SEED_FACES = ROOT.parent / "shared" / "data" / "seed-faces-dev"


def face_folder(workdir: Path) -> Path:
    if (SEED_FACES / "Real").is_dir() and (SEED_FACES / "AI").is_dir():
        return SEED_FACES
    from test_registry import write_faces

    return write_faces(workdir / "faces", per_class=20)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def load(url: str, payloads: list[tuple[str, bytes]], requests: int, clients: int = CLIENTS):
    """``requests`` single-image POSTs from ``clients`` threads; returns (wall s, latencies s, failures)."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while True:
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                name, data = payloads[n % len(payloads)]
                started = time.perf_counter()
                response = http.post(f"{url}/v1/detect", files={"file": (name, data, "application/octet-stream")})
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, np.array(latencies), failures


def cli_seconds_per_image(env: dict[str, str], images: list[Path]) -> float:
    """Wall seconds of one `facetrace predict IMAGE` process, averaged over a few images."""
    from prefect_server import VENV_BIN

    timings = []
    for image in images:
        started = time.perf_counter()
        subprocess.run([str(VENV_BIN / "facetrace"), "predict", str(image), "--format", "json"], env=env,
                       check=True, capture_output=True)
        timings.append(time.perf_counter() - started)
    return float(np.mean(timings))


def rows(workdir: Path) -> list[dict]:
    from api_support import ApiServer, register, train_tiny

    faces = face_folder(workdir)
    trained = train_tiny(workdir / "model", faces, epochs=1, image_size=96, width=1.0, per_class=20)
    data_dir = workdir / "data"
    data_dir.mkdir()
    env = {"FACETRACE_DATA_DIR": str(data_dir), "FACETRACE_DB_URL": f"sqlite:///{data_dir / 'catalog.sqlite'}"}
    register(env["FACETRACE_DB_URL"], trained, champion=True)
    images = sorted((faces / "Real").glob("*.jpg"))[:100] + sorted((faces / "AI").iterdir())[:100]
    payloads = [(p.name, p.read_bytes()) for p in images]

    with ApiServer(workdir / "api", env) as api:
        pid = api.process.proc.pid
        _, _, failures = load(api.url, payloads, 1000)
        rss_1k = rss_bytes(pid)
        wall, latencies, more = load(api.url, payloads, REQUESTS)
        failures += more
        _, _, more = load(api.url, payloads, max(0, MEMORY_REQUESTS - 1000 - REQUESTS))
        failures += more
        rss_10k = rss_bytes(pid)
        health = api.get_json("/healthz")[1]
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[:3]}")

    cli_s = cli_seconds_per_image({**os.environ, **env}, images[:CLI_CALLS])
    throughput = REQUESTS / wall
    p50, p99 = (float(np.percentile(latencies, q)) * 1000 for q in (50, 99))
    print(f"  api: {REQUESTS} requests in {wall:.1f} s, {health['images']} images in {health['batches']} "
          f"forward passes (mean batch {health['images'] / max(1, health['batches']):.1f}); "
          f"facetrace predict: {cli_s:.2f} s per image", file=sys.stderr)
    return [
        {"name": f"api throughput, {CLIENTS} clients (images/s) vs `facetrace predict` per image",
         "value": throughput, "unit": "images/s", "baseline": 1.0 / cli_s, "ratio": throughput * cli_s,
         "target": 20},
        {"name": "api latency p50 (ms) vs one `facetrace predict` call", "value": p50, "unit": "ms",
         "baseline": cli_s * 1000, "ratio": cli_s * 1000 / p50, "target": None},
        {"name": "api latency p99 (ms) vs one `facetrace predict` call", "value": p99, "unit": "ms",
         "baseline": cli_s * 1000, "ratio": cli_s * 1000 / p99, "target": None},
        {"name": f"api RSS after {MEMORY_REQUESTS} requests (MiB) vs after 1000", "value": rss_10k / 2**20,
         "unit": "MiB", "baseline": rss_1k / 2**20, "ratio": rss_1k / rss_10k, "target": 0.9},
    ]
