"""Turn an analysis into the DICOM objects that go back to the PACS (files in the data dir)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread

from dicom_node.analysis import AnalysisResult
from dicom_node.config import (
    DEFAULT_RESULT_KINDS,
    RESULT_KINDS,
    Destination,
    ResultKind,
    Settings,
)
from dicom_node.files import fsync_file
from dicom_node.outbox import destinations_for
from dicom_node.results.gsps import build_gsps
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
                  summary: AnalysisResult, calling_ae: str) -> list[BuiltOutput]:
    source = dcmread(source_path, stop_before_pixels=True)
    grey = np.round(image.pixels * 255).astype(np.uint8)
    folder = settings.data_dir / "outputs"
    folder.mkdir(parents=True, exist_ok=True)
    built = []
    for kind in kinds_for(destinations_for(settings, calling_ae)):
        if kind is ResultKind.SR:
            ds = build_sr(source, summary)
        elif kind in (ResultKind.SC, ResultKind.SC_JPEG):
            ds = build_overlay(source, grey, summary, jpeg=kind is ResultKind.SC_JPEG)
        else:
            ds = build_gsps(source, summary, window=image.window)
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        fsync_file(path)  # on disk before the outbox row says it is
        built.append(BuiltOutput(kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                 str(ds.file_meta.TransferSyntaxUID), path))
    return built
