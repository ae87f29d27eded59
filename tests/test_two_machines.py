"""Two machines, simulated: a Prefect server, a `gpu` and a `cpu` process worker, each with its own
empty data root, sharing only a PostgreSQL catalog and an S3 store (a moto server on loopback).
Through the deployments of deployments/prefect.yaml: ingest on cpu, generate (tiny) on gpu,
validate and train on cpu. Then a third, fresh data root runs `facetrace predict` with the champion
and `facetrace validate`, and no worker's local path appears anywhere in the catalog."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

sys.path.insert(0, str(Path(__file__).parent))
from prefect_server import VENV_BIN, ManagedProcess, PrefectServer  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.prefect_server, pytest.mark.postgres]
REPO = Path(__file__).resolve().parents[1]
REAL_FACES = 24
SYNTHETIC_FACES = 24


@pytest.fixture
def pg_catalog():
    from conftest import _drop_pg_schema, _pg_available, _pg_schema_url

    reason = _pg_available()
    if reason:
        if os.environ.get("FACETRACE_REQUIRE_PG") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    url, schema = _pg_schema_url()
    yield url
    _drop_pg_schema(schema)


def real_faces(folder: Path, count: int) -> Path:
    """Smooth, warm pictures (the generated tiny faces are noisy and cool: the classes separate)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    folder.mkdir(parents=True)
    for i in range(count):
        base = 150 + 60 * np.sin((xx + 3 * i) / 9.0 + yy / 17.0)[..., None] * np.array([1.0, 0.6, 0.4])
        pixels = np.clip(base + rng.normal(0, 6, (64, 64, 3)), 0, 255).astype("uint8")
        PILImage.fromarray(pixels, "RGB").save(folder / f"real-{i:02d}.jpg", quality=92)
    return folder


def every_text_value(catalog_url: str) -> list[tuple[str, str, str]]:
    """(table, column, value) for every non-null text or JSON value of every table of the catalog."""
    from sqlalchemy import JSON, String, Text, create_engine, inspect, select, MetaData

    engine = create_engine(catalog_url)
    found = []
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        with engine.connect() as connection:
            for table in metadata.sorted_tables:
                columns = [c for c in table.columns
                           if isinstance(c.type, (String, Text, JSON)) or "JSON" in type(c.type).__name__.upper()]
                if not columns:
                    continue
                for row in connection.execute(select(*columns)):
                    for column, value in zip(columns, row):
                        if value is not None:
                            found.append((table.name, column.name,
                                          value if isinstance(value, str) else json.dumps(value)))
        assert inspect(engine).has_table("models")
    finally:
        engine.dispose()
    return found


def test_gpu_and_cpu_workers_share_only_the_catalog_and_the_store(tmp_path, pg_catalog, s3_server):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    bucket = "two-machines"
    s3_server.create_bucket(bucket)
    store_url = f"s3://{bucket}/facetrace"
    roots = {name: tmp_path / name for name in ("cpu-machine", "gpu-machine", "laptop")}
    faces = real_faces(tmp_path / "incoming" / "real", REAL_FACES)
    picks_dir = tmp_path / "to-predict"  # the inbox deployment moves what it ingested out of `faces`
    picks_dir.mkdir()
    picks = []
    for source in sorted(faces.iterdir())[:2]:
        picks.append(str(picks_dir / source.name))
        Path(picks[-1]).write_bytes(source.read_bytes())

    with PrefectServer(tmp_path / "prefect") as server:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FACETRACE_", "AWS_"))}
        base.update(server.client_env())
        base.update(s3_server.client_env())
        # The only addresses a worker needs: the catalog and the store (and the Prefect API it works for).
        base.update({"FACETRACE_DB_URL": pg_catalog, "FACETRACE_STORE_URL": store_url, "FACETRACE_REPO": str(REPO),
                     "FACETRACE_WORKERS": "1", "FACETRACE_TRAIN_PARALLEL": "1", "FACETRACE_TRAIN_ENSEMBLE": "false",
                     "FACETRACE_TRAIN_TIME_BUDGET_S": "0", "FACETRACE_ROBUSTNESS_IMAGES": "8",
                     "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PREFECT_LOGGING_LEVEL": "INFO"})

        def machine(name: str) -> dict[str, str]:
            return {**base, "FACETRACE_DATA_DIR": str(roots[name])}

        def prefect(*argv: str) -> None:
            done = subprocess.run([str(VENV_BIN / "prefect"), *argv], env=machine("laptop"), cwd=REPO,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"prefect {' '.join(argv)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

        for pool in ("cpu", "gpu"):
            prefect("work-pool", "create", pool, "--type", "process")
        prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        workers = [ManagedProcess(f"{pool} worker", [str(VENV_BIN / "prefect"), "worker", "start", "--pool", pool,
                                                     "--limit", "1"],
                                  machine(f"{pool}-machine"), tmp_path / f"{pool}-worker.log", cwd=REPO)
                   for pool in ("cpu", "gpu")]
        try:
            with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
                def run(name: str, parameters: dict, pool: str):
                    flow_run = run_deployment(name, parameters=parameters, timeout=600)
                    logs = "\n".join(w.log_tail(6000) for w in workers)
                    assert flow_run.state.is_completed(), f"{name}: {flow_run.state}\n{logs}"
                    assert client.read_flow_run(flow_run.id).work_pool_name == pool

                run("ingest-faces/ingest-inbox", {"kind": "folder", "path": str(faces), "label": "real"}, "cpu")
                run("generate-synthetic-faces/generate", {"n": SYNTHETIC_FACES, "model": "tiny", "steps": 2,
                                                          "size": 64, "batch_size": 8}, "gpu")
                run("validate-catalog/validate-nightly", {}, "cpu")
                run("retrain-on-new-faces/train", {"min_new_faces": 1, "backbones": ["mobilenet_v2"], "epochs": 1,
                                                   "image_size": 32}, "cpu")
        finally:
            for worker in workers:
                worker.stop()
        assert not any(w.running() for w in workers)

        # Neither worker kept anything shared on its own disk: images, models and reports are in the store.
        for name in ("cpu-machine", "gpu-machine"):
            for shared in ("images", "models", "reports"):
                assert not (roots[name] / shared).exists(), f"{name} holds {shared}/ locally"

        # A third machine, with nothing but the two addresses: predict with the champion, validate.
        laptop = machine("laptop")
        predicted = subprocess.run([str(VENV_BIN / "facetrace"), "predict", *picks, "--format", "json"], env=laptop,
                                   cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert predicted.returncode == 0, predicted.stderr[-3000:]
        out = json.loads(predicted.stdout)
        assert all(p["error"] is None and 0.0 <= p["probability"] <= 1.0 for p in out["predictions"])
        validated = subprocess.run([str(VENV_BIN / "facetrace"), "validate"], env=laptop, cwd=tmp_path,
                                   capture_output=True, text=True, timeout=300)
        assert validated.returncode == 0, validated.stdout[-3000:] + validated.stderr[-3000:]
        assert store_url in validated.stdout  # the data docs were published to the store

    values = every_text_value(pg_catalog)
    assert any(table == "models" for table, _, _ in values)
    for table, column, value in values:
        for root in roots.values():
            assert str(root) not in value, f"{table}.{column} names a machine's local path: {value[:300]}"
