"""Liveness and readiness: is the process up, and can this node take images and analyse them
now (database migrated, broker, spool space, a bundle served by a worker that beat lately)."""

from __future__ import annotations

import shutil
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Settings
from dicom_node.db import migrate
from dicom_node.heartbeat import heartbeats

BrokerCheck = Callable[[], str | None]  # None when the broker answers, else why not


def readiness(settings: Settings, sessions: sessionmaker[Session],
              broker_check: BrokerCheck) -> dict:
    """``{"ready": bool, "checks": {name: {"ok": bool, "detail": str}}}``."""
    checks = {
        "database": _database(settings),
        "broker": _check(lambda: _broker(broker_check)),
        "spool": _check(lambda: _spool(settings)),
    }
    try:
        beats = heartbeats(sessions)
    except Exception as error:  # noqa: BLE001 - reported as the database check's failure
        beats, checks["database"] = [], _failed(error)
    fresh = [b for b in beats if b["age_seconds"] <= settings.worker_heartbeat_max_age_seconds]
    checks["worker"] = (
        {"ok": True, "detail": f"{len(fresh)} worker(s); newest beat {fresh[0]['age_seconds']} s "
                               f"ago ({fresh[0]['name']})"} if fresh else
        {"ok": False, "detail": f"no worker heartbeat in the last "
                                f"{settings.worker_heartbeat_max_age_seconds:.0f} s"})
    bundles = sorted({b["bundle"] for b in fresh if b["bundle"]})
    checks["bundle"] = (
        {"ok": False, "detail": "no bundle configured: images wait as waiting-for-model"}
        if settings.bundle is None else
        {"ok": True, "detail": f"verified and served: {', '.join(bundles)}"} if bundles else
        {"ok": False, "detail": f"no live worker serves {settings.bundle}"})
    return {"ready": all(check["ok"] for check in checks.values()), "checks": checks}


def _check(probe: Callable[[], tuple[bool, str]]) -> dict:
    try:
        ok, detail = probe()
    except Exception as error:  # noqa: BLE001 - any failure is a failed check, said in a line
        return _failed(error)
    return {"ok": ok, "detail": detail}


def _failed(error: Exception) -> dict:
    return {"ok": False, "detail": f"{error.__class__.__name__}: {error}".splitlines()[0]}


def _database(settings: Settings) -> dict:
    def probe() -> tuple[bool, str]:
        current, head = migrate.current_revision(settings.effective_database_url), \
            migrate.head_revision()
        if current != head:
            return False, f"schema at {current}, needs {head}: run spinenode db upgrade"
        return True, f"reachable, schema at {current}"
    return _check(probe)


def _broker(broker_check: BrokerCheck) -> tuple[bool, str]:
    problem = broker_check()
    return problem is None, problem or "reachable"


def _spool(settings: Settings) -> tuple[bool, str]:
    if not settings.spool_dir.is_dir():  # e.g. `spinenode web` without the node's data volume
        return False, f"no spool at {settings.spool_dir}"
    free_mb = shutil.disk_usage(settings.spool_dir).free // 2**20
    return (free_mb >= settings.min_free_disk_mb,
            f"{free_mb} MB free (minimum {settings.min_free_disk_mb} MB)")
