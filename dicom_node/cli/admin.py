"""Admin commands: database migrations, status, instances, deliveries, C-ECHO."""

from __future__ import annotations

import argparse
import json
import re
from datetime import UTC, datetime, timedelta

from dicom_node.cli.common import Fatal, add_settings_flags, prepare_database, settings_from
from dicom_node.config import redact


def cmd_db(args: argparse.Namespace) -> int:
    from dicom_node.db import migrate

    settings = settings_from(args)
    settings.make_dirs()
    url = settings.effective_database_url
    if args.db_command == "upgrade":
        migrate.upgrade(url, args.revision)
    elif args.db_command == "downgrade":
        migrate.downgrade(url, args.revision)
    print(f"database {redact(url)} at revision {migrate.current_revision(url)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from dicom_node.admin import oldest_waiting, status_counts
    from dicom_node.db.session import session_factory
    from workers.tasks import TaskQueue

    settings = settings_from(args)
    prepare_database(settings, upgrade_if_sqlite=False)
    sessions = session_factory(settings.effective_database_url)
    counts = status_counts(sessions)
    waiting = oldest_waiting(sessions)
    try:
        depth: int | str = TaskQueue(settings).depth()
    except Exception as error:
        depth = f"unknown ({str(error).splitlines()[0] or error.__class__.__name__})"
    if args.json:
        print(json.dumps({"instances": counts, "queue_depth": depth, "oldest_waiting": waiting}))
    else:
        for status, count in counts.items():
            print(f"{status:17s} {count}")
        print(f"{'queue depth':17s} {depth}")
        if waiting is not None:
            print(f"{'oldest waiting':17s} instance {waiting['id']} ({waiting['status']}) since "
                  f"{waiting['since'][:19]}, {waiting['age_seconds']:.0f} s")
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a DICOM node (by default this one): an admin's check that a peer answers."""
    from pynetdicom.sop_class import Verification

    from dicom_node.outbox import Timeouts, requesting_ae

    settings = settings_from(args)
    ae = requesting_ae(args.calling_ae, Timeouts.of(settings))
    ae.add_requested_context(Verification)
    host = args.host or "127.0.0.1"
    port = args.port or settings.port
    called = args.ae_title or settings.ae_title
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        raise Fatal(f"no association with {called}@{host}:{port}")
    status = assoc.send_c_echo()
    assoc.release()
    code = int(status.Status) if "Status" in status else -1
    print(f"C-ECHO {called}@{host}:{port}: status 0x{code:04X}")
    return 0 if code == 0 else 1


def cmd_deliveries(args: argparse.Namespace) -> int:
    from dicom_node.db.session import session_factory
    from dicom_node.outbox import list_deliveries, retry_deliveries

    settings = settings_from(args)
    prepare_database(settings, upgrade_if_sqlite=False)
    sessions = session_factory(settings.effective_database_url)
    if args.deliveries_command == "retry":
        if args.all_failed == (args.id is not None):
            raise Fatal("give a delivery ID or --all-failed")
        from workers.tasks import TaskQueue

        retried = retry_deliveries(sessions, None if args.all_failed else [args.id],
                                   TaskQueue(settings).enqueue_delivery)
        if args.id is not None and not retried:
            raise Fatal(f"delivery {args.id} is not failed (or does not exist)")
        print(f"{len(retried)} deliveries queued again")
        return 0
    rows = list_deliveries(sessions, status=args.status, limit=args.limit)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'id':>6} {'status':9} {'kind':7} {'tries':>5}  destination / last error")
    for row in rows:
        error = f"  ({row['last_error']})" if row["last_error"] else ""
        print(f"{row['id']:>6} {row['status']:9} {row['kind']:7} {row['attempts']:>5}  "
              f"{row['destination']}{error}")
    return 0


def parse_since(text: str) -> datetime:
    """ISO date/time (naive = UTC), or an age such as 30m, 12h, 7d."""
    from dicom_node.db.models import aware

    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: int(match.group(1))})
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO date/time nor an age like 30m, 12h, 7d") from None
    return aware(value)


def cmd_purge(args: argparse.Namespace) -> int:
    """Retention now (the reconciler also runs it each round), or --dry-run: what would go."""
    from dicom_node.db.session import session_factory
    from dicom_node.retention import purge

    settings = settings_from(args)
    prepare_database(settings, upgrade_if_sqlite=False)
    if not (settings.spool_retention_days or settings.spool_retention_max_mb
            or settings.outputs_retention_days or settings.outputs_retention_max_mb):
        raise Fatal("no retention configured (SPINENODE_SPOOL_RETENTION_DAYS, "
                    "SPINENODE_SPOOL_RETENTION_MAX_MB, SPINENODE_OUTPUTS_RETENTION_DAYS, "
                    "SPINENODE_OUTPUTS_RETENTION_MAX_MB)")
    items = purge(settings, session_factory(settings.effective_database_url),
                  dry_run=args.dry_run)
    for item in items:
        print(f"{'would purge' if args.dry_run else 'purged'} {item.kind:6} "
              f"{item.size_bytes / 2**20:8.1f} MB  {item.path}  ({item.why})")
    print(f"{len(items)} files, {sum(i.size_bytes for i in items) / 2**20:.1f} MB"
          f"{' would go' if args.dry_run else ' purged'}")
    return 0


def cmd_instances(args: argparse.Namespace) -> int:
    from dicom_node.admin import list_instances
    from dicom_node.db.session import session_factory

    settings = settings_from(args)
    prepare_database(settings, upgrade_if_sqlite=False)
    rows = list_instances(session_factory(settings.effective_database_url),
                          status=args.status, since=args.since, limit=args.limit)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'id':>6} {'status':10} {'received':19} {'mod':3} {'size':>9} {'image':>11}  "
          "SOP Instance UID / note")
    for row in rows:
        image = f"{row['columns']}x{row['rows']}" if row["rows"] else "-"
        note = row["last_error"] or row["reason"]
        print(f"{row['id']:>6} {row['status']:10} {row['received_at'][:19]:19} "
              f"{row['modality']:3} {row['size_bytes']:>9} {image:>11}  {row['sop_instance_uid']}"
              + (f"  ({note})" if note else ""))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from dicom_node.admin import show
    from dicom_node.db.session import session_factory

    if (args.uid is None) == (args.accession is None):
        raise Fatal("give a Study or SOP Instance UID, or --accession")
    settings = settings_from(args)
    prepare_database(settings, upgrade_if_sqlite=False)
    found = show(session_factory(settings.effective_database_url), uid=args.uid,
                 accession=args.accession)
    if found is None:
        raise Fatal(f"no study or instance {args.uid or 'with accession ' + args.accession}")
    if args.json:
        print(json.dumps(found, indent=1))
        return 0
    print(f"study {found['study_uid']}  accession {found['accession_number'] or '-'}  "
          f"date {found['study_date'] or '-'}  patient ID {found['patient_id'] or '-'}")
    for report in found["reports"]:
        print(f"  report v{report['version']}: {report['label']} (highest p = "
              f"{report['probability']:.2f}, {report['image_count']} images, "
              f"{report['finding_count']} findings) {report['created_at']}")
        _print_objects(report["objects"], "    ")
    for instance in found["instances"]:
        print(f"  instance {instance['id']} {instance['sop_instance_uid']} "
              f"({instance['modality'] or '-'}) {instance['status']} from "
              f"{instance['calling_ae']} at {instance['received_at']}")
        analysis = instance["analysis"]
        if analysis is not None:
            print(f"    {analysis['label']} p = {analysis['probability']:.3f} (threshold "
                  f"{analysis['threshold']:.2f}), {analysis['bundle']} on {analysis['device']}")
            for item in analysis["findings"]:
                box = ", ".join(f"{value:.0f}" for value in item["box"])
                print(f"      {item['class']} {item['score']:.2f} at [{box}]")
            _print_objects(analysis["objects"], "    ")
        for event in instance["events"]:
            print(f"    {event['at']} {event['event']}: {event['detail']}")
    return 0


def _print_objects(objects: list[dict], indent: str) -> None:
    for item in objects:
        sent = ", ".join(f"{d['destination']} {d['status']}"
                         + (f" ({d['last_error']})" if d["last_error"] else "")
                         for d in item["deliveries"]) or "not sent anywhere"
        print(f"{indent}{item['kind']} {item['sop_instance_uid']}: {sent}")


def cmd_results(args: argparse.Namespace) -> int:
    import csv
    import sys

    from dicom_node.admin import Filters, results
    from dicom_node.db.session import session_factory

    settings = settings_from(args)
    prepare_database(settings, upgrade_if_sqlite=False)
    filters = Filters(accession=args.accession, study_uid=args.study, label=args.label,
                      finding=args.finding, since=args.since)
    rows = results(session_factory(settings.effective_database_url), filters, limit=args.limit)
    if args.json:
        print(json.dumps(rows, indent=1))
    elif args.csv:
        columns = list(rows[0]) if rows else ["study_uid", "sop_instance_uid", "label"]
        writer = csv.DictWriter(sys.stdout, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    else:
        for row in rows:
            print(f"{row['received_at'][:19]} {row['label']:8} p={row['probability']:.3f} "
                  f"{row['findings']:>3} findings  {row['accession_number'] or '-':16} "
                  f"{row['sop_instance_uid']}")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """db, status, instances, show, results, deliveries, echo, purge"""
    from dicom_node.db.models import InstanceStatus

    db = commands.add_parser("db", help="database migrations")
    add_settings_flags(db)
    db_commands = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser("upgrade", help="migrate to the newest schema")
    upgrade.add_argument("revision", nargs="?", default="head")
    downgrade = db_commands.add_parser("downgrade", help="migrate back to REVISION")
    downgrade.add_argument("revision")
    db_commands.add_parser("current", help="show the schema revision")
    db.set_defaults(handler=cmd_db)

    echo = commands.add_parser("echo", help="C-ECHO a DICOM node (default: this one)")
    add_settings_flags(echo)
    echo.add_argument("--host", help="default 127.0.0.1")
    echo.add_argument("--port", type=int, help="default: our port")
    echo.add_argument("--ae-title", help="called AE title (default: ours)")
    echo.add_argument("--calling-ae", default="ECHOSCU")
    echo.set_defaults(handler=cmd_echo)

    deliveries = commands.add_parser("deliveries", help="results sent (or due) to destinations")
    add_settings_flags(deliveries)
    deliveries.add_argument("--status", choices=["pending", "sending", "delivered", "failed"])
    deliveries.add_argument("--limit", type=int, default=100)
    deliveries.add_argument("--json", action="store_true")
    deliveries.set_defaults(handler=cmd_deliveries, deliveries_command="list")
    delivery_commands = deliveries.add_subparsers(dest="deliveries_command")
    retry = delivery_commands.add_parser("retry", help="send failed deliveries again")
    retry.add_argument("id", type=int, nargs="?")
    retry.add_argument("--all-failed", action="store_true")
    add_settings_flags(retry)

    purge_command = commands.add_parser("purge", help="retention: remove pixel data and "
                                                      "overlays past their time")
    add_settings_flags(purge_command)
    purge_command.add_argument("--dry-run", action="store_true", help="only list what would go")
    purge_command.set_defaults(handler=cmd_purge)

    status = commands.add_parser("status", help="instances per status and queue depth")
    add_settings_flags(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)

    instances = commands.add_parser("instances", help="list received instances, newest first")
    add_settings_flags(instances)
    instances.add_argument("--status", choices=[s.value for s in InstanceStatus])
    instances.add_argument("--since", type=parse_since, help="ISO time or age (30m, 12h, 7d)")
    instances.add_argument("--limit", type=int, default=100)
    instances.add_argument("--json", action="store_true")
    instances.set_defaults(handler=cmd_instances)

    show = commands.add_parser("show", help="one study or instance: results, objects, "
                                            "deliveries, timeline")
    add_settings_flags(show)
    show.add_argument("uid", nargs="?", help="Study Instance UID or SOP Instance UID")
    show.add_argument("--accession", help="the study with this accession number")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_show)

    export = commands.add_parser("results", help="analysis results, one row per image, "
                                                 "newest first (for export)")
    add_settings_flags(export)
    export.add_argument("--accession")
    export.add_argument("--study", help="Study Instance UID")
    export.add_argument("--label", choices=["normal", "abnormal"])
    export.add_argument("--finding", help="only images with a finding of this class")
    export.add_argument("--since", type=parse_since, help="ISO time or age (30m, 12h, 7d)")
    export.add_argument("--limit", type=int, default=10_000)
    output = export.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true")
    output.add_argument("--csv", action="store_true")
    export.set_defaults(handler=cmd_results)
