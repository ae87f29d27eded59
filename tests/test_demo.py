"""`make demo` is the README's first command: the whole pipeline runs offline and summarises."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_runs_the_offline_pipeline_and_prints_a_summary(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FACETRACE_", "PREFECT_API_URL"))}
    env.update(FACETRACE_DATA_DIR=str(tmp_path / "data"), PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1", OPENAI_API_KEY="")
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "facetrace.cli", "demo"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
    finally:  # the demo started this data root's background Prefect server: stop it
        stopped = subprocess.run([sys.executable, "-m", "facetrace.cli", "server", "stop"], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert stopped.returncode == 0 and "stopped the Prefect server" in stopped.stdout, stopped.stderr
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    for heading in ("images by label and source", "validation", "models", "champion:", "Where to look next",
                    "Prefect UI: http://127.0.0.1:"):
        assert heading in out, f"{heading!r} missing from the demo summary:\n{out[-3000:]}"

    catalog = sqlite3.connect(tmp_path / "data" / "catalog.sqlite")
    labels = dict(catalog.execute("SELECT label, COUNT(*) FROM images GROUP BY label").fetchall())
    assert labels["real"] == 100 and labels["synthetic"] == 100
    backbones = {row[0] for row in catalog.execute("SELECT backbone FROM models")}
    # Both backbones share the demo's input size, so their mean is registered as a third candidate.
    assert backbones == {"mobilenet_v2", "xception", "ensemble"}
    (metrics, card), = catalog.execute("SELECT metrics, model_card FROM models WHERE backbone = 'ensemble'")
    data = tmp_path / "data"  # the local artifact store: the catalog holds keys relative to it
    assert "roc_auc" in json.loads(metrics)["test"] and (data / json.loads(metrics)["reports"]["gradcam"]).is_file()
    assert "the mean P(synthetic) of `mobilenet_v2`, `xception`" in (data / card).read_text()
    assert catalog.execute("SELECT COUNT(*) FROM models WHERE stage = 'champion'").fetchone()[0] == 1
    # LFW thumbnails against the tiny generator: every model knows it is a toy, and the summary says so.
    assert all(json.loads(m)["demo_data"] for (m,) in catalog.execute("SELECT metrics FROM models"))
    assert "WARNING: toy model: trained on the demo's data" in out
    assert catalog.execute("SELECT COUNT(*) FROM validation_runs").fetchone()[0] >= 1
    # The budget: the pipeline within 10 minutes on 2 cores.
    assert elapsed < 600, f"demo took {elapsed:.0f} s"
