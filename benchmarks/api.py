"""Results API benchmark: PostgreSQL with 1,000,000 instances (their studies with a report each,
series, patients, analyses, findings and two events each, generated in bulk with
generate_series), and four queries an admin makes, each through the API (``spinenode web``,
bearer token, audited, over one keep-alive HTTP connection) beside the same rows fetched with
plain SQL over one psycopg connection in the same run: p50/p95 and the ratio.

    .venv/bin/python benchmarks/api.py [--instances 1000000] [--repeats 200]

Goal (issue 12): the API's p95 under 50 ms and within 2x the plain query's. Needs PostgreSQL as
the tests use it (scripts/services). Uses (and drops first) the database spinenode_bench_api.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu  # noqa: E402
from dicom_node.cli.common import free_port  # noqa: E402

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DATABASE = "spinenode_bench_api"
URL = f"postgresql://postgres@127.0.0.1:5432/{DATABASE}"
IMAGES_PER_STUDY = 4
UID = "1.2.826.0.1.3680043.10.54321"

# One statement per table; n runs over the rows. Instance n belongs to study n / 4, received
# n seconds before the run's start; 30 % of the analyses are abnormal with one finding.
FILL = [
    """INSERT INTO patients (id, patient_id, issuer, name, birth_date, sex, created_at)
       SELECT n, 'PAT-' || n, '', 'Bench^' || n, '19600101', 'O', now()
       FROM generate_series(1, %(studies)s / 2) n""",
    """INSERT INTO studies (id, study_uid, patient_pk, accession_number, study_date,
                           description, created_at)
       SELECT n, '{uid}.1.' || n, 1 + n %% (%(studies)s / 2), 'ACC-' || n, '20261127',
              'LSPINE', %(start)s::timestamptz - ({per} * n - {per} + 1) * interval '1 second'
       FROM generate_series(1, %(studies)s) n""",
    """INSERT INTO series (id, series_uid, study_pk, modality, body_part, created_at)
       SELECT n, '{uid}.2.' || n, n, 'DX', 'LSPINE', now()
       FROM generate_series(1, %(studies)s) n""",
    """INSERT INTO instances (id, sop_instance_uid, sop_class_uid, series_pk,
              transfer_syntax_uid, calling_ae, called_ae, received_at, size_bytes, sha256,
              spool_path, revision, status, reason, attempts, last_error, updated_at, claimed_by,
              rows, columns, photometric_interpretation, bits_stored, decode_seconds)
       SELECT n, '{uid}.3.' || n, '1.2.840.10008.5.1.4.1.1.1.1', 1 + (n - 1) / {per},
              '1.2.840.10008.1.2.1', 'CT' || n %% 7, 'SPINENODE',
              %(start)s::timestamptz - n * interval '1 second', 10000000,
              md5(n::text) || md5(n::text), '/spool/' || n || '.dcm', 1, 'done', '', 1, '',
              %(start)s::timestamptz, '', 2500, 2000,
              'MONOCHROME2', 12, 0.05
       FROM generate_series(1, %(instances)s) n""",
    """INSERT INTO analyses (id, instance_pk, source_sha256, bundle_name, bundle_version,
              clinical_use, member_probabilities, probability, threshold, label,
              decode_seconds, classify_seconds, detect_seconds, device, created_at)
       SELECT n, n, md5(n::text) || md5(n::text), 'dernet', '1.0', false,
              '{{"densenet121": 0.5, "efficientnetv2_s": 0.5, "resnet50": 0.5}}',
              CASE WHEN n %% 10 < 3 THEN 0.8 ELSE 0.2 END, 0.5,
              CASE WHEN n %% 10 < 3 THEN 'abnormal' ELSE 'normal' END, 0.05, 0.9, 0.6,
              'cpu float32', %(start)s::timestamptz - n * interval '1 second' + interval '2 seconds'
       FROM generate_series(1, %(instances)s) n""",
    """INSERT INTO findings (analysis_pk, class_index, class_name, score, x0, y0, x1, y1)
       SELECT n, 0, 'Osteophytes', 0.7, 100, 200, 300, 400
       FROM generate_series(1, %(instances)s) n WHERE n %% 10 < 3""",
    """INSERT INTO study_reports (study_pk, version, label, probability, top_instance_pk,
              image_count, finding_count, analysis_ids, created_at)
       SELECT n, 1, CASE WHEN n %% 10 < 3 THEN 'abnormal' ELSE 'normal' END,
              CASE WHEN n %% 10 < 3 THEN 0.8 ELSE 0.2 END, {per} * n, {per},
              CASE WHEN n %% 10 < 3 THEN 1 ELSE 0 END, '[]', %(start)s::timestamptz
       FROM generate_series(1, %(studies)s) n""",
    """INSERT INTO instance_events (instance_pk, at, event, detail)
       SELECT n, %(start)s::timestamptz - n * interval '1 second', e.event, e.detail
       FROM generate_series(1, %(instances)s) n,
            (VALUES ('received', 'from CT'), ('analysed', 'dernet 1.0')) e(event, detail)""",
]

# The plain SQL of each API query: the same rows (newest first, latest analysis, findings).
PAGE = """
    SELECT i.*, s.study_uid, s.accession_number, p.patient_id, a.*
    FROM instances i JOIN series se ON se.id = i.series_pk JOIN studies s ON s.id = se.study_pk
    JOIN patients p ON p.id = s.patient_pk
    {join} JOIN LATERAL (SELECT * FROM analyses x WHERE x.instance_pk = i.id
                          ORDER BY x.id DESC LIMIT 1) a ON true
    WHERE {where} ORDER BY i.received_at DESC, i.id DESC LIMIT 51"""
FINDINGS = "SELECT * FROM findings WHERE analysis_pk = ANY(%s)"
STUDIES = """
    SELECT s.*, p.patient_id, r.*
    FROM studies s JOIN patients p ON p.id = s.patient_pk
    JOIN LATERAL (SELECT * FROM study_reports x WHERE x.study_pk = s.id
                  ORDER BY x.version DESC LIMIT 1) r ON true
    WHERE s.created_at >= %s AND s.created_at < %s AND r.label = 'abnormal'
    ORDER BY s.created_at DESC, s.id DESC LIMIT 51"""
IMAGES = """
    SELECT se.study_pk, count(i.id), max(i.received_at)
    FROM instances i JOIN series se ON se.id = i.series_pk
    WHERE se.study_pk = ANY(%s) GROUP BY se.study_pk"""


def fill(instances: int) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
        admin.execute(f"CREATE DATABASE {DATABASE}")
    env = {**os.environ, "SPINENODE_DATABASE_URL": URL}
    subprocess.run([sys.executable, "-m", "dicom_node.cli", "db", "upgrade"], env=env,
                   check=True, capture_output=True)
    values = {"instances": instances, "studies": instances // IMAGES_PER_STUDY,
              "start": "2026-11-27 12:00:00+00"}
    with psycopg.connect(URL, autocommit=True) as db:
        for statement in FILL:
            began = time.perf_counter()
            db.execute(statement.format(uid=UID, per=IMAGES_PER_STUDY), values)
            table = statement.split()[2]
            print(f"  {table:16} {time.perf_counter() - began:6.1f} s", flush=True)
        for table in ("patients", "studies", "series", "instances", "analyses", "findings",
                      "study_reports", "instance_events"):
            db.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                       f"(SELECT max(id) FROM {table}))")
        db.execute("VACUUM ANALYZE")


def sql_page(db: psycopg.Connection | Recorder, where: str, params: tuple,
             join: str = "LEFT") -> int:
    rows = db.execute(PAGE.format(where=where, join=join), params).fetchall()
    ids = [row[-15] for row in rows]  # analyses.id: the first of a's 15 columns
    db.execute(FINDINGS, (ids,)).fetchall()
    return len(rows)


def sql_studies(db: psycopg.Connection | Recorder, since: str, until: str) -> int:
    rows = db.execute(STUDIES, (since, until)).fetchall()
    db.execute(IMAGES, ([row[0] for row in rows],)).fetchall()
    return len(rows)


def sql_study(db: psycopg.Connection | Recorder, study_uid: str) -> int:
    study = db.execute("SELECT s.*, p.patient_id FROM studies s JOIN patients p "
                       "ON p.id = s.patient_pk WHERE study_uid = %s", (study_uid,)).fetchone()
    instances = db.execute("SELECT i.* FROM instances i JOIN series se ON se.id = i.series_pk "
                           "WHERE se.study_pk = %s ORDER BY received_at, i.id",
                           (study[0],)).fetchall()
    ids = [row[0] for row in instances]
    db.execute("SELECT * FROM study_reports WHERE study_pk = %s", (study[0],)).fetchall()
    analyses = db.execute("SELECT * FROM analyses WHERE instance_pk = ANY(%s)", (ids,)).fetchall()
    db.execute(FINDINGS, ([row[0] for row in analyses],)).fetchall()
    db.execute("SELECT * FROM outputs WHERE analysis_pk = ANY(%s)",
               ([row[0] for row in analyses],)).fetchall()
    db.execute("SELECT * FROM instance_events WHERE instance_pk = ANY(%s) ORDER BY id",
               (ids,)).fetchall()
    return len(instances)


class Recorder:
    """Runs the plain SQL over one connection and keeps each statement with its values filled
    in, so psql can run exactly the same statements."""

    def __init__(self, db: psycopg.Connection):
        self.db = db
        self.statements: list[str] = []

    def execute(self, query: str, params: tuple) -> psycopg.Cursor:
        self.statements.append(psycopg.ClientCursor(self.db).mogrify(query, params))
        return self.db.execute(query, params)


def psql(statements: list[str]) -> None:
    subprocess.run(["psql", "-X", "-q", "-At", URL, "-c", ";\n".join(statements)], check=True,
                   stdout=subprocess.DEVNULL)


def timed(call, repeats: int) -> list[float]:  # noqa: ANN001
    call()  # warm: plans, caches
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append((time.perf_counter() - began) * 1000)
    return times


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="reuse the filled database")
    args = parser.parse_args()
    print(f"CPU: {cpu()}")
    if not args.keep:
        print(f"filling {DATABASE} with {args.instances:,} instances:", flush=True)
        fill(args.instances)
    env = {**os.environ, "SPINENODE_DATABASE_URL": URL, "SPINENODE_DATA_DIR":
           str(ROOT / "var" / "bench-api"), "SPINENODE_LOG_LEVEL": "WARNING"}
    token = subprocess.run([sys.executable, "-m", "dicom_node.cli", "tokens", "create",
                            f"bench-{time.time_ns()}"], env=env, check=True,
                           capture_output=True, text=True).stdout.strip()
    port = free_port()
    web = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "web", "--http-port",
                            str(port)], env=env)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        deadline = time.monotonic() + 30
        while True:
            try:
                connection.request("GET", "/health/live")
                connection.getresponse().read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Authorization": f"Bearer {token}"}

        def api(path: str) -> dict:
            nonlocal connection
            try:
                connection.request("GET", path, headers=headers)
                response = connection.getresponse()
            except (http.client.RemoteDisconnected, ConnectionError):
                # uvicorn closes a connection idle for 5 s (while psql ran): open a new one.
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                connection.request("GET", path, headers=headers)
                response = connection.getresponse()
            body = response.read()
            assert response.status == 200, (path, response.status, body[:300])
            return json.loads(body)

        studies = args.instances // IMAGES_PER_STUDY
        middle = studies // 2
        since, until = "2026-11-25T00:00:00+00:00", "2026-11-26T00:00:00+00:00"
        cases = [
            ("by accession number",
             f"/api/v1/instances?accession=ACC-{middle}",
             lambda db: sql_page(db, "s.accession_number = %s", (f"ACC-{middle}",))),
            ("date range + label",
             f"/api/v1/instances?since={quote(since)}&until={quote(until)}&label=abnormal",
             lambda db: sql_page(db, "i.received_at >= %s AND i.received_at < %s "
                                     "AND a.label = 'abnormal'", (since, until), join="")),
            ("studies: dates + label",
             f"/api/v1/studies?since={quote(since)}&until={quote(until)}&label=abnormal",
             lambda db: sql_studies(db, since, until)),
            ("one study's timeline", f"/api/v1/studies/{UID}.1.{middle}",
             lambda db: sql_study(db, f"{UID}.1.{middle}")),
        ]
        print(f"\n{args.repeats} requests each, ms. API: HTTP, token check, query, JSON, audit "
              f"row. psql: the same statements, one psql run each. SQL: the same statements "
              f"over one open connection (the database's floor).")
        print(f"{'query':22} {'rows':>4} {'API p50':>8} {'p95':>6} {'psql p50':>9} {'p95':>6} "
              f"{'SQL p50':>8} {'p95':>6} {'API/psql p95':>13} {'API/SQL p95':>12}")
        with psycopg.connect(URL, autocommit=True) as db:
            for name, path, plain in cases:
                body = api(path)
                rows = len(body.get("items", body.get("instances", [])))
                recorder = Recorder(db)
                # The page query asks for 51 rows (the 51st says there is a next page).
                assert rows == min(plain(recorder), 50), (name, rows)
                ours = timed(lambda path=path: api(path), args.repeats)
                by_psql = timed(lambda r=recorder: psql(r.statements), args.repeats)
                by_sql = timed(lambda plain=plain: plain(db), args.repeats)
                p95 = [percentile(times, 95) for times in (ours, by_psql, by_sql)]
                print(f"{name:22} {rows:>4} {percentile(ours, 50):8.1f} {p95[0]:6.1f} "
                      f"{percentile(by_psql, 50):9.1f} {p95[1]:6.1f} "
                      f"{percentile(by_sql, 50):8.1f} {p95[2]:6.1f} "
                      f"{p95[0] / p95[1]:12.2f}x {p95[0] / p95[2]:11.2f}x")
    finally:
        web.terminate()
        web.wait(30)


if __name__ == "__main__":
    main()
