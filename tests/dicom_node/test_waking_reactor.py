"""An association's threads sleep until they have something to do (dicom_node.waking_reactor):
an idle association does not wake them every millisecond, and every PDU, message, pause,
release and abort still reaches them at once."""

from __future__ import annotations

import errno
import os
import resource
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import Verification

from dicom_node import waking_reactor
from dicom_node.scp import StoreSCP
from training.synthetic import make_radiograph

# Far longer than any step below: a wake-up that never comes shows as a step this slow.
FALLBACK_SECONDS = 5.0


def _wait_until(condition, timeout: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_reactor_sleeps_while_idle_and_wakes_for_each_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_scp: StoreSCP) -> None:
    monkeypatch.setattr(waking_reactor, "_FALLBACK_SECONDS", FALLBACK_SECONDS)
    loops: Counter[bool] = Counter()  # the reactor asks for a message once a loop
    get_msg = DIMSEServiceProvider.get_msg

    def counted(dimse: DIMSEServiceProvider, block: bool = False):  # noqa: ANN202
        if not block:
            loops[dimse.assoc.is_acceptor] += 1
        return get_msg(dimse, block)

    monkeypatch.setattr(DIMSEServiceProvider, "get_msg", counted)
    settings = store_scp.settings
    # 1.2 MB in 16 kB PDUs: each wakes the DUL thread, the last one the reactor.
    image = dcmread(make_radiograph(tmp_path / "dx.dcm", rows=800, columns=750))
    sender = AE(ae_title="MODALITY")
    sender.maximum_pdu_size = 16384
    sender.add_requested_context(Verification)
    sender.add_requested_context(image.SOPClassUID, image.file_meta.TransferSyntaxUID)
    association = sender.associate("127.0.0.1", settings.port, ae_title=settings.ae_title)
    assert association.is_established

    before = loops[True]
    time.sleep(1.0)
    idle_loops = loops[True] - before
    # pynetdicom's own reactor loops about 1,000 times a second here.
    assert idle_loops <= 3, f"the acceptor's reactor looped {idle_loops} times idle"

    # Each echo and store pauses the requestor's reactor and wakes the acceptor's.
    deadline = time.monotonic() + FALLBACK_SECONDS / 2
    for _ in range(10):
        assert association.send_c_echo().Status == 0x0000
        assert time.monotonic() < deadline, "an echo waited for the fallback"
        assert association.send_c_store(image).Status == 0x0000
        assert time.monotonic() < deadline, "a store waited for the fallback"
    association.release()
    assert association.is_released
    assert time.monotonic() < deadline, "the release waited for the fallback"

    aborted = sender.associate("127.0.0.1", settings.port, ae_title=settings.ae_title)
    assert aborted.is_established
    aborted.abort()
    assert _wait_until(lambda: not store_scp.ae.active_associations, FALLBACK_SECONDS / 2), \
        "the acceptor's reactor waited for the fallback to see the abort"


def _associate(scp: StoreSCP) -> Association:
    sender = AE(ae_title="MODALITY")
    sender.add_requested_context(Verification)
    association = sender.associate("127.0.0.1", scp.settings.port, ae_title=scp.settings.ae_title)
    assert association.is_established
    return association


def test_sockets_numbered_above_1024_are_waited_on_too(
        monkeypatch: pytest.MonkeyPatch, store_scp: StoreSCP) -> None:
    """select() cannot take descriptors from 1024 up, which a busy node's sockets get: the
    DUL threads would spin on its error instead of waiting."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"at most {hard} open files here")
    monkeypatch.setattr(waking_reactor, "_FALLBACK_SECONDS", FALLBACK_SECONDS)
    waits = Counter()
    wait_for_work = waking_reactor._wait_for_work

    def counted(dul: DULServiceProvider) -> None:
        waits[dul.assoc.is_acceptor] += 1
        wait_for_work(dul)

    monkeypatch.setattr(waking_reactor, "_wait_for_work", counted)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    filler = []
    try:
        while not filler or filler[-1] < 1030:
            filler.append(os.open(os.devnull, os.O_RDONLY))
        association = _associate(store_scp)
        assert association.dul.socket.socket.fileno() > 1024
        before = dict(waits)
        time.sleep(1.0)
        assert waits[True] - before[True] <= 3, "the acceptor's DUL thread did not wait"
        assert waits[False] - before[False] <= 3, "the requestor's DUL thread did not wait"
        assert association.send_c_echo().Status == 0x0000
        association.release()
    finally:
        for descriptor in filler:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_without_a_socket_pair_an_association_polls_as_pynetdicom_does(
        monkeypatch: pytest.MonkeyPatch, store_scp: StoreSCP,
        caplog: pytest.LogCaptureFixture) -> None:
    def out_of_descriptors(dul: DULServiceProvider) -> None:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(waking_reactor, "_Doorbell", out_of_descriptors)
    association = _associate(store_scp)
    assert association.send_c_echo().Status == 0x0000
    association.release()
    assert association.is_released
    assert "no socket pair to wait on" in caplog.text
