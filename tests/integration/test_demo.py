"""`spinenode demo` end to end (with the test bundle, so no training here): images go in over
C-STORE, the SR and SC come back to the demo's receiver, the summary says what was found."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.node import SPINENODE, free_port


def test_demo_shows_results_coming_back(tmp_path: Path, test_bundle: Path) -> None:
    http_port = free_port()
    env = {**os.environ, "SPINENODE_DATA_DIR": str(tmp_path / "var"),
           "SPINENODE_BUNDLE": str(test_bundle), "SPINENODE_HTTP_PORT": str(http_port)}
    result = subprocess.run([*SPINENODE, "demo", "--exit", "--count", "2", "--port",
                             str(free_port())], env=env, capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.count("-> status 0x0000") == 2
    assert out.count("(p = ") == 2 and "findings:" in out
    assert "4 result objects delivered" in out
    assert f"results page http://127.0.0.1:{http_port}/ ; log in with the operator token sn_" \
        in out
    received = sorted((tmp_path / "var" / "demo" / "received").glob("*.dcm"))
    assert [path.name[:3] for path in received] == ["OT-", "OT-", "SR-", "SR-"]


def test_demo_reuses_its_bundle_only_under_the_same_recipe(
        tmp_path: Path, test_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from training import demo_data as demo
    from workers.bundle import load_bundle, write_manifest

    folder = tmp_path / "demo"
    shutil.copytree(test_bundle, folder / "bundle")
    manifest = load_bundle(folder / "bundle").manifest
    write_manifest(folder / "bundle", manifest.model_copy(update={"version": demo.DEMO_VERSION}))
    (folder / "recipe").write_text(demo.DEMO_VERSION)
    assert demo.ready_demo_bundle(folder) == folder / "bundle"  # no training

    # A bundle from an older recipe is not reused: the build starts from a clean folder.
    write_manifest(folder / "bundle", manifest.model_copy(update={"version": "0.0.1-old"}))
    assert demo.ready_demo_bundle(folder) is None
    (folder / "recipe").write_text("0.0.1-old")
    (folder / "run").mkdir()
    (folder / "run" / "stale").write_text("from the old recipe")

    def stop(*_: object, **__: object) -> None:  # the build's first step: stop it there
        raise RuntimeError("would generate")

    monkeypatch.setattr(demo, "generate", stop)
    with pytest.raises(RuntimeError, match="would generate"):
        demo.demo_phantoms(folder)
    assert not (folder / "run").exists() and not (folder / "bundle").exists()
    assert (folder / "recipe").read_text() == demo.DEMO_VERSION


def test_demo_sends_abnormal_and_normal_phantoms_in_turn(tmp_path: Path) -> None:
    from dicom_node.cli.demo import held_out_samples
    from training.phantoms import generate
    from training.vindr import read_split

    data = generate(tmp_path / "data", train=2, test=12, height=96, width=64, seed=1)
    abnormal = {r.path: r.abnormal for r in read_split(data, "test")}
    assert 0 < sum(abnormal.values()) < len(abnormal)
    chosen = held_out_samples(data, 3)
    assert [abnormal[path] for path in chosen] == [True, False, True]
    everything = held_out_samples(data, 100)
    assert sorted(everything) == sorted(abnormal)  # each once


def test_the_demo_node_takes_images_before_its_bundle_exists(
        tmp_path: Path, test_bundle: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """First run: the node answers and stores while the packages that train are installed and
    the bundle trains; the images wait as waiting-for-model and are analysed once the node has
    the bundle. The set-up and the training are stand-ins here (the training is tested in
    tests/training); the node and the demo are real."""
    import shutil
    import sys

    from dicom_node.cli.demo import run_demo
    from dicom_node.config import load_settings
    from tests.support.node import instances, wait_for
    from training import demo_bundle, demo_data
    from training.phantoms import generate

    settings = load_settings(data_dir=tmp_path / "var", port=free_port(), http_port=0,
                             study_stable_seconds=2)
    url = settings.effective_database_url
    held: list[set[str]] = []
    installed = tmp_path / "installed"

    def stand_in_training(folder: Path) -> Path:
        assert installed.exists()  # the set-up has ended before the training starts
        wait_for(lambda: {row.status for row in instances(url)} == {"waiting-for-model"}, 120,
                 what="the images to wait for a model")
        held.append({row.status for row in instances(url)})
        shutil.copytree(test_bundle, folder / "bundle")
        return folder / "bundle"

    monkeypatch.setattr(demo_data, "demo_phantoms", lambda folder: generate(
        folder / "phantoms", train=2, test=4, height=96, width=64, seed=1))
    monkeypatch.setattr(demo_data, "ready_demo_bundle", lambda folder: None)
    monkeypatch.setattr(demo_bundle, "train_demo_bundle", stand_in_training)
    setup = [sys.executable, "-c", "import pathlib, time; time.sleep(2); "
             f"pathlib.Path({str(installed)!r}).touch(); print('set up')"]
    assert run_demo(settings, count=2, keep_serving=False, setup=setup) == 0
    out = capsys.readouterr().out
    assert held == [{"waiting-for-model"}]
    steps = ["answers C-ECHO", "installing the packages that train while the node takes images",
             "-> status 0x0000", "wait as waiting-for-model", "node started again with the bundle",
             "demo: results"]
    assert [out.index(step) for step in steps] == sorted(out.index(step) for step in steps)
    assert out.count("(p = ") == 2
    assert {row.status for row in instances(url)} == {"done"}
    assert (settings.data_dir / "demo" / "setup.log").read_text() == "set up\n"
