"""``spinenode demo``: the node on the embedded default, shown working end to end.

It makes (first run) or reuses phantoms and a bundle trained on them, starts the node with a
local receiver as its PACS, sends held-out phantom radiographs over C-STORE, waits for the SR
and SC to come back, and prints per image the label, probability and findings, and where the
returned files are. On the first run the node takes the images before the bundle exists (they
wait as waiting-for-model), the bundle trains, and the node, started again with it, analyses
them. The phantom bundle says NOT FOR CLINICAL USE in everything it produces.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from dicom_node.cli.common import Fatal, add_settings_flags, free_port, settings_from
from dicom_node.config import Destination, Settings

# pydicom, pynetdicom, SQLAlchemy's models and highdicom are imported where the demo uses them:
# every `spinenode` command imports this module to build its parser, and with them here
# `spinenode db upgrade` took 1.4 s instead of 1.1.

DEMO_AE = "SPINEDEMO"
DEMO_STUDY_STABLE_SECONDS = 5.0
RECEIVER_AE = "DEMOPACS"


def _associate(settings: Settings, contexts: list):  # noqa: ANN202
    from pynetdicom import AE

    ae = AE(ae_title=DEMO_AE)
    for context in contexts:
        ae.add_requested_context(context)
    return ae.associate("127.0.0.1", settings.port, ae_title=settings.ae_title)


def _wait_for_echo(settings: Settings, node: subprocess.Popen, timeout: float = 120) -> None:
    from pynetdicom.sop_class import Verification

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise RuntimeError(f"the node exited with status {node.returncode}")
        assoc = _associate(settings, [Verification])
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            if status and status.Status == 0:
                return
        time.sleep(0.5)
    raise RuntimeError("the node did not answer C-ECHO in time")


def _start_receiver(folder: Path):  # noqa: ANN202
    """A local PACS for the demo: keeps what the node sends back."""
    from pynetdicom import AE, evt

    from dicom_node.sop_classes import STORAGE_SOP_CLASSES

    folder.mkdir(parents=True, exist_ok=True)

    def store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        ds.save_as(folder / f"{ds.Modality}-{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return 0x0000

    ae = AE(ae_title=RECEIVER_AE)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, store)])
    return server, port


def held_out_samples(phantoms: Path, count: int) -> list[Path]:
    """Held-out phantoms to send, abnormal and normal in turn (abnormal first), so the demo
    shows findings as well as normal results."""
    from training.vindr import read_split

    records = sorted(read_split(phantoms, "test"), key=lambda r: r.image_id)
    abnormal = [r.path for r in records if r.abnormal]
    normal = [r.path for r in records if not r.abnormal]
    mixed = [path for pair in zip(abnormal, normal, strict=False) for path in pair]
    rest = abnormal[len(normal):] + normal[len(abnormal):]
    return (mixed + rest)[:count]


def run_demo(settings: Settings, count: int = 3, keep_serving: bool = True,
             setup: list[str] | None = None) -> int:
    """``setup``: a command that installs what training needs (torch and the rest), run while
    the node, already answering, takes the images on a first run (scripts/demo passes
    ``scripts/setup``, having installed only the node's packages); None if they are there."""
    # torch-free: the node answers before the packages that train are installed.
    from training.demo_data import demo_phantoms, ready_demo_bundle

    demo_dir = settings.data_dir.resolve() / "demo"
    own_bundle = settings.bundle is not None
    bundle = settings.bundle or ready_demo_bundle(demo_dir)
    setup_log = demo_dir / "setup.log"
    if bundle is not None and setup:  # the worker needs torch for the bundle: before the node
        _wait_for_setup(_start_setup(setup, setup_log), setup_log)
    received = demo_dir / "received"
    server, receiver_port = _start_receiver(received)
    destination = Destination(ae_title=RECEIVER_AE, host="127.0.0.1", port=receiver_port)
    update = {"bundle": bundle, "destinations": [*settings.destinations, destination]}
    if "study_stable_seconds" not in settings.model_fields_set:
        # The demo sends its study at once: no need to wait the default 30 s for more images.
        update["study_stable_seconds"] = DEMO_STUDY_STABLE_SECONDS
    settings = settings.model_copy(update=update)
    node = _start_node(settings)
    installing = None
    try:
        print(f"demo: node {settings.ae_title}@127.0.0.1:{settings.port} answers C-ECHO; "
              f"results go to {destination.address} ({received})", flush=True)
        if settings.http_port:
            print(f"demo: results page http://{settings.http_bind_address}:{settings.http_port}/"
                  f" ; log in with the operator token {_demo_token(settings)}", flush=True)
        if bundle is None and setup:
            print(f"demo: installing the packages that train while the node takes images "
                  f"({' '.join(setup)}; log {setup_log})", flush=True)
            installing = _start_setup(setup, setup_log)
        if own_bundle:  # not trained on phantoms: plain synthetic radiographs
            from training.synthetic import make_radiograph

            files = [make_radiograph(demo_dir / f"sample-{i}.dcm", rows=1024, columns=820,
                                     seed=i) for i in range(count)]
        else:
            files = held_out_samples(demo_phantoms(demo_dir), count)
        uids = _send(settings, files)
        if settings.bundle is None:
            # First run: the images wait as waiting-for-model while the bundle trains here;
            # the node, started again with it, analyses them (its reconciler re-queues them).
            print("demo: the images wait as waiting-for-model while the bundle trains",
                  flush=True)
            if installing is not None:
                _wait_for_setup(installing, setup_log)
            settings = settings.model_copy(update={"bundle": _train(demo_dir)})
            _stop_node(node)
            node = _start_node(settings)
            print("demo: node started again with the bundle; the waiting images are analysed",
                  flush=True)
        if settings.result_scope == "study":
            print(f"demo: each study is reported once quiet for "
                  f"{settings.study_stable_seconds:.0f} s (SPINENODE_STUDY_STABLE_SECONDS)",
                  flush=True)
        _show_results(settings, uids, received)
        if keep_serving:
            print(f"demo: the node keeps running; send your own images with e.g.\n"
                  f"  storescu -aec {settings.ae_title} 127.0.0.1 {settings.port} FILE.dcm\n"
                  "and list them with '.venv/bin/spinenode instances'. Ctrl-C stops it.",
                  flush=True)
            signal.signal(signal.SIGTERM, lambda *_: node.send_signal(signal.SIGTERM))
            try:
                node.wait()
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        _stop_node(node)
        server.shutdown()
        if installing is not None and installing.poll() is None:
            installing.terminate()


def _start_setup(command: list[str], log: Path) -> subprocess.Popen:
    """Start installing what training needs with ``command`` (quick when it is there), its
    output in ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def _wait_for_setup(process: subprocess.Popen, log: Path) -> None:
    if process.wait() != 0:
        raise RuntimeError(f"installing the packages that train failed (status "
                           f"{process.returncode}); see {log}")


def _train(demo_dir: Path) -> Path:
    import importlib

    importlib.invalidate_caches()  # torch may have been installed since this process started
    from training.demo_bundle import train_demo_bundle

    return train_demo_bundle(demo_dir)


def _start_node(settings: Settings) -> subprocess.Popen:
    """``spinenode serve`` with these settings, once it answers C-ECHO."""
    env = {**os.environ, **settings.as_environment()}
    node = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve"], env=env,
                            start_new_session=True)
    try:
        _wait_for_echo(settings, node)
    except BaseException:
        _stop_node(node)
        raise
    return node


def _stop_node(node: subprocess.Popen) -> None:
    if node.poll() is None:
        node.terminate()
        node.wait(60)


def _demo_token(settings: Settings) -> str:
    """A fresh operator token for the person running the demo (its name says when)."""
    from datetime import datetime

    from dicom_node.db.session import session_factory
    from dicom_node.tokens import create_token

    name = f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    return create_token(session_factory(settings.effective_database_url), name, "operator")


def _send(settings: Settings, files: list[Path]) -> list[str]:
    from pydicom import dcmread

    datasets = [dcmread(path) for path in files]
    assoc = _associate(settings, sorted({str(ds.SOPClassUID) for ds in datasets}))
    if not assoc.is_established:
        raise RuntimeError("the node refused the demo's association")
    for ds in datasets:
        status = assoc.send_c_store(ds)
        print(f"demo: C-STORE {ds.SOPInstanceUID} ({ds.Columns}x{ds.Rows}) -> status "
              f"0x{status.Status:04X}", flush=True)
    assoc.release()
    return [str(ds.SOPInstanceUID) for ds in datasets]


def _show_results(settings: Settings, uids: list[str], received: Path,
                  timeout: float = 300) -> None:
    from sqlalchemy import select

    from dicom_node.db.models import Instance, StudyReport
    from dicom_node.db.session import session_factory
    from dicom_node.outbox import list_deliveries
    from dicom_node.study_reports import studies_to_report

    sessions = session_factory(settings.effective_database_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sessions() as session:
            rows = session.scalars(select(Instance).where(Instance.sop_instance_uid.in_(uids)))
            # Not waiting-for-model: the demo's node has its bundle by now.
            settled = [r for r in rows if r.status in ("done", "failed", "skipped")]
        deliveries = list_deliveries(sessions, limit=1000)
        pending = [d for d in deliveries if d["status"] in ("pending", "sending")]
        # A study's report waits until it has been quiet for study_stable_seconds.
        unreported = (settings.result_scope == "study"
                      and studies_to_report(sessions, stable_seconds=0))
        if len(settled) == len(uids) and not pending and not unreported:
            break
        time.sleep(0.5)
    print("demo: results")
    with sessions() as session:
        for uid in uids:
            instance = session.scalar(select(Instance).filter_by(sop_instance_uid=uid))
            analysis = instance.analyses[-1] if instance and instance.analyses else None
            if analysis is None:
                status = instance.status if instance else "not stored"
                print(f"  {uid}: {status} {instance.last_error if instance else ''}")
                continue
            findings = ", ".join(f"{f.class_name} {f.score:.2f}" for f in analysis.findings)
            print(f"  {uid}: {analysis.label} (p = {analysis.probability:.2f}, threshold "
                  f"{analysis.threshold:.2f}); findings: {findings or 'none'}")
        for report in session.scalars(select(StudyReport).order_by(StudyReport.id)):
            print(f"  study {report.study.study_uid}: {report.label} (highest p = "
                  f"{report.probability:.2f}, {_count(report.image_count, 'image')}, "
                  f"{_count(report.finding_count, 'finding')}), report version "
                  f"{report.version}")
    delivered = [d for d in list_deliveries(sessions, limit=1000) if d["status"] == "delivered"]
    print(f"demo: {len(delivered)} result objects delivered; returned files in {received}:")
    for path in sorted(received.glob("*.dcm")):
        print(f"  {path.name}")


def cmd_demo(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    settings.make_dirs()
    try:
        return run_demo(settings, count=args.count, keep_serving=not args.exit,
                        setup=shlex.split(args.setup) if args.setup else None)
    except RuntimeError as error:
        raise Fatal(f"demo failed: {error}") from None


def add_commands(commands: argparse._SubParsersAction) -> None:
    """demo"""
    demo = commands.add_parser("demo", help="start the node, send it sample images, show results")
    add_settings_flags(demo, server=True)
    demo.add_argument("--count", type=int, default=3, help="images to send (default 3)")
    demo.add_argument("--exit", action="store_true", help="stop the node after the summary")
    demo.add_argument("--setup", metavar="COMMAND",
                      help="installs the packages that train (scripts/demo passes "
                           "scripts/setup); run while the node takes the first images")
    demo.set_defaults(handler=cmd_demo)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
