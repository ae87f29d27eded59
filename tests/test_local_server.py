"""Flow commands without PREFECT_API_URL share one background Prefect server per data root:
started once (even by two first calls at once), reused, visible afterwards, and stopped on request.
Quick refusals (no Kaggle credentials) answer before any server or Prefect import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from ingest_corpus import FACETRACE, encode, noise_image


def private_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No Prefect API, no Kaggle credentials, a private HOME and PREFECT_HOME: as on a new machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FACETRACE_", "KAGGLE_"))}
    env.update(FACETRACE_DATA_DIR=str(tmp_path / "data"), HOME=str(tmp_path / "home"),
               PREFECT_HOME=str(tmp_path / "prefect-client"), PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    (tmp_path / "home").mkdir(exist_ok=True)
    return env


def facetrace(env: dict[str, str], *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([FACETRACE, *argv], env=env, capture_output=True, text=True, timeout=timeout)


def test_kaggle_without_credentials_or_api_answers_before_importing_prefect(tmp_path):
    env = private_env(tmp_path)
    probe = ("import sys\nfrom facetrace.cli.app import main\ncode = main(['ingest', 'kaggle'])\n"
             "print('prefect' in sys.modules, file=sys.stderr)\nsys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    first, imported = done.stderr.strip().splitlines()
    assert first.startswith("facetrace ingest: Kaggle credentials not found") and "KAGGLE_KEY" in first
    assert imported == "False"  # no Prefect, so no temporary server either
    assert not (tmp_path / "data" / "prefect").exists()


def test_one_server_per_data_root_started_once_reused_and_stopped(tmp_path):
    from facetrace.local_server import read_state

    env = private_env(tmp_path)
    data_dir = tmp_path / "data"
    faces = tmp_path / "faces" / "Real"
    faces.mkdir(parents=True)
    for i in range(3):
        (faces / f"f{i}.png").write_bytes(encode(noise_image(i, (32, 32)), "PNG"))
    try:
        # Two first calls at once: the lock makes them agree on one server.
        starts = [subprocess.Popen([FACETRACE, "server", "start"], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outputs = [p.communicate(timeout=300) for p in starts]
        assert all(p.returncode == 0 for p in starts), outputs
        state = read_state(data_dir)
        assert state is not None
        for out, _ in outputs:
            assert state["ui_url"] in out
        assert sum("started:" in out for out, _ in outputs) == 1
        assert sum("already running" in out for out, _ in outputs) == 1

        done = facetrace(env, "ingest", "folder", str(tmp_path / "faces"))
        assert done.returncode == 0, done.stderr
        assert "started a Prefect server" not in done.stderr  # reused, not started again
        assert read_state(data_dir)["pid"] == state["pid"]

        # The CLI's run is in that server (so in its UI).
        request = urllib.request.Request(f"{state['api_url']}/flow_runs/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            runs = json.loads(response.read())
        assert [(r["name"] and r["state_type"]) for r in runs] == ["COMPLETED"]

        status = facetrace(env, "server", "status")
        assert status.returncode == 0 and "running" in status.stdout and state["ui_url"] in status.stdout
    finally:
        stopped = facetrace(env, "server", "stop", timeout=120)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
    with pytest.raises(ProcessLookupError):
        os.killpg(state["pid"], 0)  # the whole group is gone
    assert read_state(data_dir) is None
    assert "not started" in facetrace(env, "server", "status").stdout


def test_a_configured_api_is_used_and_no_server_is_started(tmp_path, monkeypatch):
    from facetrace.local_server import prefect_api, server_home

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    with prefect_api(tmp_path / "data") as url:
        assert url == "http://127.0.0.1:9/api"
    assert not server_home(tmp_path / "data").exists()
