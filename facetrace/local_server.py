"""One background Prefect server per data root, started on first use, so flow commands do not pay
for a temporary server on every call and their runs stay visible in a UI afterwards.

Layout under the data root (``<data root>/prefect/``)::

    prefect.db      the server's own SQLite database (flow runs, logs, artifacts, events)
    server.json     {"pid", "port", "api_url", "ui_url", "started_at"}: how later calls find it
    server.lock     held while one call checks or starts the server (two first calls start one)
    server.log      the server's output

The server runs detached in a process group of its own (a CLI call that started it may exit) and
is reused by later calls while it answers ``/api/health``. A Prefect API configured by the user
(``PREFECT_API_URL`` in the environment or the active Prefect profile) always wins; with
``FACETRACE_LOCAL_SERVER=false`` Prefect's own temporary per-call server is used instead.

Light at import: no Prefect import here (``facetrace status`` and ``--help`` must stay quick).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STARTUP_TIMEOUT_S = 180.0


def server_home(data_dir: Path) -> Path:
    return Path(data_dir).resolve() / "prefect"


def configured_api_url() -> str | None:
    """The Prefect API this process is told to use, if any, read without importing Prefect where possible."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if "prefect.settings" in sys.modules:  # already loaded (e.g. a test harness's temporary settings)
        from prefect.settings import get_current_settings

        return get_current_settings().api.url or None
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        data = tomllib.loads(profiles.read_text())
    except (OSError, ValueError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or data.get("active")
    profile = (data.get("profiles") or {}).get(active) or {}
    return profile.get("PREFECT_API_URL") or None


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state(data_dir: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((server_home(data_dir) / "server.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and {"pid", "api_url"} <= state.keys() else None


def running_server(data_dir: Path) -> dict[str, Any] | None:
    """The state of this data root's server when it is up and answering, else None."""
    state = read_state(data_dir)
    if state and _alive(int(state["pid"])) and healthy(state["api_url"]):
        return state
    return None


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "server.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_env(home: Path, api_url: str) -> dict[str, str]:
    # The server gets its own PREFECT_HOME and database; nothing of the caller's Prefect profile.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_API_URL": api_url,
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    })
    return env


def _prefect_executable() -> str:
    beside = Path(sys.executable).parent / "prefect"
    return str(beside) if beside.exists() else "prefect"


def start_server(data_dir: Path, timeout: float = STARTUP_TIMEOUT_S) -> tuple[dict[str, Any], bool]:
    """This data root's server: the running one, or a new one started now. Returns (state, started)."""
    home = server_home(data_dir)
    if state := running_server(data_dir):
        return state, False
    with _locked(home):
        if state := running_server(data_dir):  # another call started it while we waited for the lock
            return state, False
        _stop_recorded(data_dir)  # a recorded server that no longer answers: out of the way
        port = _free_port()
        api_url = f"http://127.0.0.1:{port}/api"
        argv = [_prefect_executable(), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                "--analytics-off"]
        with open(home / "server.log", "ab") as log:
            process = subprocess.Popen(argv, env=_server_env(home, api_url), stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True, cwd=home)
        deadline = time.monotonic() + timeout
        while not healthy(api_url, timeout=1.0):
            if process.poll() is not None or time.monotonic() > deadline:
                _stop_group(process.pid)
                tail = (home / "server.log").read_text(errors="replace")[-600:]
                raise RuntimeError(f"the local Prefect server did not start (log {home / 'server.log'}): {tail}")
            time.sleep(0.3)
        state = {"pid": process.pid, "port": port, "api_url": api_url, "ui_url": f"http://127.0.0.1:{port}",
                 "data_dir": str(Path(data_dir).resolve()),
                 "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        tmp = home / "server.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, home / "server.json")
        return state, True


def _stop_group(pgid: int, timeout: float = 20.0) -> None:
    for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pgid, os.WNOHANG)  # reap it when it is our own child
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _stop_recorded(data_dir: Path) -> dict[str, Any] | None:
    state = read_state(data_dir)
    if state is None:
        return None
    pid = int(state["pid"])
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:  # still the leader of the group we started, not a reused pid
            _stop_group(pid)
    (server_home(data_dir) / "server.json").unlink(missing_ok=True)
    return state


def stop_server(data_dir: Path) -> dict[str, Any] | None:
    """Stop this data root's server (the whole process group); return its state, or None if none was recorded."""
    home = server_home(data_dir)
    if not home.is_dir():
        return None
    with _locked(home):
        return _stop_recorded(data_dir)


@contextlib.contextmanager
def prefect_api(data_dir: Path, enabled: bool = True, announce=None) -> Iterator[str | None]:
    """Within this block, Prefect clients talk to the configured API or to this data root's server.

    Yields the API URL (None: Prefect's temporary server, when ``enabled`` is false). Call it before
    flows are imported where possible: Prefect reads its settings from the environment at import.
    """
    configured = configured_api_url()
    if configured or not enabled:
        yield configured
        return
    state, started = start_server(data_dir)
    if started and announce:
        announce(state)
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = state["api_url"]
    try:
        if "prefect.settings" in sys.modules:  # loaded already: its settings context must change too
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings({PREFECT_API_URL: state["api_url"]}):
                yield state["api_url"]
        else:
            yield state["api_url"]
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
