"""The storage SOP classes and transfer syntaxes the node accepts."""

from __future__ import annotations

from pydicom.pixels.decoders import base as pixel_decoders
from pydicom.uid import (
    UID,
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

STORAGE_SOP_CLASSES: tuple[UID, ...] = (*IMAGE_SOP_CLASS_MODALITY, *NON_IMAGE_SOP_CLASSES)

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
    registered = sorted(pixel_decoders._PIXEL_DATA_DECODERS, key=str)
    compressed = [
        UID(uid)
        for uid in registered
        if uid not in _UNCOMPRESSED and pixel_decoders.get_decoder(uid).is_available
    ]
    return [*_UNCOMPRESSED, *compressed]
