"""A real Prefect server for end-to-end tests and `make screenshot`: `prefect server start` on a free
loopback port, in a process group of its own, with its own PREFECT_HOME and SQLite database.

    with PrefectServer(tmp_path / "prefect") as server:
        env = {**os.environ, **server.client_env()}   # PREFECT_API_URL for child processes
        ...

Every process started here is stopped on exit (SIGTERM to the whole group, then SIGKILL), and
``stop()`` checks that nothing of the group is left. A ``ManagedProcess`` does the same for other
children (e.g. `facetrace serve`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process in the group exists but is not ours: still alive
        return True
    return True


class ManagedProcess:
    """A child process in its own session (so its own process group), output captured to a file."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.pgid = self.proc.pid  # start_new_session: the child leads a new group

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the whole group, wait, SIGKILL what is left; return the leader's exit status."""
        for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            if not _group_alive(self.pgid):
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=0.2)
                # A group whose leader is reaped can still hold orphans (e.g. uvicorn, flow runs).
                if self.proc.poll() is not None and not _group_alive(self.pgid):
                    break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._log.close()
        if self.proc.poll() is None or _group_alive(self.pgid):
            raise RuntimeError(f"{self.name} (process group {self.pgid}) is still running after SIGKILL")
        return self.proc.returncode


def wait_until_healthy(process: ManagedProcess, healthy, timeout: float) -> None:
    """Wait for ``healthy()``; stop the process and raise with its log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.running():
            tail = process.log_tail()
            process.stop()
            raise RuntimeError(f"{process.name} exited during start-up:\n{tail}")
        if healthy():
            return
        time.sleep(0.5)
    tail = process.log_tail()
    process.stop()
    raise TimeoutError(f"{process.name} not healthy after {timeout:.0f} s:\n{tail}")


class PrefectServer:
    """`prefect server start` on 127.0.0.1:<free port> with state under ``home``."""

    def __init__(self, home: Path, *, ui: bool = False, startup_timeout: float = 180.0,
                 extra_env: Mapping[str, str] | None = None) -> None:
        self.home = Path(home)
        self.ui = ui
        self.startup_timeout = startup_timeout
        self.extra_env = dict(extra_env or {})
        self.port = free_port()
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def client_env(self) -> dict[str, str]:
        """What a client process (serve, flows, the test) needs to talk to this server, and only it."""
        return {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(self.home / "client"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # A stray profile must not point clients at another server or an ephemeral one.
            "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false",
        }

    def server_env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
        env.update({
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "true" if self.ui else "false",
            "PREFECT_UI_ENABLED": "true" if self.ui else "false",
            "PREFECT_SERVER_UI_API_URL": self.api_url,  # the UI's browser code calls this, not :4200
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            # Newly created or changed deployments get their scheduled runs within a couple of seconds.
            "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "2",
            **self.extra_env,
        })
        return env

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        argv = [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
                "--analytics-off"]
        self.process = ManagedProcess("prefect server", argv, self.server_env(), self.home / "server.log")
        wait_until_healthy(self.process, self.healthy, self.startup_timeout)
        return self

    def stop(self) -> int | None:
        if self.process is None:
            return None
        return self.process.stop()

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
