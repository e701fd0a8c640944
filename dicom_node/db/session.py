"""Engines and sessions for SQLite (embedded) and PostgreSQL (distributed)."""

from __future__ import annotations

import os

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

_engines: dict[str, Engine] = {}


def _forget_inherited_connections() -> None:
    """In a forked child (a Celery prefork worker process), leave the parent's pooled
    connections to the parent: two processes on one socket corrupt each other's transactions."""
    for engine in _engines.values():
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_inherited_connections)


def _normalise_url(url: str) -> str:
    # psycopg 3 is the PostgreSQL driver we ship; plain postgresql:// would ask for psycopg2.
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def engine_for(url: str) -> Engine:
    """One engine (one connection pool) per database URL and process."""
    if url not in _engines:  # no lock: one that a fork inherits held would deadlock the child
        _engines[url] = _create_engine(_normalise_url(url))
    return _engines[url]


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # isolation_level=None hands transaction control to the "begin" hook below.
        engine = create_engine(url, connect_args={"timeout": 60, "isolation_level": None})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # noqa: ANN001
            cursor = dbapi_connection.cursor()
            # WAL lets the SCP threads and the worker process write without blocking readers;
            # synchronous=FULL because a committed row is our promise to the sender.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(connection):  # noqa: ANN001
            # Take the write lock up front: a deferred transaction that later writes can fail
            # with "database is locked" when the SCP threads and the worker write at once.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    given = make_url(url).query  # a parameter in the URL wins over ours
    connect_args = {key: value for key, value in _POSTGRES_CONNECTION.items()
                    if key not in given}
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20,
                         connect_args=connect_args)


# libpq otherwise waits as long as the kernel does: a database host that drops packets (a
# firewall, a cut network) held a C-STORE over 2 minutes before its 0xA700, past the sender's
# own timeout, and a query on a cut connection was still waiting after 200 s (TCP retransmits
# for some 15 minutes). 20 s, under the 30-60 s a sender typically waits for its answer: the
# pool's ping of a connection cut meanwhile is such a query. Seconds, but tcp_user_timeout
# (sent data not acknowledged; it also ends unanswered keepalives) in ms.
_POSTGRES_CONNECTION = {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10,
                        "keepalives_interval": 5, "keepalives_count": 2,
                        "tcp_user_timeout": 20_000}


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(engine_for(url), expire_on_commit=False)
