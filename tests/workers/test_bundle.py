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
    manifest["schema_version"] = 4
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _pickled_schema(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["schema_version"] = 2
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _escape(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["detector"]["weights"] = "../../etc/passwd"
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage,message", [
    (_tamper, "resnet50.pt does not match its SHA-256"),
    (_drop_detector, "weight file yolo11n.pt is missing"),
    (_bad_schema, "unknown TTA"),
    (_future_schema, "schema version 4 is not one of 3"),
    (_pickled_schema, "schema version 2 holds the detector as a pickle"),
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


def test_a_file_swapped_after_the_check_is_refused_before_torch_load(
        test_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes that torch.load gets are the bytes whose SHA-256 was checked, so a file changed
    between load_bundle and the load never reaches the unpickler."""
    import torch

    from workers.detector import Detector

    bundle = load_bundle(_copy(test_bundle, tmp_path))
    detector_file = bundle.file(bundle.manifest.detector.weights)
    detector_file.write_bytes(detector_file.read_bytes() + b"tampered")
    loads: list[object] = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args))
    with pytest.raises(BundleError, match="does not match its SHA-256"):
        Detector(bundle, torch.device("cpu"))
    assert loads == []


class _RunsCode:
    """A pickle that, when loaded without weights_only, writes a file: the attack a pickled
    checkpoint allows."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.write_text, (self.marker, "code ran"))


def test_a_detector_file_that_would_run_code_is_refused_unrun(test_bundle: Path,
                                                             tmp_path: Path) -> None:
    """Someone who can write the bundle (its checksums updated to match, no signature
    required) puts a pickle with code in place of the detector's tensors: loading refuses it in
    one line and the code never runs. The file as written is plain tensors (weights_only)."""
    import torch

    from dicom_node.files import sha256_of
    from workers.detector import Detector

    bundle_dir = _copy(test_bundle, tmp_path)
    name = load_bundle(bundle_dir).manifest.detector.weights
    state = torch.load(bundle_dir / name, weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    marker = tmp_path / "pwned"
    torch.save({"model": _RunsCode(marker)}, bundle_dir / name)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["detector"]["sha256"] = sha256_of(bundle_dir / name)
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"{name} is not the state dict of a yolo11n detector"):
        Detector(load_bundle(bundle_dir), torch.device("cpu"))
    assert not marker.exists()
    torch.load(bundle_dir / name, weights_only=False)  # the same file, loaded unsafely:
    assert marker.read_text() == "code ran"  # the test's attack is real


def test_signed_bundles(test_bundle: Path, tmp_path: Path) -> None:
    """`bundle sign` with an Ed25519 key made by openssl; `bundle verify --key` (and load_bundle
    with SPINENODE_BUNDLE_PUBLIC_KEY's key) refuses an unsigned bundle, one checked against
    another key, and one whose manifest was edited after signing."""
    keys = {}
    for name in ("ours", "theirs"):
        private, public = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub.pem"
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(private)],
                       check=True, capture_output=True)
        subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)],
                       check=True, capture_output=True)
        keys[name] = (private, public)
    bundle = _copy(test_bundle, tmp_path)
    unsigned = _cli("bundle", "verify", str(bundle), "--key", str(keys["ours"][1]))
    assert unsigned.returncode == 2 and "not signed" in unsigned.stderr
    assert _cli("bundle", "sign", str(bundle), "--key", str(keys["ours"][0])).returncode == 0
    good = _cli("bundle", "verify", str(bundle), "--key", str(keys["ours"][1]))
    assert good.returncode == 0 and "signature valid" in good.stdout, good.stderr
    other = _cli("bundle", "verify", str(bundle), "--key", str(keys["theirs"][1]))
    assert other.returncode == 2 and "signature does not match" in other.stderr
    manifest = bundle / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"0.0.1-test"', '"0.0.2-test"'))
    edited = _cli("bundle", "verify", str(bundle), "--key", str(keys["ours"][1]))
    assert edited.returncode == 2 and "signature does not match" in edited.stderr
    with pytest.raises(BundleError, match="signature does not match"):
        load_bundle(bundle, public_key=keys["ours"][1])


def test_a_bundle_made_with_other_major_versions_is_named_so(
        test_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`bundle info` prints what made the bundle, and the worker warns when a library it
    depends on was another major version then than it is now."""
    import logging

    import torch

    from dicom_node.config import Settings
    from workers.bundle import write_manifest
    from workers.runtime import runtime_for

    folder = _copy(test_bundle, tmp_path)
    manifest = load_bundle(folder).manifest
    made_with = {"torch": "1.13.1", "timm": "0.9.2", "numpy": "1.26.4"}
    write_manifest(folder, manifest.model_copy(update={"provenance": {
        **manifest.provenance, "libraries": made_with, "git_commit": "0123abcd"}}))
    info = _cli("bundle", "info", str(folder))
    assert info.returncode == 0, info.stderr
    assert "made with   torch 1.13.1, timm 0.9.2, numpy 1.26.4" in info.stdout
    assert "git_commit: 0123abcd" in info.stdout
    assert f"WARNING     torch 1.13.1 made it, {torch.__version__.split('+')[0]}" in info.stdout
    caplog.set_level(logging.WARNING, logger="workers.runtime")
    runtime_for(Settings(bundle=folder, data_dir=tmp_path / "var"))
    warnings = [r.getMessage() for r in caplog.records if r.name == "workers.runtime"]
    assert any("torch 1.13.1 made it" in w for w in warnings), warnings
    assert any("timm 0.9.2 made it" in w for w in warnings), warnings
    assert not any("numpy" in w for w in warnings)  # recorded, not a reason to warn
