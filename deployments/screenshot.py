"""`make screenshot`: facetrace as seen in the Prefect UI, captured with headless Chromium.

Starts a Prefect server (its own home and database, a free loopback port, the UI on), runs
`facetrace serve` against it (which registers the five deployments), starts one run of a deployment
(the whole pipeline by default, with small parameters; ``--flow ingest`` for a quick ingest of the
bundled sample), waits for it to finish, and captures the deployments page and that run's page into
``docs/screenshots/``. Data goes to a temporary data root; every process started is stopped.

    .venv/bin/python deployments/screenshot.py [--flow pipeline|ingest] [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the Prefect server helper shared with the end-to-end tests
from prefect_server import VENV_BIN, ManagedProcess, PrefectServer  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1400,900", "--virtual-time-budget=15000"]
MAX_PNG_BYTES = 450_000
# The run shown: its deployment and parameters small enough for a laptop's CPU in a few minutes.
RUNS = {
    "pipeline": ("facetrace-pipeline/pipeline",
                 {"backbones": ["mobilenet_v2"], "epochs": 1, "train_image_size": 32, "image_px": 32}),
    "ingest": ("ingest-faces/ingest-inbox", {"kind": "sample"}),
}
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("screenshot: Chromium not found; install it with `apt-get install -y chromium`")


def capture(url: str, target: Path, profile: Path) -> None:
    """One page as PNG; the single-page app needs the virtual-time budget to render its data."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    argv = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={target}", url]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    if not target.exists():
        raise RuntimeError(f"Chromium wrote no screenshot of {url}: {result.stderr[-2000:]}")
    shrink(target)


def shrink(png: Path) -> None:
    """Keep committed pictures small: a palette PNG when the full-colour one is too big."""
    if png.stat().st_size <= MAX_PNG_BYTES:
        return
    from PIL import Image

    with Image.open(png) as image:
        small = image.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    small.save(png, optimize=True)


def wait_for_deployments(client, names: set[str], serve: ManagedProcess, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
        if names <= set(found):
            return found
        if not serve.running():
            raise RuntimeError(f"facetrace serve exited:\n{serve.log_tail()}")
        time.sleep(2)
    raise TimeoutError(f"deployments {sorted(names)} not registered after {timeout:.0f} s:\n{serve.log_tail()}")


def wait_for_run(client, run_id, serve: ManagedProcess, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state and run.state.type.value in FINAL:
            return run
        if not serve.running():
            raise RuntimeError(f"facetrace serve exited:\n{serve.log_tail()}")
        time.sleep(3)
    raise TimeoutError(f"flow run {run_id} not finished after {timeout:.0f} s:\n{serve.log_tail()}")


def serve_env(server: PrefectServer, data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FACETRACE_"))}
    env.update(server.client_env())
    env.update({"PREFECT_RUNNER_POLL_FREQUENCY": "2", "FACETRACE_DATA_DIR": str(data),
                "FACETRACE_TRAIN_BACKBONES": json.dumps(["mobilenet_v2"]), "TF_CPP_MIN_LOG_LEVEL": "2"})
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flow", choices=sorted(RUNS), default="pipeline", help="which deployment to run once")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the run")
    args = parser.parse_args(argv)

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deployment, parameters = RUNS[args.flow]
    with tempfile.TemporaryDirectory(prefix="facetrace-screenshot-") as tmp, \
            PrefectServer(Path(tmp) / "prefect", ui=True) as server:
        print(f"Prefect server and UI at {server.url}", file=sys.stderr)
        serve = ManagedProcess("facetrace serve", [str(VENV_BIN / "facetrace"), "serve"],
                               serve_env(server, Path(tmp) / "data"), Path(tmp) / "serve.log", cwd=REPO)
        try:
            with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
                found = wait_for_deployments(client, {deployment}, serve)
                started = time.monotonic()
                for _attempt in range(3):  # the inbox scan skips a run that overlaps a scheduled one: retry
                    run = client.create_flow_run_from_deployment(found[deployment].id, parameters=parameters,
                                                                 tags=["screenshot"])
                    print(f"running {deployment} ({run.name}) ...", file=sys.stderr)
                    run = wait_for_run(client, run.id, serve, args.timeout)
                    if run.state.type.value != "CANCELLED":
                        break
                print(f"{run.name}: {run.state.name} after {time.monotonic() - started:.0f} s", file=sys.stderr)
                if not run.state.is_completed():
                    print(serve.log_tail(), file=sys.stderr)
            profile = Path(tmp) / "chromium"
            shots = {"deployments.png": f"{server.url}/deployments",
                     f"{args.flow}-run.png": f"{server.url}/runs/flow-run/{run.id}"}
            for name, url in shots.items():
                capture(url, args.out / name, profile)
                print(f"{args.out / name} ({(args.out / name).stat().st_size // 1024} KB) <- {url}", file=sys.stderr)
        finally:
            serve.stop()
    return 0 if run.state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
