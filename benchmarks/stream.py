"""Hold a stream: radiographs sent at a fixed rate into the node on the embedded default.

The node runs as `spinenode serve` on SQLite with its embedded queue and one worker, with the
demo bundle (scripts/demo makes it) and a local receiver as its PACS. First warm-up images one
at a time (the models load, and the C-STORE -> SR time of an image alone), then a burst of
`--burst` sent at once: the time until their last SR arrived, per image, is what the node needs
per image in all (intake, decode, models, overlay, SR, two deliveries), next to the model time
alone (decode + DERNet + YOLO, from the analyses). Then a modality sends one 2500x2000 12-bit DX
(a study of its own, one association each) every `--headroom` x that per-image time for
`--minutes`. Printed: C-STORE -> SR (and SC) arrival p50/p95/p99,
the queue depth over time (it must not grow), CPU and RSS of each process of the node (RSS must
not grow: no leak), beside the per-image model time of the same run.

    .venv/bin/python benchmarks/stream.py [--minutes 10] [--bundle var/demo/bundle]

Intake alone with several senders at once against `storescp --fork`:
`benchmarks/intake.py --senders 4`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu  # noqa: E402
from dicom_node.cli.common import free_port  # noqa: E402
from dicom_node.db.models import Analysis, Instance  # noqa: E402
from dicom_node.db.session import session_factory  # noqa: E402
from dicom_node.sop_classes import STORAGE_SOP_CLASSES  # noqa: E402
from tests.support.node import NodeProcess, wait_for  # noqa: E402
from training.synthetic import make_radiograph  # noqa: E402

WAITING = ("received", "queued", "processing")
_SR_CLASSES = "1.2.840.10008.5.1.4.1.1.88."
_SC_CLASSES = "1.2.840.10008.5.1.4.1.1.7"
SAMPLE_SECONDS = 5.0
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Receiver:
    """The node's PACS: when each result object arrived, by study and modality."""

    def __init__(self) -> None:
        self.arrived: dict[tuple[str, str], float] = {}  # (study UID, "SR"/"SC") -> time
        ae = AE(ae_title="STREAMPACS")
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class)
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        sop_class = str(ds.SOPClassUID)
        kind = ("SR" if sop_class.startswith(_SR_CLASSES) else
                "SC" if sop_class.startswith(_SC_CLASSES) else sop_class)
        self.arrived.setdefault((str(ds.StudyInstanceUID), kind), time.monotonic())
        return 0x0000


class Modality:
    """Sends copies of one radiograph, each a new study, one association each."""

    def __init__(self, template: Dataset, port: int) -> None:
        self.template = template
        self.port = port
        self.sent: dict[str, float] = {}  # study UID -> when its C-STORE began
        self.statuses: list[int] = []

    def send_one(self) -> str:
        ds = self.template
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        started = time.monotonic()
        association = ae.associate("127.0.0.1", self.port, ae_title="SPINENODE")
        status = association.send_c_store(ds) if association.is_established else None
        if association.is_established:
            association.release()
        self.statuses.append(status.Status if status else -1)
        self.sent[str(ds.StudyInstanceUID)] = started
        return str(ds.StudyInstanceUID)


def _descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += parents.get(pid, [])
    return found


@dataclass
class ProcessSamples:
    name: str
    rss_mb: list[float] = field(default_factory=list)
    cpu_seconds: list[tuple[float, float]] = field(default_factory=list)  # (wall, cpu)


def _sample_process(pid: int, samples: dict[int, ProcessSamples]) -> None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmdline = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except OSError:
        return
    name = " ".join(part for part in cmdline.split() if not part.startswith("/"))[:60]
    entry = samples.setdefault(pid, ProcessSamples(f"{pid} {name}"))
    entry.rss_mb.append(int(stat[21]) * PAGE / 1e6)
    entry.cpu_seconds.append((time.monotonic(), (int(stat[11]) + int(stat[12])) / TICKS))


class Sampler(threading.Thread):
    """Every SAMPLE_SECONDS: the queue depth and each node process's RSS and CPU time."""

    def __init__(self, node_pid: int, database_url: str) -> None:
        super().__init__(daemon=True)
        self.node_pid = node_pid
        self.sessions = session_factory(database_url)
        self.depth: list[tuple[float, int]] = []
        self.processes: dict[int, ProcessSamples] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_SECONDS):
            with self.sessions() as session:
                depth = session.scalar(select(func.count()).select_from(Instance)
                                       .where(Instance.status.in_(WAITING)))
            self.depth.append((time.monotonic(), depth or 0))
            for pid in _descendants(self.node_pid):
                _sample_process(pid, self.processes)


def model_seconds(database_url: str, since_id: int = 0) -> list[float]:
    """Decode + classify + detect of each analysis after ``since_id``."""
    with session_factory(database_url)() as session:
        return [a.decode_seconds + a.classify_seconds + a.detect_seconds
                for a in session.scalars(select(Analysis).where(Analysis.id > since_id))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--bundle", type=Path, default=ROOT / "var" / "demo" / "bundle")
    parser.add_argument("--warm-up", type=int, default=3, help="images sent one at a time first")
    parser.add_argument("--burst", type=int, default=10,
                        help="images sent at once to measure the per-image time")
    parser.add_argument("--headroom", type=float, default=1.25,
                        help="interval = headroom x the measured per-image time")
    args = parser.parse_args()
    if not (args.bundle / "manifest.json").is_file():
        sys.exit(f"no bundle at {args.bundle}: run scripts/demo first (it makes the demo bundle)"
                 " or pass --bundle")
    print(f"CPU: {cpu()}")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        template = dcmread(make_radiograph(work / "dx.dcm", rows=2500, columns=2000,
                                           bits_stored=12, seed=3))
        receiver = Receiver()
        database_url = f"sqlite:///{work / 'var' / 'spinenode.sqlite'}"
        node = NodeProcess(work / "var", database_url, env={
            "SPINENODE_BUNDLE": str(args.bundle.resolve()), "SPINENODE_LOG_LEVEL": "WARNING",
            "SPINENODE_DESTINATIONS": f"STREAMPACS@127.0.0.1:{receiver.port}"})
        try:
            node.start()
            modality = Modality(template, node.port)
            for _ in range(args.warm_up):  # one at a time: loads the models
                study = modality.send_one()
                wait_for(lambda study=study: (study, "SR") in receiver.arrived, 600,
                         what="a warm-up image's SR")
            unloaded = [receiver.arrived[(s, "SR")] - t for s, t in modality.sent.items()][1:]
            started = time.monotonic()
            burst = [modality.send_one() for _ in range(args.burst)]
            wait_for(lambda: all((s, "SR") in receiver.arrived for s in burst), 900,
                     what="the burst's SRs")
            per_image = (max(receiver.arrived[(s, "SR")] for s in burst) - started) / args.burst
            model = statistics.median(model_seconds(database_url)[1:])  # [0] loaded the models
            interval = args.headroom * per_image
            print(f"per image: {per_image:.2f} s in all (a burst of {args.burst}), of which the "
                  f"models {model:.2f} s (decode + DERNet + YOLO); stream: one image every "
                  f"{interval:.2f} s for {args.minutes:g} min; study stable time 2 s")
            with session_factory(database_url)() as session:
                last_warm_up = session.scalar(select(func.max(Analysis.id))) or 0
            sampler = Sampler(node.process.pid, database_url)
            sampler.start()
            streamed: list[str] = []
            start = time.monotonic()
            next_send = start
            while time.monotonic() < start + args.minutes * 60:
                streamed.append(modality.send_one())
                next_send += interval
                time.sleep(max(0.0, next_send - time.monotonic()))
            stream_seconds = time.monotonic() - start
            wait_for(lambda: all((s, "SR") in receiver.arrived for s in streamed), 900,
                     interval=1, what="every streamed image's SR")
            sampler.stopped.set()
            sampler.join()
            report(modality, receiver, streamed, sampler, unloaded, stream_seconds,
                   model_seconds(database_url, last_warm_up), model)
            print_trouble(node.log())
        finally:
            node.stop()
            receiver.server.shutdown()


def print_trouble(log: str) -> None:
    """The node's warnings and errors, each traceback whole (it says why, its last line what)."""
    lines, trouble, in_traceback = log.splitlines(), [], False
    for line in lines:
        if line.startswith("Traceback"):
            in_traceback = True
        elif in_traceback and not line.startswith((" ", "\t")):
            trouble.append(line)  # the exception's own line ends the traceback
            in_traceback = False
            continue
        if in_traceback or " WARNING " in line or " ERROR " in line:
            trouble.append(line)
    print(f"the node's warnings, errors and tracebacks during the run ({len(trouble)} lines):")
    for line in trouble[:80]:
        print(f"  {line[:300]}")


def report(modality: Modality, receiver: Receiver, streamed: list[str], sampler: Sampler,
           unloaded: list[float], stream_seconds: float, model: list[float],
           per_image: float) -> None:
    refused = sum(status != 0 for status in modality.statuses)
    print(f"sent {len(streamed)} images in {stream_seconds:.0f} s; refused or unanswered: "
          f"{refused}")
    for kind in ("SR", "SC"):
        waits = [receiver.arrived[(s, kind)] - modality.sent[s] for s in streamed
                 if (s, kind) in receiver.arrived]
        if waits:
            print(f"C-STORE -> {kind} arrived ({len(waits)}): p50 {percentile(waits, 0.5):.1f} s"
                  f"  p95 {percentile(waits, 0.95):.1f} s  p99 {percentile(waits, 0.99):.1f} s")
    print(f"reference, same run: model time per image during the stream: median "
          f"{statistics.median(model):.2f} s (before it {per_image:.2f} s); one image alone, "
          f"C-STORE -> SR: {statistics.median(unloaded):.1f} s")
    depths = [depth for _, depth in sampler.depth]
    half = len(depths) // 2
    first, second = statistics.mean(depths[:half] or [0]), statistics.mean(depths[half:] or [0])
    print(f"queue depth every {SAMPLE_SECONDS:.0f} s: {depths}")
    print(f"queue depth: mean first half {first:.1f}, second half {second:.1f}, max "
          f"{max(depths, default=0)}: {'steady' if second <= first + 1 else 'GROWING'}")
    print("process                                                        CPU %   RSS MB "
          "(start -> end, max)")
    for entry in sampler.processes.values():
        (wall0, cpu0), (wall1, cpu1) = entry.cpu_seconds[0], entry.cpu_seconds[-1]
        share = 100 * (cpu1 - cpu0) / (wall1 - wall0) if wall1 > wall0 else 0.0
        rss = entry.rss_mb
        # Growth from the first quarter to the last: a leak grows, a warm cache levels off.
        quarter = max(1, len(rss) // 4)
        early, late = statistics.mean(rss[:quarter]), statistics.mean(rss[-quarter:])
        verdict = "steady" if late <= early * 1.10 + 20 else "GROWING"
        print(f"{entry.name:62s} {share:5.0f}   {rss[0]:.0f} -> {rss[-1]:.0f}, "
              f"{max(rss):.0f}  {verdict}")


if __name__ == "__main__":
    main()
