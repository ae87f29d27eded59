"""One engine factory from a URL: SQLite by default (WAL, foreign keys, busy timeout), PostgreSQL at scale."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 60_000


def _refuse_other_files(action: int, *_args) -> int:
    """SQLite authorizer of read-only connections: ``mode=ro`` guards the catalog, but ATTACH and
    VACUUM INTO would still create or write other files; the engine refuses both."""
    import sqlite3

    return sqlite3.SQLITE_DENY if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH) else sqlite3.SQLITE_OK


def _configure_sqlite(engine: Engine, *, read_only: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001 - DBAPI connection
        # Let SQLAlchemy own transactions so BEGIN IMMEDIATE works (pysqlite's legacy mode would not).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys = ON")
        if not read_only:
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()
        if read_only:
            dbapi_conn.set_authorizer(_refuse_other_files)

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001
        # Writers take the lock up front: no "database is locked" on a read-then-write upgrade.
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def make_engine(url: str, *, read_only: bool = False, echo: bool = False) -> Engine:
    """Create an engine for the catalog at ``url``.

    ``read_only`` opens SQLite with ``mode=ro`` and runs every PostgreSQL transaction read-only,
    so the database itself refuses writes.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:":
            path = Path(database).expanduser().resolve()
            if read_only:
                if not path.exists():
                    raise FileNotFoundError(f"catalog {path} does not exist; run `facetrace ingest` first")
                engine = create_engine(
                    f"sqlite:///file:{path}?mode=ro&uri=true", echo=echo, connect_args={"timeout": 60}
                )
                _configure_sqlite(engine, read_only=True)
                return engine
            path.parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{path}"
        engine = create_engine(url, echo=echo, connect_args={"timeout": 60})
        _configure_sqlite(engine, read_only=read_only)
        return engine

    connect_args = {}
    if read_only and parsed.get_backend_name() == "postgresql":
        # Keep the URL's own options (e.g. -csearch_path=...): connect_args would replace them.
        given = parsed.query.get("options")
        given = " ".join(given) if isinstance(given, tuple) else given
        connect_args["options"] = " ".join(filter(None, [given, "-c default_transaction_read_only=on"]))
    return create_engine(url, echo=echo, pool_pre_ping=True, connect_args=connect_args)


_ENGINES: dict[str, Engine] = {}


def get_engine(url: str | None = None) -> Engine:
    """The migrated read-write engine for ``url`` (default: the configured catalog), cached per process."""
    if url is None:
        from facetrace.settings import get_settings

        url = get_settings().catalog_url
    if url not in _ENGINES:
        from facetrace.db.migrate import at_head, upgrade

        engine = make_engine(url)
        if not at_head(engine):
            upgrade(engine)
        _ENGINES[url] = engine
    return _ENGINES[url]


def dispose_engines() -> None:
    """Close every cached engine (tests switch catalogs; forked workers must not share sockets)."""
    for engine in _ENGINES.values():
        engine.dispose()
    _ENGINES.clear()


@contextlib.contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """One session per unit of work: commit on success, roll back on error."""
    engine = engine or get_engine()
    factory = sessionmaker(engine, expire_on_commit=False)
    with factory() as session, session.begin():
        yield session
