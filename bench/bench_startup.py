"""Start-up of the everyday command line, as a user meets it: each command a fresh `facetrace`
process, wall time from exec to exit, best of REPEATS.

Rows (goals from issue 11, each as goal / measured so that a ratio >= 1 meets it):
- `facetrace ingest folder X` on an unchanged folder, after a first call started this data root's
  background Prefect server: under 3 s;
- the reads `status`, `sql`, `models`: under 1 s each;
- for information: the first call (which starts the server), the same unchanged ingest with
  Prefect's temporary server per call (FACETRACE_LOCAL_SERVER=false, the old behaviour), and
  `--help`.
The server this benchmark starts is stopped at the end.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPEATS = int(os.environ.get("FACETRACE_BENCH_STARTUP_REPEATS", "3"))
FACETRACE = str(Path(sys.executable).with_name("facetrace"))
FILES = 100


def _env(workdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FACETRACE_"))}
    env.update(FACETRACE_DATA_DIR=str(workdir / "data"), PREFECT_HOME=str(workdir / "prefect-client"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return env


def timed(env: dict[str, str], *argv: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the command and its children) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([FACETRACE, *argv], env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"facetrace {' '.join(argv)} failed: {done.stderr[-2000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def best(env: dict[str, str], *argv: str) -> tuple[float, float]:
    runs = [timed(env, *argv) for _ in range(REPEATS)]
    return min(wall for wall, _ in runs), min(cpu for _, cpu in runs)


def _row(name: str, seconds: float, goal: float | None, info_baseline: float | None = None) -> dict:
    if goal is None:
        return {"name": name, "value": seconds, "unit": "s", "baseline": info_baseline,
                "ratio": info_baseline / seconds, "target": None}
    return {"name": name, "value": seconds, "unit": "s", "baseline": goal, "ratio": goal / seconds, "target": 1.0}


def rows(workdir: Path) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_ingest import generate_faces

    folder = workdir / "faces" / "Real"
    generate_faces(folder, FILES, sides=(64, 128))
    env = _env(workdir)
    try:
        first, _ = timed(env, "ingest", "folder", str(folder.parent))  # starts the server, catalogues the files
        unchanged = best(env, "ingest", "folder", str(folder.parent))
        reads = {verb: best(env, *argv) for verb, argv in (
            ("status", ["status"]), ("sql", ["sql", "SELECT COUNT(*) FROM images"]), ("models", ["models"]))}
        helped = best(env, "--help")
        temporary = timed(_env(workdir, FACETRACE_LOCAL_SERVER="false"), "ingest", "folder", str(folder.parent))
    finally:
        subprocess.run([FACETRACE, "server", "stop"], env=env, capture_output=True, timeout=120)
    # Wall time is what a user waits; CPU time is what it costs the machine, and on a busy shared
    # machine it is the better estimate of the wall time on an idle one (the commands are mostly
    # single-threaded; the server's CPU is not counted: it runs in another process group).
    out = []
    for kind, index in (("wall", 0), ("CPU", 1)):
        out.append(_row(f"facetrace ingest folder, {FILES} unchanged files, server warm, {kind} (goal < 3 s)",
                        unchanged[index], 3.0))
        out += [_row(f"facetrace {verb}, {kind} (goal < 1 s)", seconds[index], 1.0) for verb, seconds in reads.items()]
    out += [
        _row("ingest unchanged, wall: temporary server per call / background server", unchanged[0], None,
             temporary[0]),
        _row("first ingest, wall (starts the background server) / a later one", unchanged[0], None, first),
        _row("facetrace --help, wall / 1 s", helped[0], None, 1.0),
    ]
    return out


if __name__ == "__main__":
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="facetrace-bench-startup-") as tmp:
        print(json.dumps(rows(Path(tmp)), indent=2))
