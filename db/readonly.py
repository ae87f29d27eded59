"""Read-only SQL over the catalog. Writes are refused by the database itself (SQLite opened with
``mode=ro``, PostgreSQL in a read-only transaction), never by parsing the query text.

A read-only transaction is only as strong as its first statement: PostgreSQL lets
``SET TRANSACTION READ WRITE; DELETE ...`` or ``COMMIT; BEGIN READ WRITE; ...`` out of it when
several statements travel in one simple-protocol message. So a query runs as exactly one statement:
on PostgreSQL as a prepared statement (the server refuses several commands in one), on SQLite
through ``sqlite3``, which runs one statement per call; and the connection is discarded afterwards.

A read-only transaction still lets a PostgreSQL superuser read server files (``pg_read_file``) or
run programs (``COPY ... TO PROGRAM``). Connected as a superuser, the query therefore runs under the
built-in role ``pg_read_all_data`` (``SET LOCAL ROLE``; PostgreSQL 14+): it reads every table and
view and nothing else. Its one statement cannot undo that and then act on it.
"""

from __future__ import annotations

from facetrace.db.engine import make_engine


class ReadOnlyViolation(Exception):
    """The query tried to change the catalog, or failed; the message says which."""


def _is_write_refusal(message: str) -> bool:
    message = message.lower()
    return any(sign in message for sign in ("readonly", "read-only", "read only", "not authorized",
                                            "authorization denied"))


def _drop_superuser_powers(cursor) -> None:
    cursor.execute("SHOW is_superuser")
    if cursor.fetchone()[0] != "on":
        return  # an ordinary role: its own privileges are the limit
    cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = 'pg_read_all_data'")
    if cursor.fetchone() is None:
        raise ReadOnlyViolation("refused: connected as a PostgreSQL superuser to a server without the "
                                "pg_read_all_data role (PostgreSQL < 14); use a catalog URL whose role "
                                "may only read")
    cursor.execute("SET LOCAL ROLE pg_read_all_data")


def run_readonly(url: str, query: str, limit: int | None = None) -> tuple[list[str], list[tuple]]:
    """Run ``query`` (one statement) on a read-only connection; return (column names, rows)."""
    engine = make_engine(url, read_only=True)
    dbapi_error = engine.dialect.loaded_dbapi.Error
    try:
        with engine.connect() as connection:
            transaction = connection.begin()  # SQLite: BEGIN (VACUUM and journal changes refuse to run in one)
            cursor = connection.connection.driver_connection.cursor()
            try:
                if engine.dialect.name == "postgresql":
                    _drop_superuser_powers(cursor)
                    cursor.execute(query, prepare=True)  # extended protocol: one statement only
                else:
                    cursor.execute(query)
                if cursor.description is None:
                    return ["result"], [("statement executed without rows",)]
                columns = [column[0] for column in cursor.description]
                rows = [tuple(r) for r in (cursor.fetchmany(limit) if limit else cursor.fetchall())]
                return columns, rows
            finally:
                cursor.close()
                transaction.rollback()
    except dbapi_error as error:
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        if _is_write_refusal(first_line):
            raise ReadOnlyViolation(
                "refused: the catalog is opened read-only for `facetrace sql`; the database rejected a write "
                f"({first_line})"
            ) from None
        hint = " (one statement at a time)" if "multiple commands" in first_line else ""
        raise ReadOnlyViolation(f"query failed: {first_line}{hint}") from None
    finally:
        engine.dispose()
