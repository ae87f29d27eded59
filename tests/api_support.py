"""Helpers for the API's tests and benchmark: a tiny detector trained in seconds and registered in a
catalog, and `facetrace api` started as a real uvicorn process on a free loopback port.

    trained = train_tiny(tmp / "m1", faces, seed=0)
    model_id = register(catalog_url, trained, champion=True)
    with ApiServer(tmp / "api", env) as api:
        httpx.get(f"{api.url}/readyz")
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from prefect_server import VENV_BIN, ManagedProcess, free_port, wait_until_healthy

IMAGE_SIZE = 32  # MobileNetV2's minimum: a forward pass costs little on a shared CPU


def train_tiny(out_dir: Path, faces: Path, seed: int = 0, epochs: int = 2, *, image_size: int = IMAGE_SIZE,
               width: float = 0.35, per_class: int | None = None):
    """A MobileNetV2 (width 0.35, 32 px, random init by default) fitted on ``faces`` (Real/ and AI/):
    a real detector, trained in seconds, whose threshold and test confusion come from the same images."""
    from facetrace.tasks.training import TrainConfig, default_config, predict_scores, prepare_file, train_backbone

    paths = sorted((faces / "Real").iterdir())[:per_class] + sorted((faces / "AI").iterdir())[:per_class]
    labels = np.array([0 if p.parent.name == "Real" else 1 for p in paths], np.float32)
    base = default_config("mobilenet_v2", image_size=image_size, epochs=epochs, seed=seed)
    config = TrainConfig(backbone="mobilenet_v2", preprocess=base.preprocess, epochs=epochs, seed=seed,
                         width_multiplier=width, weights="none", precision="float32", patience=epochs,
                         warmup_epochs=0, fine_tune_epochs=0, batch_size=8, test_time_flip=False)
    images = np.stack([prepare_file(p, config.preprocess) for p in paths])
    trained = train_backbone(images, labels, images, labels, config, out_dir, threads=2)
    from facetrace.tasks.training import load_model

    scores = predict_scores(load_model(trained.path, trained.sha256), images)
    threshold = float(np.median(scores))
    flagged = scores >= threshold
    trained.threshold = threshold
    trained.confusion = {"tn": int(((~flagged) & (labels == 0)).sum()), "fp": int((flagged & (labels == 0)).sum()),
                         "fn": int(((~flagged) & (labels == 1)).sum()), "tp": int((flagged & (labels == 1)).sum())}
    return trained


def register(catalog_url: str, trained, *, champion: bool) -> int:
    """Add ``trained`` to the registry (with a snapshot row of its own); promote it when asked."""
    from facetrace.db.engine import get_engine, session_scope
    from facetrace.db.models import Snapshot
    from facetrace.tasks.registry import add_candidate, promote

    with session_scope(get_engine(catalog_url)) as session:
        snapshot = Snapshot(seed=0, image_count=0, content_hash="0" * 64)
        session.add(snapshot)
        session.flush()
        row = add_candidate(session, backbone=trained.backbone, path=trained.path, sha256=trained.sha256,
                            snapshot_id=snapshot.id,
                            image_size=trained.hyperparameters["preprocess"]["image_size"],
                            hyperparameters=trained.hyperparameters,
                            metrics={"test": {"roc_auc": 0.5, "confusion": trained.confusion}},
                            threshold=trained.threshold)
        model_id = row.id
        if champion:
            promote(session, model_id)
    return model_id


def promote_model(catalog_url: str, model_id: int) -> None:
    from facetrace.db.engine import get_engine, session_scope
    from facetrace.tasks.registry import promote

    with session_scope(get_engine(catalog_url)) as session:
        promote(session, model_id)


class ApiServer:
    """`facetrace api --port P` in its own process group, with FACETRACE_* from ``env``."""

    def __init__(self, home: Path, env: dict[str, str], startup_timeout: float = 240.0) -> None:
        self.home = Path(home)
        self.env = {**os.environ, "FACETRACE_API_POLL_S": "0.5", **env}
        self.port = free_port()
        self.startup_timeout = startup_timeout
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get_json(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def healthy(self) -> bool:
        try:
            return self.get_json("/healthz")[0] == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def start(self) -> ApiServer:
        self.home.mkdir(parents=True, exist_ok=True)
        argv = [str(VENV_BIN / "facetrace"), "api", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = ManagedProcess("facetrace api", argv, self.env, self.home / "api.log")
        wait_until_healthy(self.process, self.healthy, self.startup_timeout)
        return self

    def stop(self) -> int | None:
        return self.process.stop() if self.process else None

    def log(self) -> str:
        return self.process.log_tail(20_000) if self.process else ""

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
