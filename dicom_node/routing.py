"""Which received instances are analysed: the routing rules.

Default: CR or DX images whose body part is absent, one of the spine values, or that carry a spine
anatomic region code. Real VinDr-SpineXR files are CR images with no Modality tag, so the modality
falls back to the one the SOP class implies.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom import Dataset
from pydicom.uid import UID

from dicom_node.config import Settings
from dicom_node.sop_classes import IMAGE_SOP_CLASS_MODALITY


@dataclass(frozen=True)
class RoutingDecision:
    analyse: bool
    reason: str  # why not, when analyse is False


def modality_of(ds: Dataset) -> str:
    modality = str(ds.get("Modality", "") or "").strip().upper()
    return modality or IMAGE_SOP_CLASS_MODALITY.get(UID(str(ds.get("SOPClassUID", ""))), "")


def _region_codes(ds: Dataset) -> set[str]:
    return {str(item.get("CodeValue", "")) for item in ds.get("AnatomicRegionSequence", [])}


def route(ds: Dataset, settings: Settings, ours: bool = False) -> RoutingDecision:
    """``ours``: the data set is one of our own result objects (never analysed again)."""
    if ours:
        return RoutingDecision(False, "our own result object (loop guard)")
    sop_class = UID(str(ds.get("SOPClassUID", "")))
    if sop_class not in IMAGE_SOP_CLASS_MODALITY:
        return RoutingDecision(False, f"not an image SOP class ({sop_class.name or sop_class})")
    modality = modality_of(ds)
    if modality not in settings.route_modalities:
        return RoutingDecision(False, f"modality {modality or '(none)'} is not routed")
    body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    codes = _region_codes(ds)
    if not body_part and not codes:
        return RoutingDecision(True, "")
    if body_part in settings.route_body_parts or codes & set(settings.route_region_codes):
        return RoutingDecision(True, "")
    shown = body_part or ",".join(sorted(codes))
    return RoutingDecision(False, f"body part {shown} is not a routed spine region")
