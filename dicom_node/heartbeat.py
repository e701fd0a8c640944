"""Worker heartbeats: each worker process writes a row every few seconds (and removes it when
it stops); readiness and metrics read how old the newest one is and which bundle it verified."""

from __future__ import annotations

import os
import socket

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import WorkerHeartbeat, aware, utcnow
from dicom_node.periodic import Periodic


class Heartbeat:
    """Beats for this process as ``name`` (default ``spinenode-PID@host``) until stopped."""

    def __init__(self, sessions: sessionmaker[Session], interval: float, bundle: str = "",
                 name: str | None = None):
        self.name = name or f"spinenode-{os.getpid()}@{socket.gethostname()}"
        self._sessions = sessions
        self._bundle = bundle
        self._started = utcnow()
        self._thread = Periodic("worker heartbeat", interval, self.beat, run_first=True)

    def beat(self) -> None:
        with self._sessions.begin() as session:
            row = session.get(WorkerHeartbeat, self.name)
            if row is None:
                row = WorkerHeartbeat(name=self.name, started_at=self._started)
                session.add(row)
            row.seen_at = utcnow()
            row.bundle = self._bundle

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._thread.stop()
        try:
            with self._sessions.begin() as session:
                session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.name == self.name))
        except Exception:  # noqa: BLE001 - a stale row ages out on its own
            pass


def heartbeats(sessions: sessionmaker[Session]) -> list[dict]:
    """Every worker's last beat, newest first, with its age in seconds."""
    now = utcnow()
    with sessions() as session:
        rows = session.scalars(select(WorkerHeartbeat)
                               .order_by(WorkerHeartbeat.seen_at.desc())).all()
        return [{"name": row.name, "bundle": row.bundle,
                 "age_seconds": round((now - aware(row.seen_at)).total_seconds(), 1),
                 "started_at": aware(row.started_at).isoformat(timespec="seconds")}
                for row in rows]
