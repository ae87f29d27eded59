"""Orchestration overhead: the end-to-end pipeline under Prefect against the very same code with every
flow and task called as its plain function (`.fn`), on the same data, in one run.

"Direct" runs the same flow bodies with Prefect's engine bypassed: a flow or task call is its
``.fn``, ``.submit`` goes to a thread pool of the same size as the flow's task runner, and the run
logger is a plain logger. Everything else (files, catalog, artifacts, events) is the same work.
The pipeline runs with small parameters (the 100 bundled sample faces, as many tiny-diffusion faces,
one backbone, one epoch, 32 px) so that Prefect's fixed costs are not hidden behind minutes of training.
Rows: the whole pipeline (target: direct / Prefect >= 0.9, i.e. overhead at most 10% of wall
time) and, for information, each of its steps.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import logging
import os
import pkgutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TARGET = 0.9
# The demo's chain (100 sample faces, as many tiny-diffusion faces) with a small trainer.
PARAMETERS: dict[str, Any] = {"diffusion_steps": 2, "image_px": 32, "backbones": ["mobilenet_v2"], "epochs": 1,
                              "train_image_size": 32}
# Timed runs per mode; 2 runs them in the order Prefect, direct, direct, Prefect and keeps each mode's best.
REPEATS = int(os.environ.get("FACETRACE_BENCH_PIPELINE_REPEATS", "2"))


class DirectFuture:
    """What `.submit` returns when Prefect is bypassed: a thread-pool future with Prefect's face."""

    def __init__(self, future: concurrent.futures.Future) -> None:
        self.future = future

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> Any:
        return self.future.result(timeout)

    def wait(self, timeout: float | None = None) -> None:
        concurrent.futures.wait([self.future], timeout)


@contextlib.contextmanager
def patched(target: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, original)


@contextlib.contextmanager
def prefect_bypassed(workers: int) -> Iterator[None]:
    """Call every flow and task as its plain function; no runs, states or engine API calls."""
    import prefect
    import prefect.futures
    import prefect.logging
    import prefect.logging.loggers
    from prefect.flows import Flow
    from prefect.tasks import Task

    logger = logging.getLogger("facetrace.direct")
    # Outside a run, Prefect warns that standalone artifacts are deprecated; the work is the same.
    warnings.filterwarnings("ignore", message="Artifact creation outside", category=FutureWarning)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)

    def call(self, *args, **kwargs):
        kwargs.pop("wait_for", None)
        return self.fn(*args, **kwargs)

    def submit(self, *args, **kwargs):
        kwargs.pop("wait_for", None)
        return DirectFuture(pool.submit(self.fn, *args, **kwargs))

    def as_completed(futures, timeout=None):
        by_inner = {f.future: f for f in futures}
        for done in concurrent.futures.as_completed(by_inner, timeout):
            yield by_inner[done]

    def run_logger(*_args, **_kwargs):
        return logger

    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(Flow, "__call__", call))
        stack.enter_context(patched(Task, "__call__", call))
        stack.enter_context(patched(Task, "submit", submit))
        for module in (prefect, prefect.logging, prefect.logging.loggers):
            stack.enter_context(patched(module, "get_run_logger", run_logger))
        # Names the flow modules bound at import time (import them all first: the pipeline imports
        # its subflows inside its body).
        import facetrace.flows

        for info in pkgutil.iter_modules(facetrace.flows.__path__, "facetrace.flows."):
            importlib.import_module(info.name)
        for name, module in list(sys.modules.items()):
            if not name.startswith("facetrace.") or module is None:
                continue
            if "get_run_logger" in vars(module):
                stack.enter_context(patched(module, "get_run_logger", run_logger))
            if vars(module).get("as_completed") is prefect.futures.as_completed:
                stack.enter_context(patched(module, "as_completed", as_completed))
        stack.callback(pool.shutdown)
        yield


@contextlib.contextmanager
def step_timer(times: dict[str, float]) -> Iterator[None]:
    """Record the wall time of each flow call by flow name (the pipeline and its subflows)."""
    from prefect.flows import Flow

    inner = Flow.__call__

    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return inner(self, *args, **kwargs)
        finally:
            times[self.name] = times.get(self.name, 0.0) + time.perf_counter() - started

    with patched(Flow, "__call__", timed):
        yield


def use_data_root(data_dir: Path, cache: Path) -> None:
    """A fresh catalog under ``data_dir``, created and migrated outside the timed region; the model
    cache (the tiny diffusion pipeline, built once) is shared by every run."""
    from facetrace.db.engine import dispose_engines, get_engine
    from facetrace.settings import get_settings

    data_dir.mkdir(parents=True)
    (data_dir / "cache").symlink_to(cache, target_is_directory=True)
    os.environ["FACETRACE_DATA_DIR"] = str(data_dir)
    os.environ.pop("FACETRACE_DB_URL", None)
    dispose_engines()
    get_engine(get_settings(fresh=True).catalog_url)


def run_pipeline(data_dir: Path, cache: Path, direct: bool) -> dict[str, float]:
    from facetrace.flows.pipeline import facetrace_pipeline
    from facetrace.settings import get_settings

    use_data_root(data_dir, cache)
    times: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        if direct:
            stack.enter_context(prefect_bypassed(get_settings().workers))
        stack.enter_context(step_timer(times))
        facetrace_pipeline(**PARAMETERS)
    return times


def rows(workdir: Path) -> list[dict]:
    from prefect.testing.utilities import prefect_test_harness

    from facetrace.flows.common import foreground_runs

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # The harness's new server database: usage telemetry writing to it during migrations made it
    # fail with "database is locked" on a loaded machine (as the CLI found; see facetrace/cli/app.py).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cache = workdir / "cache"
    cache.mkdir()
    # As `facetrace demo` runs it: in the foreground, without Prefect's heartbeat thread.
    with prefect_test_harness(server_startup_timeout=120), foreground_runs():
        # Warm-up: imports (TensorFlow, torch, diffusers, GX), the tiny pipeline's build, flows and
        # tasks known to the API, page cache.
        run_pipeline(workdir / "warmup", cache, direct=False)
        timings = {"prefect": [], "direct": []}
        order = (("prefect", "direct"), ("direct", "prefect")) * REPEATS  # ABBA: slow drift cancels out
        for i, mode in enumerate(m for pair in order[:REPEATS] for m in pair):
            timings[mode].append(run_pipeline(workdir / f"run-{i}-{mode}", cache, direct=mode == "direct"))
    best = {mode: {name: min(t.get(name, 0.0) for t in runs) for name in runs[0]} for mode, runs in timings.items()}
    out = [{"name": "pipeline: direct .fn / under Prefect (wall time)", "value": best["prefect"]["facetrace-pipeline"],
            "unit": "s", "baseline": best["direct"]["facetrace-pipeline"],
            "ratio": best["direct"]["facetrace-pipeline"] / best["prefect"]["facetrace-pipeline"], "target": TARGET}]
    for step in best["prefect"]:
        if step != "facetrace-pipeline" and step in best["direct"]:
            out.append({"name": f"pipeline step {step}: direct / Prefect", "value": best["prefect"][step],
                        "unit": "s", "baseline": best["direct"][step],
                        "ratio": best["direct"][step] / best["prefect"][step], "target": None})
    return out


if __name__ == "__main__":
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="facetrace-bench-pipeline-") as tmp:
        print(json.dumps(rows(Path(tmp)), indent=2))
