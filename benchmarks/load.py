"""What each image costs PostgreSQL and Redis: the node on both (`serve` with its worker, the tiny
test bundle: the database and queue work per image does not depend on the models' size) takes
N radiographs in studies of four, analyses them and delivers every SC and study SR to a DCMTK
PACS. Reported per 1,000 images: PostgreSQL transactions, rows written and read, WAL and
database growth; Redis commands and network bytes; spool and outputs on disk. Beside it, the
same node idle for the same time (reconciler rounds, heartbeats, the study reporter): the load
that is there without images. The capacity model in README.md is made from these figures.

    .venv/bin/python benchmarks/load.py [--images 200]

Needs PostgreSQL and Redis as the tests use them (scripts/services) and nothing else running
against them: Redis's counters are the server's. Uses (and drops first) the database
spinenode_bench_load and Redis database 15.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu  # noqa: E402
from tests.support.bundles import make_test_bundle  # noqa: E402
from tests.support.fault_peers import Pacs  # noqa: E402
from tests.support.node import NodeProcess, storescu, wait_for  # noqa: E402
from training.synthetic import make_radiograph  # noqa: E402

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DATABASE = "spinenode_bench_load"
URL = f"postgresql+psycopg://postgres@127.0.0.1:5432/{DATABASE}"
REDIS_URL = "redis://127.0.0.1:6379/15"
PER_STUDY = 4


def counters(db: psycopg.Connection, queue: redis.Redis) -> dict[str, float]:
    time.sleep(1.5)  # PostgreSQL publishes a backend's statistics within a second
    db.execute("SELECT pg_stat_clear_snapshot()")
    row = db.execute(
        "SELECT xact_commit + xact_rollback, tup_inserted, tup_updated, tup_deleted, "
        "tup_returned + tup_fetched, pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0'), "
        "pg_database_size(datname) FROM pg_stat_database WHERE datname = %s",
        (DATABASE,)).fetchone()
    stats = queue.info("stats")
    return {"PostgreSQL transactions": row[0], "rows inserted": row[1], "rows updated": row[2],
            "rows deleted": row[3], "rows read": row[4], "WAL MB": float(row[5]) / 2**20,
            "database MB": row[6] / 2**20,
            "Redis commands": stats["total_commands_processed"],
            "Redis network MB": (stats["total_net_input_bytes"]
                                 + stats["total_net_output_bytes"]) / 2**20}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    print(f"CPU: {cpu()}")
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DATABASE}")
    queue = redis.Redis.from_url(REDIS_URL)
    queue.flushdb()
    with tempfile.TemporaryDirectory(prefix="spinenode-load-") as tmp, \
            psycopg.connect(ADMIN_URL.rsplit("/", 1)[0] + f"/{DATABASE}",
                            autocommit=True) as db:
        work = Path(tmp)
        bundle = make_test_bundle(work / "bundle", threshold=0.0, detector="quadrants")
        pacs = Pacs(work / "pacs")
        pacs.start()
        (work / "in").mkdir()
        studies = [f"1.2.826.0.1.3680043.10.777.{n}" for n in range(args.images // PER_STUDY)]
        images = [make_radiograph(work / "in" / f"{n}.dcm", rows=512, columns=400, seed=n,
                                  study_uid=studies[n // PER_STUDY])
                  for n in range(len(studies) * PER_STUDY)]
        node = NodeProcess(work / "var", URL, broker_url=REDIS_URL, env={
            "SPINENODE_BUNDLE": str(bundle), "SPINENODE_DESTINATIONS": pacs.destination,
            "SPINENODE_RECONCILE_INTERVAL_SECONDS": "10", "SPINENODE_LOG_LEVEL": "WARNING",
            "SPINENODE_STUDY_STABLE_SECONDS": "5"}).start()
        try:
            time.sleep(10)  # the worker loads its models and the node settles
            began, start = time.monotonic(), counters(db, queue)
            for first in range(0, len(images), 20):  # a modality sending a few studies at once
                assert storescu(node.port, images[first:first + 20]).returncode == 0

            def finished() -> bool:
                row = db.execute(
                    "SELECT (SELECT count(*) FROM instances WHERE status = 'done'), "
                    "(SELECT count(*) FROM study_reports), "
                    "(SELECT count(*) FROM deliveries WHERE status <> 'delivered')").fetchone()
                return row == (len(images), len(studies), 0)
            wait_for(finished, 3600, interval=1, what="every image analysed and delivered")
            busy_seconds = time.monotonic() - began
            busy = delta(counters(db, queue), start)
            idle_start = counters(db, queue)
            time.sleep(busy_seconds)
            idle = delta(counters(db, queue), idle_start)
            spool = sum(p.stat().st_size for p in (node.data_dir / "spool").rglob("*.dcm"))
            outputs = sum(p.stat().st_size for p in (node.data_dir / "outputs").rglob("*.dcm"))
        finally:
            node.stop()
            pacs.stop()
    scale = 1000 / len(images)
    print(f"\n{len(images)} images in {len(studies)} studies of {PER_STUDY} (512x400 DX, "
          f"{spool / len(images) / 2**20:.2f} MB each), analysed and delivered (SC each, SR "
          f"per study) in {busy_seconds:.0f} s; the idle node watched as long.")
    print(f"{'per 1,000 images':28} {'with images':>12} {'idle node':>10} {'images alone':>13}")
    for key in busy:
        print(f"{key:28} {busy[key] * scale:12.1f} {idle[key] * scale:10.1f} "
              f"{(busy[key] - idle[key]) * scale:13.1f}")
    print(f"{'spool MB':28} {spool / 2**20 * scale:12.1f}")
    print(f"{'outputs MB':28} {outputs / 2**20 * scale:12.1f}")


if __name__ == "__main__":
    main()
