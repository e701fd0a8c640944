"""The ``spinenode`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dicom_node.config import Settings, SettingsError, load_settings


def _add_settings_flags(parser: argparse.ArgumentParser, server: bool = False) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--data-dir", type=Path, help="spool, queue and default database folder")
    parser.add_argument("--database-url", help="sqlite:///... or postgresql://...")
    parser.add_argument("--broker-url", help="'embedded' (default) or redis://host:6379/0")
    if server:
        parser.add_argument("--ae-title", help="our AE title (default SPINENODE)")
        parser.add_argument("--bind-address", help="address to listen on (default 0.0.0.0)")
        parser.add_argument("--port", type=int, help="port to listen on (default 11112)")


def _settings_from(args: argparse.Namespace) -> Settings:
    overrides = {
        name: getattr(args, name, None)
        for name in ("data_dir", "database_url", "broker_url", "ae_title", "bind_address", "port",
                     "worker_concurrency")
    }
    return load_settings(getattr(args, "config", None), **overrides)


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pynetdicom logs every PDU at INFO; the node logs what matters itself.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # a line per copied module
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)  # "no hostname" for files


class Fatal(Exception):
    """Stop with this one line and exit status 2."""


def _prepare_database(settings: Settings, upgrade_if_sqlite: bool) -> None:
    from alembic.script import ScriptDirectory

    from dicom_node.db import migrate

    url = settings.effective_database_url
    try:
        if upgrade_if_sqlite and url.startswith("sqlite"):
            migrate.upgrade(url)
            return
        current = migrate.current_revision(url)
    except Exception as error:
        raise Fatal(f"cannot use database {_redact(url)}: {error.__class__.__name__}: "
                    f"{str(error).splitlines()[0]}") from None
    head = ScriptDirectory.from_config(migrate.alembic_config(url)).get_current_head()
    if current != head:
        raise Fatal(f"database {_redact(url)} is at revision {current}, not {head}: "
                    "run 'spinenode db upgrade'")


def _redact(url: str) -> str:
    return re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)


def _check_broker(settings: Settings) -> None:
    """Refuse to start when the broker will not let us in; a broker that is merely down is said
    once and waited for (the node keeps what it receives; the reconciler queues it later)."""
    if settings.embedded_broker:
        return
    from workers.app import BrokerUnusable, check_broker

    try:
        unreachable = check_broker()
    except BrokerUnusable as error:
        raise Fatal(f"broker {_redact(settings.broker_url)} refused us: {error}") from None
    if unreachable:
        logging.getLogger(__name__).warning(
            "broker %s unreachable (%s): images are kept and queued once it is back",
            _redact(settings.broker_url), unreachable)


class EmbeddedWorker:
    """``spinenode serve`` runs one worker as a child process, restarted if it dies."""

    def __init__(self, settings: Settings):
        self._env = {**os.environ, **settings.as_environment()}
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def ensure_running(self) -> None:
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                return
            if self._process is not None:
                logging.getLogger(__name__).warning(
                    "embedded worker exited with %s; restarting it", self._process.returncode)
            self._process = subprocess.Popen(
                [sys.executable, "-m", "dicom_node.cli", "worker"], env=self._env)

    def stop(self) -> None:
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                return
            self._process.terminate()
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()


def _check_bundle(settings: Settings) -> None:
    """A configured bundle must load (schema, files, checksums) before we take any work."""
    if settings.bundle is None:
        return
    from workers.bundle import BundleError, load_bundle

    try:
        load_bundle(settings.bundle)
    except BundleError as error:
        raise Fatal(str(error)) from None


def cmd_bundle(args: argparse.Namespace, settings: Settings) -> int:
    from workers.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(args.path)
    except BundleError as error:
        raise Fatal(str(error)) from None
    manifest = bundle.manifest
    if args.bundle_command == "verify":
        print(f"bundle {args.path}: {bundle.label} OK ({len(manifest.weight_files())} weight "
              "files, checksums match)")
        return 0
    if args.json:
        print(manifest.model_dump_json(indent=2))
        return 0
    classifier, detector = manifest.classifier, manifest.detector
    print(f"name        {manifest.name}\nversion     {manifest.version}\n"
          f"created     {manifest.created.isoformat(timespec='seconds')}\n"
          f"clinical    {'yes' if manifest.clinical_use else 'NO (not for clinical use)'}")
    print(f"classifier  {classifier.input_size} px, TTA {', '.join(classifier.tta)}, "
          f"threshold {classifier.threshold:.3f}")
    for member in classifier.members:
        print(f"  {member.architecture:20s} weight {member.ensemble_weight:.2f}  {member.weights}")
    print(f"detector    YOLO11-{detector.scale} {detector.image_size} px, confidence "
          f"{detector.confidence}, NMS IoU {detector.nms_iou}, {detector.weights}")
    print(f"  classes   {', '.join(detector.class_names)}")
    for key, value in manifest.metrics.items():
        print(f"metric      {key}: {value}")
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from dicom_node.db.session import session_factory
    from dicom_node.dispatch import Reconciler, remove_incoming_files
    from dicom_node.scp import StoreSCP
    from workers.app import configure, enqueue_analysis, enqueue_delivery, queue_depth

    _configure_logging(settings)
    settings.make_dirs()
    _prepare_database(settings, upgrade_if_sqlite=True)
    _check_bundle(settings)
    configure(settings)
    _check_broker(settings)
    # Not listening yet: whatever is in incoming was left by an association that never ended.
    remove_incoming_files(settings.incoming_dir, older_than=0)
    sessions = session_factory(settings.effective_database_url)
    scp = StoreSCP(settings, sessions, enqueue_analysis)
    worker = None if args.no_worker else EmbeddedWorker(settings)
    reconciler = Reconciler(settings, sessions, enqueue_analysis, queue_depth,
                            enqueue_delivery=enqueue_delivery,
                            also=worker.ensure_running if worker else None)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        scp.start()
    except OSError as error:
        raise Fatal(f"cannot listen on {settings.bind_address}:{settings.port}: "
                    f"{error.strerror or error}") from None
    if worker is not None:
        worker.ensure_running()
    reconciler.start()
    broker = "embedded queue" if settings.embedded_broker else _redact(settings.broker_url)
    print(
        f"spinenode: {settings.ae_title} listening on {settings.bind_address}:{settings.port}; "
        f"database {_redact(settings.effective_database_url)}; {broker}; "
        f"spool {settings.spool_dir.resolve()}; "
        f"worker {'embedded' if worker else 'separate (spinenode worker)'}",
        flush=True,
    )
    stop.wait()
    print("spinenode: stopping", flush=True)
    scp.stop()
    reconciler.stop()
    if worker is not None:
        worker.stop()
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    import socket

    from workers.app import QUEUE, configure

    _configure_logging(settings)
    _prepare_database(settings, upgrade_if_sqlite=False)
    _check_bundle(settings)
    app = configure(settings)
    _check_broker(settings)
    # A batching worker is one process that owns the models (and the GPU) and starts its own
    # decoding processes, which a prefork child (a daemon) may not; it runs tasks itself.
    pool = ["--pool", "solo"] if settings.batch_size > 1 else [
        "--pool", "prefork", "--concurrency", str(settings.worker_concurrency)]
    argv = [
        "--quiet",  # no banner: the node logs what the worker does
        "worker", "--queues", QUEUE, *pool,
        "--hostname", f"spinenode-{os.getpid()}@{socket.gethostname()}",
        "--loglevel", settings.log_level, "--without-gossip", "--without-mingle",
    ]
    if settings.embedded_broker:
        argv.append("--without-heartbeat")  # the file broker has no fan-out exchange
    app.worker_main(argv)
    return 0


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from dicom_node.db import migrate

    settings.make_dirs()
    url = settings.effective_database_url
    if args.db_command == "upgrade":
        migrate.upgrade(url, args.revision)
    elif args.db_command == "downgrade":
        migrate.downgrade(url, args.revision)
    print(f"database {_redact(url)} at revision {migrate.current_revision(url)}")
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from dicom_node.admin import oldest_waiting, status_counts
    from dicom_node.db.session import session_factory
    from workers.app import configure, queue_depth

    _prepare_database(settings, upgrade_if_sqlite=False)
    sessions = session_factory(settings.effective_database_url)
    counts = status_counts(sessions)
    waiting = oldest_waiting(sessions)
    configure(settings)
    try:
        depth: int | str = queue_depth()
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


def cmd_echo(args: argparse.Namespace, settings: Settings) -> int:
    """C-ECHO a node (by default this one): the health check of the compose file."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=args.calling_ae)
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


def cmd_deliveries(args: argparse.Namespace, settings: Settings) -> int:
    from dicom_node.db.session import session_factory
    from dicom_node.outbox import list_deliveries, retry_deliveries

    _prepare_database(settings, upgrade_if_sqlite=False)
    sessions = session_factory(settings.effective_database_url)
    if args.deliveries_command == "retry":
        if args.all_failed == (args.id is not None):
            raise Fatal("give a delivery ID or --all-failed")
        retried = retry_deliveries(sessions, None if args.all_failed else [args.id])
        if args.id is not None and not retried:
            raise Fatal(f"delivery {args.id} is not failed (or does not exist)")
        from workers.app import configure, enqueue_delivery

        configure(settings)
        for delivery_id in retried:
            enqueue_delivery(delivery_id)
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


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    """Training lives in its own package; the node never imports it except for this command."""
    from training.config import ConfigError, load_config, torch_device
    from training.vindr import DatasetError

    try:
        config = load_config(args.train_config)
        if args.train_command == "prepare":
            from training.prepare import prepare

            dataset = prepare(args.data, args.out, config)
            images = dataset["images"]
            abnormal = sum(image["abnormal"] for image in images)
            print(f"prepared {len(images)} images ({abnormal} abnormal) in {args.out}; "
                  f"data fingerprint {dataset['fingerprint'][:16]}")
            return 0
        if not (args.out / "dataset.json").is_file():
            raise Fatal(f"{args.out} is not a prepared run: run 'spinenode train prepare' first")
        from training.classify import cross_validate, fit_ensemble

        if args.train_command == "evaluate":
            from training.evaluate import evaluate

            result = evaluate(args.out, args.data, args.bundle or args.out / "bundle")
            c, d = result["classification"], result["detection"]
            print(f"test: AUROC {c['auroc']:.4f} (95% CI {c['auroc_ci'][0]:.4f}-"
                  f"{c['auroc_ci'][1]:.4f}), sensitivity {c['sensitivity']:.4f}, specificity "
                  f"{c['specificity']:.4f}, F1 {c['f1']:.4f}; mAP@0.5 {d['map50']:.4f}, "
                  f"mAP@0.5:0.95 {d['map50_95']:.4f}; report in {args.out / 'report'}")
        elif args.train_command == "ablate":
            from training.ablation import TABLES, ablate

            result = ablate(args.out, config.detect, args.bundle or args.out / "bundle",
                            args.device, tuple(args.table or TABLES))
            for table, rows in result["tables"].items():
                for row in rows:
                    print(f"{table}: {row['row']}: mAP@0.5 {row['map50']:.4f}, "
                          f"mAP@0.5:0.95 {row['map50_95']:.4f}")
            print(f"report in {args.out / 'report' / 'ablation.md'}")
        elif args.train_command == "export":
            from training.export import export_bundle

            target = export_bundle(args.out, config, args.bundle or args.out / "bundle",
                                   args.name, args.version)
            print(f"bundle written to {target}")
        elif args.train_command == "detect":
            from training.detect import train_detector

            torch_device(args.device)  # a clear error where the GPU is missing
            best = train_detector(args.out, config.detect, device=args.device)
            print(f"detector trained: {best}")
        elif args.train_command == "classify":
            for name, result in cross_validate(args.out, config,
                                               torch_device(args.device)).items():
                aurocs = ", ".join(f"{f['val_auroc']:.3f}" for f in result["folds"])
                print(f"{name}: validation AUROC per fold {aurocs}; best fold "
                      f"{result['best_fold']}")
        else:
            summary = fit_ensemble(args.out, config)
            weights = ", ".join(f"{k} {v:.2f}" for k, v in summary["weights"].items())
            print(f"ensemble weights {weights}; threshold {summary['threshold']:.3f}; "
                  f"out-of-fold AUROC {summary['oof_auroc']:.3f}")
    except (ConfigError, DatasetError) as error:
        raise Fatal(str(error)) from None
    return 0


def parse_since(text: str) -> datetime:
    """ISO date/time, or an age such as 30m, 12h, 7d."""
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: int(match.group(1))})
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO date/time nor an age like 30m, 12h, 7d") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def cmd_instances(args: argparse.Namespace, settings: Settings) -> int:
    from dicom_node.admin import list_instances
    from dicom_node.db.session import session_factory

    _prepare_database(settings, upgrade_if_sqlite=False)
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


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from dicom_node.demo import run_demo

    settings.make_dirs()
    try:
        return run_demo(settings, count=args.count, keep_serving=not args.exit)
    except RuntimeError as error:
        raise Fatal(f"demo failed: {error}") from None


def build_parser() -> argparse.ArgumentParser:
    from dicom_node.db.models import InstanceStatus

    parser = argparse.ArgumentParser(prog="spinenode", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the DICOM node (SCP, queue, reconciler)")
    _add_settings_flags(serve, server=True)
    serve.add_argument("--no-worker", action="store_true",
                       help="do not run an embedded worker (run 'spinenode worker' elsewhere)")
    serve.set_defaults(handler=cmd_serve)

    demo = commands.add_parser("demo", help="start the node, send it sample images, show results")
    _add_settings_flags(demo, server=True)
    demo.add_argument("--count", type=int, default=3, help="images to send (default 3)")
    demo.add_argument("--exit", action="store_true", help="stop the node after the summary")
    demo.set_defaults(handler=cmd_demo)

    worker = commands.add_parser("worker", help="run a worker that analyses queued instances")
    _add_settings_flags(worker)
    worker.add_argument("--concurrency", dest="worker_concurrency", type=int,
                        help="worker processes (default 1)")
    worker.set_defaults(handler=cmd_worker)

    db = commands.add_parser("db", help="database migrations")
    _add_settings_flags(db)
    db_commands = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser("upgrade", help="migrate to the newest schema")
    upgrade.add_argument("revision", nargs="?", default="head")
    downgrade = db_commands.add_parser("downgrade", help="migrate back to REVISION")
    downgrade.add_argument("revision")
    db_commands.add_parser("current", help="show the schema revision")
    db.set_defaults(handler=cmd_db)

    echo = commands.add_parser("echo", help="C-ECHO a DICOM node (default: this one)")
    _add_settings_flags(echo)
    echo.add_argument("--host", help="default 127.0.0.1")
    echo.add_argument("--port", type=int, help="default: our port")
    echo.add_argument("--ae-title", help="called AE title (default: ours)")
    echo.add_argument("--calling-ae", default="ECHOSCU")
    echo.set_defaults(handler=cmd_echo)

    bundle = commands.add_parser("bundle", help="check or describe a model bundle")
    bundle_commands = bundle.add_subparsers(dest="bundle_command", required=True)
    verify = bundle_commands.add_parser("verify", help="schema, files and SHA-256 checksums")
    verify.add_argument("path", type=Path)
    info = bundle_commands.add_parser("info", help="what the bundle holds")
    info.add_argument("path", type=Path)
    info.add_argument("--json", action="store_true")
    bundle.set_defaults(handler=cmd_bundle)

    deliveries = commands.add_parser("deliveries", help="results sent (or due) to destinations")
    _add_settings_flags(deliveries)
    deliveries.add_argument("--status", choices=["pending", "sending", "delivered", "failed"])
    deliveries.add_argument("--limit", type=int, default=100)
    deliveries.add_argument("--json", action="store_true")
    deliveries.set_defaults(handler=cmd_deliveries, deliveries_command="list")
    delivery_commands = deliveries.add_subparsers(dest="deliveries_command")
    retry = delivery_commands.add_parser("retry", help="send failed deliveries again")
    retry.add_argument("id", type=int, nargs="?")
    retry.add_argument("--all-failed", action="store_true")
    _add_settings_flags(retry)

    train = commands.add_parser("train", help="train a model bundle (VinDr-SpineXR layout)")
    train_commands = train.add_subparsers(dest="train_command", required=True)
    prepare = train_commands.add_parser(
        "prepare", help="read the data set, cache normalised images, YOLO export, folds")
    prepare.add_argument("--data", type=Path, required=True, help="VinDr-SpineXR folder")
    prepare.add_argument("--out", type=Path, required=True, help="run folder")
    prepare.add_argument("--config", dest="train_config", default="paper",
                         help="paper, smoke or a YAML file (default paper)")
    for name, text in (("classify", "train the DERNet members, 5-fold cross-validation"),
                       ("ensemble", "ensemble weights and threshold from the folds"),
                       ("detect", "train YOLO11 with focal loss, copy-paste, balanced sampling")):
        step = train_commands.add_parser(name, help=text)
        step.add_argument("--out", type=Path, required=True, help="the prepared run folder")
        step.add_argument("--config", dest="train_config", default="paper")
        step.add_argument("--device", default="cpu", help="cpu, or 0 for the first GPU")
    evaluation = train_commands.add_parser("evaluate", help="the bundle on the test split")
    evaluation.add_argument("--out", type=Path, required=True, help="the trained run folder")
    evaluation.add_argument("--data", type=Path, required=True, help="VinDr-SpineXR folder")
    evaluation.add_argument("--config", dest="train_config", default="paper")
    evaluation.add_argument("--bundle", type=Path, help="default RUN/bundle")
    ablation = train_commands.add_parser(
        "ablate", help="the paper's detection ablations: retrain per row, COCOeval on test")
    ablation.add_argument("--out", type=Path, required=True, help="the trained run folder")
    ablation.add_argument("--config", dest="train_config", default="paper")
    ablation.add_argument("--device", default="cpu", help="cpu, or 0 for the first GPU")
    ablation.add_argument("--bundle", type=Path, help="its detector settings (default RUN/bundle)")
    ablation.add_argument("--table", action="append", choices=("additions", "focal", "scales"),
                          help="only this table (repeatable; default all)")
    export = train_commands.add_parser("export", help="write the model bundle from a run")
    export.add_argument("--out", type=Path, required=True, help="the trained run folder")
    export.add_argument("--config", dest="train_config", default="paper")
    export.add_argument("--bundle", type=Path, help="where (default RUN/bundle)")
    export.add_argument("--name", default="spinenode-dernet-yolo11")
    export.add_argument("--version", default="0.1.0")
    train.set_defaults(handler=cmd_train)

    status = commands.add_parser("status", help="instances per status and queue depth")
    _add_settings_flags(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)

    instances = commands.add_parser("instances", help="list received instances, newest first")
    _add_settings_flags(instances)
    instances.add_argument("--status", choices=[s.value for s in InstanceStatus])
    instances.add_argument("--since", type=parse_since, help="ISO time or age (30m, 12h, 7d)")
    instances.add_argument("--limit", type=int, default=100)
    instances.add_argument("--json", action="store_true")
    instances.set_defaults(handler=cmd_instances)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings_from(args)
        return args.handler(args, settings)
    except (SettingsError, Fatal) as error:
        print(f"spinenode: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
