"""Intake benchmark: DCMTK storescu -> our node vs. DCMTK storescp, same images, same run.

100 synthetic 2500x2000 12-bit DX images (about 10 MB each) over one association, or shared
among --senders storescu sending at once. Our node does its full intake (header checks, SHA-256,
fsync, atomic rename, DB commit, enqueue); the reference is `storescp +B -pdu 131072` (with
--fork for several senders) writing the same data sets to disk, without fsync. Each round gets a
fresh node, database and folder; the figures are medians over the rounds. Beside MB/s, each
server's CPU-seconds per 100 MB (all its processes): on a shared 2-core machine the senders and
the server compete for the cores, and that is what the server's share costs.

    .venv/bin/python benchmarks/intake.py [--images 100] [--rounds 3] [--database postgresql]
                                          [--senders 4] [--intake-processes 2]

Needs DCMTK (storescu/storescp), and for --database postgresql a PostgreSQL server and Redis as
the tests use them (scripts/services starts both).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import psycopg
from pydicom import dcmread
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu  # noqa: E402
from dicom_node.cli.common import free_port  # noqa: E402
from tests.support.dcmtk import put_dcmtk_first_on_path  # noqa: E402
from training.synthetic import make_radiograph  # noqa: E402

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/14"


def make_images(folder: Path, count: int) -> list[Path]:
    template = dcmread(make_radiograph(folder / "template.dcm", rows=2500, columns=2000,
                                       bits_stored=12))
    paths = []
    for index in range(count):
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        template.InstanceNumber = index + 1
        path = folder / f"{index:04d}.dcm"
        template.save_as(path)
        paths.append(path)
    (folder / "template.dcm").unlink()
    return paths


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port}")


def wait_for_listeners(port: int, count: int, timeout: float = 60) -> None:
    """Wait until COUNT sockets listen on PORT (the node's intake processes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                                 text=True).stdout
        if len(listing.splitlines()) >= count:
            return
        time.sleep(0.2)
    raise RuntimeError(f"fewer than {count} processes listen on port {port}")


def send(port: int, called_ae: str, files: list[Path], senders: int) -> float:
    """Seconds for ``senders`` storescu at once, each sending its share of the files over one
    association."""
    start = time.perf_counter()
    processes = [subprocess.Popen(["storescu", "-aec", called_ae, "127.0.0.1", str(port),
                                   *map(str, files[index::senders])],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for index in range(senders)]
    for process in processes:
        _, errors = process.communicate()
        if process.returncode:
            raise RuntimeError(f"storescu failed: {errors.decode(errors='replace')[-500:]}")
    return time.perf_counter() - start


def tree_cpu_seconds(pid: int) -> float:
    """CPU-seconds (user + system) of a process and all its descendants, the ended ones it
    waited for included (storescp --fork's per-association children)."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def round_storescp(files: list[Path], work: Path, senders: int) -> tuple[float, float]:
    """(seconds, the server's CPU-seconds) for the files."""
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    fork = ["--fork"] if senders > 1 else []  # a process per association, else one at a time
    process = subprocess.Popen(["storescp", "+B", *fork, "-pdu", "131072", "-od", str(out),
                                str(port)], start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        seconds = send(port, "ANY-SCP", files, senders)
        cpu_seconds = tree_cpu_seconds(process.pid)
    finally:
        stop(process)
    assert len(list(out.iterdir())) == len(files), "storescp did not store every image"
    shutil.rmtree(out)
    return seconds, cpu_seconds


def round_node(files: list[Path], work: Path, database: str, senders: int,
               processes: int) -> tuple[float, float]:
    """(seconds, the node's CPU-seconds: all its processes) for the files."""
    data_dir = work / "node"
    env = {**os.environ, "SPINENODE_DATA_DIR": str(data_dir),
           "SPINENODE_LOG_LEVEL": "WARNING", "SPINENODE_INTAKE_PROCESSES": str(processes)}
    name = None
    if database == "postgresql":
        name = f"spinenode_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        env["SPINENODE_DATABASE_URL"] = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
        env["SPINENODE_BROKER_URL"] = REDIS_URL
        import redis

        redis.Redis.from_url(REDIS_URL).flushdb()
    port = free_port()
    env["SPINENODE_PORT"] = str(port)
    env["SPINENODE_HTTP_PORT"] = "0"  # intake alone
    cli = [sys.executable, "-m", "dicom_node.cli"]
    subprocess.run([*cli, "db", "upgrade"], env=env, check=True, capture_output=True)
    # No worker: the benchmark measures intake, not decoding competing for the two cores.
    process = subprocess.Popen([*cli, "serve", "--no-worker"], env=env, cwd=ROOT,
                               start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        wait_for_listeners(port, processes)
        before = tree_cpu_seconds(process.pid)  # starting up is not intake
        seconds = send(port, "SPINENODE", files, senders)
        cpu_seconds = tree_cpu_seconds(process.pid) - before
        status = subprocess.run([*cli, "status", "--json"], env=env, check=True,
                                capture_output=True, text=True).stdout
    finally:
        stop(process)
        if name:
            with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    import json

    counts = json.loads(status)["instances"]
    stored = counts["received"] + counts["queued"]
    assert stored == len(files), f"node recorded {stored} of {len(files)}: {counts}"
    shutil.rmtree(data_dir)
    return seconds, cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--senders", type=int, default=1,
                        help="storescu sending at once, each over its own association "
                             "(the reference runs storescp --fork then)")
    parser.add_argument("--intake-processes", type=int, default=1,
                        help="the node's SPINENODE_INTAKE_PROCESSES")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where images and received files go (default: a temp dir)")
    args = parser.parse_args()
    put_dcmtk_first_on_path()
    with tempfile.TemporaryDirectory(dir=args.work_dir) as folder:
        work = Path(folder)
        images = work / "images"
        images.mkdir()
        files = make_images(images, args.images)
        megabytes = sum(path.stat().st_size for path in files) / 1e6
        print(f"CPU: {cpu()}")
        print(f"{len(files)} images, {megabytes:.0f} MB in all, {args.senders} association(s) "
              f"at once each round, {args.intake_processes} intake process(es)")
        ours, reference = [], []  # (seconds, CPU-seconds) per round
        for index in range(args.rounds):  # interleaved, so drift hits both alike
            reference.append(round_storescp(files, work, args.senders))
            ours.append(round_node(files, work, args.database, args.senders,
                                   args.intake_processes))
            print(f"round {index + 1}: storescp {megabytes / reference[-1][0]:7.1f} MB/s "
                  f"{per_100_mb(reference[-1][1], megabytes):5.2f} CPU-s/100 MB   "
                  f"spinenode ({args.database}) {megabytes / ours[-1][0]:7.1f} MB/s "
                  f"{per_100_mb(ours[-1][1], megabytes):5.2f} CPU-s/100 MB", flush=True)
    ours_rate = megabytes / statistics.median(seconds for seconds, _ in ours)
    reference_rate = megabytes / statistics.median(seconds for seconds, _ in reference)
    ours_cpu = per_100_mb(statistics.median(cpu for _, cpu in ours), megabytes)
    reference_cpu = per_100_mb(statistics.median(cpu for _, cpu in reference), megabytes)
    fork = " --fork" if args.senders > 1 else ""
    print(f"median: storescp +B{fork} {reference_rate:.1f} MB/s, spinenode ({args.database}: "
          f"spool + DB + enqueue) {ours_rate:.1f} MB/s, ratio {ours_rate / reference_rate:.2f} "
          "(goal >= 1.0)")
    print(f"server CPU-seconds per 100 MB (all its processes): storescp {reference_cpu:.2f}, "
          f"spinenode {ours_cpu:.2f} ({ours_cpu / reference_cpu:.1f}x)")


def per_100_mb(cpu_seconds: float, megabytes: float) -> float:
    return 100 * cpu_seconds / megabytes

if __name__ == "__main__":
    main()
