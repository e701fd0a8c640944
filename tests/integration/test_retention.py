"""Retention against a running node on PostgreSQL: once an image is finished and its overlay and
its study's SR are delivered and old enough (or over a total size), `spinenode purge --dry-run`
lists them, the reconciler purges them (the spool file keeps its header, the overlay goes, the SR
keeps its header without its content, each purge an event), rows stay, and an image still
waiting (no bundle) is never touched, by age or by size."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from pydicom import dcmread

from tests.support.fault_peers import Pacs
from tests.support.node import SPINENODE, NodeProcess, shown, storescu, wait_for
from training.synthetic import make_radiograph


def _cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*SPINENODE, *args], env=node.env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


def test_retention_purges_finished_pixel_data_and_delivered_overlays(
        tmp_path: Path, postgres_url: str, test_bundle: Path, start_node) -> None:
    pacs = Pacs(tmp_path / "pacs")
    pacs.start()
    retention = {"SPINENODE_SPOOL_RETENTION_DAYS": str(4 / 86400),  # four seconds
                 "SPINENODE_OUTPUTS_RETENTION_DAYS": str(4 / 86400)}
    try:
        node = start_node(postgres_url, env={
            "SPINENODE_BUNDLE": str(test_bundle), "SPINENODE_DESTINATIONS": pacs.destination,
            "SPINENODE_RECONCILE_INTERVAL_SECONDS": "600",  # purges only when the test says
            **retention})
        source = make_radiograph(tmp_path / "a.dcm")
        assert storescu(node.port, [source]).returncode == 0

        uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)

        def show() -> dict:
            return json.loads(_cli(node, "show", uid, "--json").stdout)

        def delivered() -> bool:
            found = shown(node.database_url, uid)
            if found is None:
                return False
            analysis = found["instances"][0]["analysis"]
            objects = (analysis["objects"] if analysis else []) + [
                o for r in found["reports"] for o in r["objects"]]
            return len(objects) == 2 and all(
                d["status"] == "delivered" for o in objects for d in o["deliveries"])
        wait_for(delivered, 120, interval=1, what="analysed, reported and delivered")
        study = show()
        overlay = next(o for o in study["instances"][0]["analysis"]["objects"]
                       if o["kind"] == "sc")
        overlay_path = node.data_dir / "outputs" / f"{overlay['sop_instance_uid']}.dcm"
        (report,) = study["reports"]
        sr_path = node.data_dir / "outputs" / f"{report['objects'][0]['sop_instance_uid']}.dcm"
        assert sr_path.exists() and "ContentSequence" in dcmread(sr_path)
        spool_files = [p for p in (node.data_dir / "spool").rglob("*.dcm")
                       if "incoming" not in p.parts]
        assert overlay_path.exists() and len(spool_files) == 1
    finally:
        pacs.stop()
    node.stop()
    # By total size alone (no age rule): the oldest object goes once the outputs exceed the cap
    # (the SR, made after the overlay, is kept first); the same for the spool.
    outputs = overlay_path.stat().st_size + sr_path.stat().st_size
    spool = spool_files[0].stat().st_size
    by_size = {k: v for k, v in node.env.items() if not k.endswith("_RETENTION_DAYS")}
    for setting, total, path, why in (("OUTPUTS", outputs, overlay_path, "outputs over"),
                                      ("SPOOL", spool, spool_files[0], "spool over")):
        for cap, listed in ((total + 1, False), (total - 1, True)):
            env = {**by_size, f"SPINENODE_{setting}_RETENTION_MAX_MB": str(cap / 2**20)}
            out = subprocess.run([*SPINENODE, "purge", "--dry-run"], capture_output=True,
                                 text=True, env=env, timeout=60).stdout
            assert (str(path) in out) == listed and (why in out) == listed, out
            assert str(sr_path) not in out
    # Old enough: the dry run lists both and removes nothing.
    dry = wait_for(lambda: (lambda out: out if "would purge spool" in out
                            and "would purge output" in out else None)(
        _cli(node, "purge", "--dry-run").stdout), 30, interval=1, what="old enough")
    assert str(overlay_path) in dry and str(sr_path) in dry
    assert overlay_path.exists() and "PixelData" in dcmread(spool_files[0])

    # A node without a bundle: its image waits for a model (pending: never purged), and its
    # reconciler purges the finished one's pixel data and overlay.
    waiting = NodeProcess(node.data_dir, postgres_url, env={
        "SPINENODE_RECONCILE_INTERVAL_SECONDS": "1", **retention}).start()
    try:
        pending = make_radiograph(tmp_path / "b.dcm", seed=2)
        assert storescu(waiting.port, [pending]).returncode == 0
        wait_for(lambda: not overlay_path.exists(), 30, interval=0.5,
                 what="the reconciler's purge")
        header = dcmread(spool_files[0])
        assert "PixelData" not in header and header.SOPInstanceUID  # the header stays
        wait_for(lambda: "ContentSequence" not in dcmread(sr_path), 30, interval=0.5,
                 what="the SR's content purged")
        assert dcmread(sr_path).SOPInstanceUID == report["objects"][0]["sop_instance_uid"]
        events = [e for e in show()["instances"][0]["events"] if e["event"] == "purged"]
        assert sorted(e["detail"].split(" (")[0] for e in events) == [
            "pixel data removed", "report content removed", "sc object removed"]
        time.sleep(5)  # the waiting image is now older than the retention too
        rows = json.loads(_cli(waiting, "instances", "--json").stdout)
        assert sorted(r["status"] for r in rows) == ["done", "waiting-for-model"]
        pending_file = [p for p in (node.data_dir / "spool").rglob("*.dcm")
                        if p != spool_files[0] and "incoming" not in p.parts]
        assert len(pending_file) == 1 and "PixelData" in dcmread(pending_file[0])
        # Nor by size: a spool cap of one byte lists nothing that waits.
        tiny = {**waiting.env, "SPINENODE_SPOOL_RETENTION_MAX_MB": str(1 / 2**20)}
        out = subprocess.run([*SPINENODE, "purge", "--dry-run"], capture_output=True,
                             text=True, env=tiny, timeout=60).stdout
        assert str(pending_file[0]) not in out
    finally:
        waiting.stop()
