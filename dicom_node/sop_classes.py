"""The storage SOP classes and transfer syntaxes the node accepts."""

from __future__ import annotations

from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedSRStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AllStoragePresentationContexts

# Image SOP classes we may analyse, with the modality each implies when the Modality tag is absent.
IMAGE_SOP_CLASS_MODALITY: dict[UID, str] = {
    ComputedRadiographyImageStorage: "CR",
    DigitalXRayImageStorageForPresentation: "DX",
    DigitalXRayImageStorageForProcessing: "DX",
    SecondaryCaptureImageStorage: "OT",
}

# Accepted so that a PACS routing a whole study to us gets success; stored, never analysed.
# (Our own SR/GSPS results routed back to us land here.)
Comprehensive3DSRStorage = UID("1.2.840.10008.5.1.4.1.1.88.34")
NON_IMAGE_SOP_CLASSES: tuple[UID, ...] = (
    EnhancedSRStorage,
    ComprehensiveSRStorage,
    Comprehensive3DSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
)

# Every storage SOP class: a PACS that auto-routes whole studies also sends CT scouts, chest
# images and reports, and an object we cannot take stays a failed job in its routing queue.
# What the routing rules do not select is acknowledged, recorded as skipped, and not analysed.
OTHER_STORAGE_SOP_CLASSES: tuple[UID, ...] = tuple(
    UID(cx.abstract_syntax) for cx in AllStoragePresentationContexts
    if cx.abstract_syntax not in (*IMAGE_SOP_CLASS_MODALITY, *NON_IMAGE_SOP_CLASSES))
STORAGE_SOP_CLASSES: tuple[UID, ...] = (*IMAGE_SOP_CLASS_MODALITY, *NON_IMAGE_SOP_CLASSES,
                                        *OTHER_STORAGE_SOP_CLASSES)

_UNCOMPRESSED = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)


def decodable_transfer_syntaxes() -> list[UID]:
    """Every transfer syntax pydicom can decode pixel data from with the plugins installed here.

    Offered in this order; uncompressed first so a peer that proposes several gets the cheap one.
    """
    compressed = [uid for uid in sorted(AllTransferSyntaxes, key=str)
                  if uid not in _UNCOMPRESSED and _decodable(uid)]
    return [*_UNCOMPRESSED, *compressed]


def _decodable(uid: UID) -> bool:
    try:
        return get_decoder(uid).is_available
    except NotImplementedError:  # pydicom has no decoder for it at all (video, say)
        return False
