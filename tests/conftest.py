"""Shared fixtures: an isolated data root and catalog per test, on SQLite and on PostgreSQL.

PostgreSQL tests use ``FACETRACE_TEST_PG_URL`` (default the local server, database ``test``), each
in a schema of its own. They skip when no server answers, unless ``FACETRACE_REQUIRE_PG=1`` (set by
``.ci/run``), where a missing server is a failure: a broken set-up cannot pass silently.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

PG_URL = os.environ.get("FACETRACE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "seed-faces-dev"

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _pg_available() -> str | None:
    """None when PostgreSQL answers, else the reason it does not."""
    try:
        import psycopg

        plain = PG_URL.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(plain, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return None
    except Exception as exc:  # noqa: BLE001
        return f"PostgreSQL at {PG_URL} not available: {exc}"


def _pg_schema_url() -> tuple[str, str]:
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options=-csearch_path%3D{schema}", schema


def _drop_pg_schema(schema: str) -> None:
    import psycopg

    from facetrace.db.engine import dispose_engines

    dispose_engines()
    with psycopg.connect(PG_URL.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(autouse=True)
def no_weights_download(monkeypatch: pytest.MonkeyPatch):
    """Tests never reach Keras' real weights origin: the mirror is a loopback port nobody listens on
    (a fetch is refused at once and training falls back to random initialisation, as offline).
    Tests of the fetch itself point the mirror at their own local server."""
    from tests.prefect_server import free_port

    monkeypatch.setenv("FACETRACE_WEIGHTS_MIRROR", f"http://127.0.0.1:{free_port()}/")
    from facetrace.settings import get_settings

    get_settings(fresh=True)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def catalog_url(request, data_dir: Path):
    """A fresh, empty catalog URL on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{data_dir / 'catalog.sqlite'}"
        return
    reason = _pg_available()
    if reason:
        if os.environ.get("FACETRACE_REQUIRE_PG") == "1":
            pytest.fail(reason + " (required: FACETRACE_REQUIRE_PG=1)")
        pytest.skip(reason)
    url, schema = _pg_schema_url()
    yield url
    _drop_pg_schema(schema)


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch, data_dir: Path, catalog_url: str):
    """Point the process-wide settings at this test's data root and catalog."""
    from facetrace.db.engine import dispose_engines
    from facetrace.settings import get_settings

    monkeypatch.setenv("FACETRACE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("FACETRACE_DB_URL", catalog_url)
    settings = get_settings(fresh=True)
    yield settings
    dispose_engines()
    monkeypatch.undo()
    get_settings(fresh=True)


@pytest.fixture
def sqlite_settings_env(monkeypatch: pytest.MonkeyPatch, data_dir: Path):
    """Settings on a SQLite catalog only (for tests whose subject is not the database)."""
    from facetrace.db.engine import dispose_engines
    from facetrace.settings import get_settings

    monkeypatch.setenv("FACETRACE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("FACETRACE_DB_URL", f"sqlite:///{data_dir / 'catalog.sqlite'}")
    settings = get_settings(fresh=True)
    yield settings
    dispose_engines()
    monkeypatch.undo()
    get_settings(fresh=True)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (flows, artifacts, events)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def shared_faces() -> Path:
    """The development sample of the original project's data; tests skip cleanly without it."""
    if not (SHARED_DATA / "Real").is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


# ---------------------------------------------------------------- the artifact store (local and S3)


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server on a free loopback port for the session (tests make their own buckets)."""
    from tests.s3_server import S3Server

    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def store_url(request, monkeypatch: pytest.MonkeyPatch):
    """The artifact store URL on each backend: None (the data root itself), or a fresh S3 bucket.

    The AWS variables are set in this process for the test (s3fs and worker processes read them)."""
    if request.param == "local":
        monkeypatch.delenv("FACETRACE_STORE_URL", raising=False)
        yield None
        return
    server = request.getfixturevalue("s3_server")
    if not server.running():  # a fault test stopped it and failed before starting it again
        server.start()
    for key, value in server.client_env().items():
        monkeypatch.setenv(key, value)
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    server.create_bucket(bucket)
    yield f"s3://{bucket}/store"


@pytest.fixture
def store_env(monkeypatch: pytest.MonkeyPatch, settings_env, store_url):
    """settings_env plus FACETRACE_STORE_URL (when the store is remote); yields the fresh settings."""
    from facetrace.settings import get_settings

    if store_url:
        monkeypatch.setenv("FACETRACE_STORE_URL", store_url)
    else:
        monkeypatch.delenv("FACETRACE_STORE_URL", raising=False)
    yield get_settings(fresh=True)
    get_settings(fresh=True)
