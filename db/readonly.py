"""Read-only SQL over the catalog. Writes are refused by the database itself (SQLite opened with
``mode=ro``, PostgreSQL in a read-only transaction), never by parsing the query text."""

from __future__ import annotations

from sqlalchemy import exc, text

from facetrace.db.engine import make_engine


class ReadOnlyViolation(Exception):
    """The query tried to change the catalog, or failed; the message says which."""


def _is_write_refusal(error: exc.DBAPIError) -> bool:
    message = str(error.orig).lower()
    return "readonly" in message or "read-only" in message or "read only" in message


def run_readonly(url: str, query: str, limit: int | None = None) -> tuple[list[str], list[tuple]]:
    """Run ``query`` on a read-only connection; return (column names, rows)."""
    engine = make_engine(url, read_only=True)
    try:
        with engine.connect() as connection:
            result = connection.execute(text(query))
            if not result.returns_rows:
                connection.rollback()
                return ["result"], [("statement executed without rows",)]
            columns = list(result.keys())
            rows = [tuple(r) for r in (result.fetchmany(limit) if limit else result.fetchall())]
            connection.rollback()
            return columns, rows
    except exc.DBAPIError as error:
        if _is_write_refusal(error):
            raise ReadOnlyViolation(
                "refused: the catalog is opened read-only for `facetrace sql`; the database rejected a write "
                f"({str(error.orig).splitlines()[0]})"
            ) from None
        raise ReadOnlyViolation(f"query failed: {str(error.orig).splitlines()[0]}") from None
    finally:
        engine.dispose()
