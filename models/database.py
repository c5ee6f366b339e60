"""The database: engine, schema migrations (Alembic) and sessions.

SQLite (a file under .dunning/) is the embedded default and is migrated automatically; PostgreSQL
is the production choice, migrated by ``dunning migrate`` (a one-shot job in docker-compose).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Engine, event, make_url, text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlmodel import Session, create_engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK_KEY = 0x64756E6E  # "dunn": the advisory lock migrations take on PostgreSQL


class DatabaseError(RuntimeError):
    """The database cannot be used (unreachable, or its schema is behind or ahead of the code)."""


# A PostgreSQL server that stops answering (a network partition, a frozen host) is noticed in
# seconds, not after the kernel's TCP timeouts of many minutes: a connection attempt gives up
# after 5 s, a request whose data goes unacknowledged after 10 s (tcp_user_timeout), an idle
# connection after about 25 s (keepalives). A request then fails with 503 instead of hanging.
POSTGRES_CONNECT = {"connect_timeout": 5, "tcp_user_timeout": 10_000, "keepalives": 1,
                    "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
OPERATIONAL_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError)


def database_error(exc: Exception) -> DatabaseError:
    """A driver's operational failure as a DatabaseError, in words that say which: the database
    cannot be reached (no answer, the connection lost), or it answered that it could not do it
    now (a deadlock, a lock timeout, SQLite busy). Its first line only, never the statement or
    its values."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    said = cause.__class__.__name__ + (f": {lines[0][:200]}" if lines else "")
    # psycopg gives the server's own errors a SQLSTATE; a connection that failed has none
    if getattr(exc, "connection_invalidated", False) or getattr(cause, "sqlstate", "") is None:
        return DatabaseError(f"cannot reach the database: {said}")
    return DatabaseError(f"the database could not do it now, try again: {said}")


@cache
def engine_for(url: str) -> Engine:
    """One engine per URL per process (engines hold connection pools)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # hide_parameters: a driver error must never carry a recipient or a message body into a
        # log line or an activity failure
        # One connection per process, handed from thread to thread by the pool: SQLite lets one
        # writer in at a time anyway, and sixteen delivery threads contending for its file lock
        # (each waiting in SQLite's sleep-and-retry) cost more CPU and time than taking turns
        # (measured: 8.8 -> 6.7 ms of CPU per four-step run at 16 threads, wall 2.4 -> 2.0 s).
        # Other processes (the CLI, the API) still meet this one through the busy timeout.
        single = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 60} \
            if path and path != ":memory:" else {}
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               hide_parameters=True, **single)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # WAL with NORMAL sync survives a crash of the process (only an OS crash or power loss
            # can lose the last commits); the embedded default is for laptops, production runs
            # PostgreSQL.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    connect = POSTGRES_CONNECT if url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, hide_parameters=True, connect_args=connect)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(url: str) -> None:
    """Bring the schema up to the newest migration. On a SQLite file, processes starting at once
    (a worker and the first command) take turns: the second finds the schema up to date instead
    of creating the same tables again."""
    config = alembic_config(url)
    with _migration_lock(url), engine_for(url).begin() as connection:
        if connection.dialect.name == "postgresql":  # the same turn-taking between servers' jobs
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        _refuse_newer(ScriptDirectory.from_config(config),
                      MigrationContext.configure(connection).get_current_revision())
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def _refuse_newer(script: ScriptDirectory, current: str | None) -> None:
    """Raise DatabaseError if a newer release migrated the database (this one was rolled back to):
    no migration of ours can help, and alembic would only say it cannot locate the revision."""
    if current is None:
        return
    try:
        script.get_revision(current)
    except CommandError:
        raise DatabaseError(
            f"database schema is at {current}, which this release of dunning does not know (it needs "
            f"{script.get_current_head()}): a newer release migrated it; deploy that release"
        ) from None


@contextmanager
def _migration_lock(url: str) -> Iterator[None]:
    """An exclusive lock on ``<database file>.lock`` while migrating (nothing for other URLs)."""
    path = make_url(url).database if url.startswith("sqlite") else None
    if not path or path == ":memory:":
        yield
        return
    import fcntl

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_schema(url: str) -> None:
    """Raise DatabaseError unless the schema is at the newest migration."""
    script = ScriptDirectory.from_config(alembic_config(url))
    head = script.get_current_head()
    try:
        with engine_for(url).connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    except Exception as exc:  # the driver's own error types vary by database
        raise DatabaseError(f"cannot reach the database: {exc.__class__.__name__}: {exc}") from exc
    _refuse_newer(script, current)
    if current != head:
        raise DatabaseError(
            f"database schema is at {current or 'nothing'}, the code needs {head}: "
            "run `dunning migrate`"
        )


def prepare(url: str) -> Engine:
    """The engine for ``url``, migrated if it is the embedded SQLite default, else checked."""
    if url.startswith("sqlite"):
        migrate(url)
    else:
        check_schema(url)
    return engine_for(url)


@contextmanager
def session(engine: Engine) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as db, db.begin():
        yield db
