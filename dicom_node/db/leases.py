"""Holding work through database outages: leases renewed while work runs, writes retried.

A worker that claims an instance or a delivery holds a lease on it. The lease is short (a dead
worker's work is handed out again within about a minute), so a live worker renews it while it
works. When the database goes away mid-task, the worker keeps its finished result and writes it
as soon as the database answers again, instead of dropping it and waiting for the lease to run out.

A restart of the database renews every lease: while it was down no holder could renew, so a
lease that ran out then says nothing about its worker. Handing such work out at once would race
the live holder writing its result (a delivery sent twice, an image analysed twice); after the
restart each holder has one full lease to renew or to write.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import Boolean, ColumnElement, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from dicom_node.db.models import Base, utcnow

log = logging.getLogger(__name__)

T = TypeVar("T")


def take(session: Session, table: type[Base], row_id: int, claimable: ColumnElement[bool],
         working: ColumnElement[bool], lease_seconds: float, **values: object) -> bool:
    """Claim one row (an instance, a delivery) in one atomic UPDATE: only while it is
    ``claimable``, or ``working`` under a lease that ran out (its worker died); counts the
    attempt and starts our lease. False when another worker has it or nothing is due."""
    now = utcnow()
    result = session.execute(
        update(table).where(table.id == row_id)
        .where(abandoned_or(table, claimable, working, now, lease_seconds))
        .values(attempts=table.attempts + 1, lease_until=now + timedelta(seconds=lease_seconds),
                **values)
    )
    return result.rowcount == 1


def abandoned_or(table: type[Base], claimable: ColumnElement[bool],
                 working: ColumnElement[bool], moment: datetime,
                 lease_seconds: float) -> ColumnElement[bool]:
    """Rows that may be taken at ``moment``: ``claimable`` ones, and ``working`` ones whose
    lease had run out by then (their worker died)."""
    return claimable | lease_ran_out(table, working, moment, lease_seconds)


def lease_ran_out(table: type[Base], working: ColumnElement[bool], moment: datetime,
                  lease_seconds: float) -> ColumnElement[bool]:
    """``working`` rows whose lease ran out by ``moment``, on a database that has been up for a
    whole lease by then (see the module's note on restarts)."""
    return (working & (table.lease_until < moment)
            & database_up_since(moment - timedelta(seconds=lease_seconds)))


class database_up_since(FunctionElement[bool]):  # noqa: N801 (used like a SQL function)
    """True when the database server has run without a restart since the given moment."""

    type = Boolean()
    inherit_cache = True


@compiles(database_up_since)
def _no_server(element: database_up_since, compiler: SQLCompiler, **kw: object) -> str:
    return "1 = 1"  # SQLite: a file in the node's own process, never down on its own


@compiles(database_up_since, "postgresql")
def _postgresql(element: database_up_since, compiler: SQLCompiler, **kw: object) -> str:
    return f"pg_postmaster_start_time() < {compiler.process(element.clauses, **kw)}"


def extend(session: Session, table: type[Base], held: ColumnElement[bool],
           lease_seconds: float) -> None:
    """Push forward the lease of the rows we still hold (``held``): the heartbeat's write."""
    session.execute(update(table).where(held)
                    .values(lease_until=utcnow() + timedelta(seconds=lease_seconds)))


def is_unavailable(error: BaseException) -> bool:
    """The database could not be reached (down, restarting, connection dropped), as opposed to
    a statement that is wrong and would fail again."""
    return isinstance(error, OperationalError) or (
        isinstance(error, DBAPIError) and error.connection_invalidated)


def when_database_returns(work: Callable[[], T], within_seconds: float, what: str,
                          first_delay: float = 0.25, max_delay: float = 1.0) -> T:
    """Run ``work`` (one transaction); while the database is unreachable, retry for at most
    ``within_seconds``, then raise the last error.

    The retries are frequent (at most ``max_delay`` apart): a reconnect attempt is cheap, and
    the sooner we write once the database is back, the less likely the reconciler has handed
    our expired lease to another worker meanwhile.
    """
    deadline = time.monotonic() + within_seconds
    delay = first_delay
    failures = 0
    while True:
        try:
            return work()
        except Exception as error:
            if not is_unavailable(error) or time.monotonic() + delay > deadline:
                raise
            if failures % 30 == 0:  # the first failure, then about every half minute
                log.warning("database unavailable while %s (%s); retrying until %.0f s have "
                            "passed", what, error.__class__.__name__, within_seconds)
            failures += 1
        time.sleep(delay)
        delay = min(delay * 2, max_delay)


@contextmanager
def renewed(renew: Callable[[], None], lease_seconds: float) -> Iterator[None]:
    """Call ``renew`` every third of the lease while the block runs (a heartbeat thread).

    A failed renewal is logged and tried again next beat: a lease that runs out meanwhile is
    exactly what the claim checks are for.
    """
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(max(lease_seconds / 3, 0.2)):
            try:
                renew()
            except Exception as error:
                log.warning("could not renew a lease: %s", error.__class__.__name__)

    thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
