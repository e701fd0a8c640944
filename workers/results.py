"""Turn an analysis into the DICOM objects that go back to the PACS (files in the data dir)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread

from dicom_node.analysis import AnalysisResult
from dicom_node.config import (
    DEFAULT_RESULT_KINDS,
    OVERLAY_KINDS,
    RESULT_KINDS,
    Destination,
    ResultKind,
    Settings,
)
from dicom_node.outbox import destinations_for
from dicom_node.results.common import save_object
from dicom_node.results.gsps import build_gsps
from dicom_node.results.identity import result_series_uid
from dicom_node.results.overlay import build_overlay
from dicom_node.results.sr import build_sr
from workers.imaging import DecodedImage


@dataclass(frozen=True)
class BuiltOutput:
    kind: ResultKind
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    path: Path


def kinds_for(destinations: list[Destination]) -> list[ResultKind]:
    wanted = {kind for destination in destinations for kind in destination.kinds}
    return [kind for kind in RESULT_KINDS if kind in (wanted or set(DEFAULT_RESULT_KINDS))]


def build_outputs(settings: Settings, source_path: Path, image: DecodedImage,
                  summary: AnalysisResult, calling_ae: str, number: int) -> list[BuiltOutput]:
    """The objects of one image. Per image, each in a series of its own; per study, the SR is
    left to the study report and the others go into the study's series of their kind, as
    instance ``number``."""
    source = dcmread(source_path, stop_before_pixels=True)
    grey = np.round(image.pixels * 255).astype(np.uint8)
    per_study = settings.result_scope == "study"
    built = []
    for kind in kinds_for(destinations_for(settings, calling_ae)):
        series = result_series_uid(source.StudyInstanceUID, kind) if per_study else None
        where = {"series_uid": series, "instance_number": number if per_study else 1}
        if kind is ResultKind.SR:
            if per_study:
                continue
            ds = build_sr([(source, summary)], **where)
        elif kind in OVERLAY_KINDS:
            ds = build_overlay(source, grey, summary, jpeg=kind is ResultKind.SC_JPEG, **where)
        else:
            ds = build_gsps(source, summary, window=image.window, **where)
        path = save_object(settings.data_dir, ds)
        built.append(BuiltOutput(kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                 str(ds.file_meta.TransferSyntaxUID), path))
    return built
