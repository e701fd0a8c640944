"""The whole fuzz corpus against a running node, and against DCMTK's storescp as the reference.

    .venv/bin/python benchmarks/fuzz.py [--count 2000] [--seed 1] [--database postgresql]
    .venv/bin/python benchmarks/fuzz.py --only 188     # replay one input and show the answer

Each input (tests/support/fuzz.py: malformed data sets, C-STORE commands, P-DATA and
A-ASSOCIATE-RQs, decompression bombs) is one association sent byte for byte, followed by a
C-ECHO. Prints, for spinenode and for `storescp` on the same inputs: inputs sent, answered
(status, abort, reject or close: anything but silence), acknowledged (0x0000), answers that are
wrong (silence, a status PS3.4 has not, "retry later" to broken input), C-ECHO failures, and
the peak memory of the node's process tree. Then what became of the images the node
acknowledged. Needs DCMTK, and PostgreSQL for the default database.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu  # noqa: E402
from dicom_node.cli.common import free_port  # noqa: E402
from tests.support.dcmtk import put_dcmtk_first_on_path  # noqa: E402
from tests.support.fuzz import (  # noqa: E402
    SEED,
    Campaign,
    corpus,
    good_input,
    make_input,
    replay,
    run_campaign,
)  # noqa: E402
from tests.support.node import (  # noqa: E402
    POSTGRES_ADMIN_URL,
    NodeProcess,
    wait_for,
    wait_until_settled,
)


def run_storescp(items: list, work: Path) -> Campaign:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    process = subprocess.Popen(["storescp", "-od", str(out), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: subprocess.run(["echoscu", "127.0.0.1", str(port)],
                                        capture_output=True).returncode == 0, 30,
                 what="storescp")
        # storescp serves one association at a time and waits out what never ends: a shorter
        # wait keeps the reference to minutes (it is a slice of the corpus, said so below).
        return run_campaign(port, process.pid, items, answer_within=10.0)
    finally:
        process.terminate()
        process.wait(30)


def run_node(items: list, work: Path, database: str) -> tuple[Campaign, Counter]:
    name = None
    if database == "postgresql":
        name = f"spinenode_fuzz_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    else:
        (work / "node").mkdir()
        url = f"sqlite:///{work / 'node' / 'spinenode.sqlite'}"
    node = NodeProcess(work / "node", url, env={"SPINENODE_LOG_LEVEL": "WARNING"}).start()
    try:
        # Warm up: the worker started and a decode done, so that memory is measured from there.
        assert replay(node.port, good_input(work / "corpus")).status == 0
        wait_until_settled(url, 1, timeout=120)
        campaign = run_campaign(node.port, node.process.pid, items, progress=_progress)
        print(file=sys.stderr)
        rows = wait_until_settled(url, 1, timeout=300)
        return campaign, Counter(row.status for row in rows)
    finally:
        node.stop()
        if name:
            with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _progress(campaign: Campaign) -> None:
    if campaign.sent % 100 == 0:
        print(f"  {campaign.sent} sent, {len(campaign.problems)} answered wrongly",
              file=sys.stderr)


def report(name: str, campaign: Campaign) -> str:
    mib = 2**20
    return (f"{name:<48} {campaign.sent:>5} {campaign.answered:>9} {campaign.acknowledged:>6} "
            f"{len(campaign.problems):>6} {len(campaign.echo_failures):>6} "
            f"{campaign.rss_first / mib:>7.0f} {campaign.rss_peak / mib:>7.0f} "
            f"{campaign.rss_last / mib:>7.0f} {campaign.seconds:>7.0f}")


def _kinds(counts: Counter) -> str:
    """'abort 12, status 0x0000 30, ...' from (kind, status) counts."""
    return ", ".join(f"{kind}{'' if status is None else f' {status:#06x}'} {n}"
                     for (kind, status), n in sorted(counts.items(), key=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--database", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--only", type=int, help="replay this one input and show the answer")
    parser.add_argument("--reference-every", type=int, default=13,
                        help="storescp gets every Nth input (0: none)")
    args = parser.parse_args()
    put_dcmtk_first_on_path()
    with tempfile.TemporaryDirectory(prefix="spinenode-fuzz-") as folder:
        work = Path(folder)
        if args.only is not None:
            item = make_input(args.seed, args.only, work / "corpus")
            node = NodeProcess(work / "node", f"sqlite:///{work / 'spinenode.sqlite'}").start()
            try:
                print(item.family, item.what, replay(node.port, item))
            finally:
                node.stop()
                print(node.log()[-4000:])
            return
        start = time.monotonic()
        items = list(corpus(args.seed, args.count, work / "corpus"))
        print(f"CPU: {cpu()}")
        print(f"corpus: seed {args.seed}, {len(items)} inputs, made in "
              f"{time.monotonic() - start:.1f} s; families "
              f"{dict(Counter(item.family for item in items))}")
        ours, statuses = run_node(items, work, args.database)
        sliced = items[::args.reference_every] if args.reference_every else []
        theirs = run_storescp(sliced, work) if sliced else None
        print(f"\n{'peer':<48} {'sent':>5} {'answered':>9} {'ack':>6} {'wrong':>6} "
              f"{'noecho':>6} {'MiB@0':>7} {'peak':>7} {'end':>7} {'s':>7}")
        print(report(f"spinenode ({args.database})", ours))
        if theirs is not None:
            print(report(f"storescp (every {args.reference_every}th input, 10 s wait)", theirs))
            on_slice = Counter(ours.by_input[item.index] for item in sliced)
            print(f"same {len(sliced)} inputs, spinenode: {_kinds(on_slice)}")
            reference = Counter(theirs.by_input.values())
            print(f"same {len(sliced)} inputs, storescp:  {_kinds(reference)}")
        print("\nspinenode replies by family:")
        for (family, kind, status), n in sorted(ours.replies.items(), key=str):
            print(f"  {family:<30} {kind:<9} {'' if status is None else f'{status:#06x}':<7} {n}")
        print(f"images the node acknowledged, where they ended: {dict(statuses)}")
        for problem in ours.problems[:40]:
            print("WRONG:", problem)


if __name__ == "__main__":
    main()
