"""C-STORE SCU: send one of our objects to one destination and say what happened."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.status import code_to_category

from dicom_node.config import Destination

log = logging.getLogger(__name__)

# Statuses that mean "try again later" (PS3.4 B.2.3: out of resources); other failures are the
# object's or the peer's configuration's fault, and repeating them changes nothing.
_TRANSIENT_STATUS_PREFIX = 0xA700


@dataclass(frozen=True)
class SendResult:
    delivered: bool
    permanent: bool  # a failure that retrying will not cure
    reason: str


def _refused(destination: Destination, sop_class, syntax, result: int | None) -> SendResult:  # noqa: ANN001
    detail = f" (presentation context result {result:#04x})" if result is not None else ""
    return SendResult(False, True, f"{destination.address} refused {sop_class.name} in "
                                   f"{syntax.name}{detail}")


def send_file(path: Path, destination: Destination, calling_ae: str, max_pdu: int,
              timeout: float = 60) -> SendResult:
    ds = dcmread(path)
    sop_class = ds.SOPClassUID
    syntax = ds.file_meta.TransferSyntaxUID
    ae = AE(ae_title=calling_ae)
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    # One presentation context for exactly this object's SOP class and transfer syntax.
    ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established and assoc.rejected_contexts:
        # The peer answered but took none of our contexts: pynetdicom then aborts.
        return _refused(destination, sop_class, syntax, assoc.rejected_contexts[0].result)
    if not assoc.is_established:
        if assoc.is_rejected:
            return SendResult(False, False, f"{destination.address} rejected the association")
        return SendResult(False, False, f"no association with {destination.address} "
                                        "(peer down or unreachable)")
    try:
        if not any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
            rejected = assoc.rejected_contexts[0] if assoc.rejected_contexts else None
            return _refused(destination, sop_class, syntax,
                            rejected.result if rejected is not None else None)
        status = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        return SendResult(False, False, f"no C-STORE response from {destination.address}")
    code = int(status.Status)
    category = code_to_category(code)
    if category in ("Success", "Warning"):
        return SendResult(True, False, "" if code == 0 else f"delivered with warning {code:#06x}")
    comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
    reason = f"{destination.address} answered {code:#06x} ({category}){comment}"
    return SendResult(False, (code & 0xFF00) != _TRANSIENT_STATUS_PREFIX, reason)
