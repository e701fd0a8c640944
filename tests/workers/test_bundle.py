"""The bundle contract: verify/info, and every way a bundle can be unusable, refused in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.node import SPINENODE
from workers.bundle import BundleError, load_bundle


def _copy(test_bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(test_bundle, target)
    return target


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SPINENODE, *args], capture_output=True, text=True, timeout=120)


def test_verify_and_info(test_bundle: Path) -> None:
    verify = _cli("bundle", "verify", str(test_bundle))
    assert verify.returncode == 0, verify.stderr
    assert "spinenode-test 0.0.1-test OK (4 weight files, checksums match)" in verify.stdout
    info = json.loads(_cli("bundle", "info", "--json", str(test_bundle)).stdout)
    assert info["clinical_use"] is False
    assert [m["architecture"] for m in info["classifier"]["members"]] == [
        "densenet121", "tf_efficientnetv2_s", "resnet50"]
    assert info["classifier"]["tta"] == ["identity", "hflip", "rotate+10", "rotate-10",
                                         "zoom1.1"]
    assert info["detector"]["class_names"][1] == "Surgical implant"
    assert (info["detector"]["confidence"], info["detector"]["nms_iou"]) == (0.25, 0.65)
    text = _cli("bundle", "info", str(test_bundle)).stdout
    assert "NOT for clinical use" in text or "NO (not for clinical use)" in text


def _tamper(bundle: Path) -> None:
    weights = bundle / "resnet50.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))


def _drop_detector(bundle: Path) -> None:
    (bundle / "yolo11n.pt").unlink()


def _bad_schema(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["classifier"]["tta"].append("solarize")
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _future_schema(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["schema_version"] = 3
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _escape(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["detector"]["weights"] = "../../etc/passwd"
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage,message", [
    (_tamper, "resnet50.pt does not match its SHA-256"),
    (_drop_detector, "weight file yolo11n.pt is missing"),
    (_bad_schema, "unknown TTA"),
    (_future_schema, "schema version 3 is not one of 1, 2"),
    (_escape, "is outside the bundle"),
    (lambda bundle: (bundle / "manifest.json").unlink(), "no manifest.json"),
])
def test_unusable_bundle_is_refused_in_one_line(test_bundle: Path, tmp_path: Path, damage,
                                                message: str) -> None:
    bundle = _copy(test_bundle, tmp_path)
    damage(bundle)
    with pytest.raises(BundleError, match=message.replace("(", r"\(")):
        load_bundle(bundle)
    result = _cli("bundle", "verify", str(bundle))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr


def test_worker_refuses_a_tampered_bundle_at_start(test_bundle: Path, tmp_path: Path,
                                                   sqlite_url: str) -> None:
    import os

    bundle = _copy(test_bundle, tmp_path)
    _tamper(bundle)
    env = {**os.environ, "SPINENODE_DATA_DIR": str(tmp_path / "var"),
           "SPINENODE_DATABASE_URL": sqlite_url, "SPINENODE_BUNDLE": str(bundle)}
    subprocess.run([*SPINENODE, "db", "upgrade"], env=env, check=True, capture_output=True)
    result = subprocess.run([*SPINENODE, "worker"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("does not match its SHA-256 (damaged or tampered)")
    assert result.stderr.strip().count("\n") == 0


def test_schema_1_precisions_apply_to_both_components(test_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(test_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["schema_version"] = 1
    manifest["validated_precisions"] = ["float32", "bfloat16"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    validated = load_bundle(bundle).manifest.validated_precisions
    assert validated.classifier == validated.detector == ["float32", "bfloat16"]
