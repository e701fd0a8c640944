"""Decode a radiograph to the normalised image the models take.

The one implementation of pixel handling: the workers call it on received files and ``training``
calls it on the data set, so training and serving see identical pixels.

Steps: decode (any transfer syntax pydicom has a decoder for), Modality LUT / rescale, VOI LUT or
window (a robust percentile window when the file has neither), MONOCHROME1 inversion, scale to
[0, 1] float32 where 1 is bright (bone).
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.pixels import apply_modality_lut, apply_voi_lut

# Where a file has no window, use these percentiles of its pixel values: robust to the collimator
# edges and burned-in labels that a plain min-max window would stretch to.
FALLBACK_WINDOW_PERCENTILES = (0.5, 99.5)


class DecodeError(Exception):
    """The file cannot be turned into an image; retrying will not help."""


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # float32, shape (rows, columns), 0 = dark, 1 = bright
    rows: int
    columns: int
    photometric_interpretation: str
    bits_stored: int
    decode_seconds: float
    # The VOI the analysis saw, for a GSPS: (center, width) in modality values, or None where it
    # was the file's own VOI LUT Sequence.
    window: tuple[float, float] | None


def _first(value: object) -> float:
    """Window Center/Width may be multi-valued (several presets): the first is the default."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]  # type: ignore[index]
    return float(value)  # type: ignore[arg-type]


def _apply_window(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """PS3.3 C.11.2.1.2/3: the VOI window functions, output scaled to [0, 1]."""
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    x = values.astype(np.float32)
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        raise ValueError("Window Width below 1")
    if width == 1:  # a threshold
        return (x >= center - 0.5).astype(np.float32)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _apply_voi_lut_sequence(values: np.ndarray, ds: Dataset) -> np.ndarray:
    lut = ds.VOILUTSequence[0]
    output_bits = int(lut.LUTDescriptor[2])
    mapped = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float32)
    return np.clip(mapped / float(2**output_bits - 1), 0.0, 1.0)


def _percentile_window(values: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(values, FALLBACK_WINDOW_PERCENTILES)
    return (float(low) + float(high)) / 2, float(high) - float(low)


def _window(values: np.ndarray, ds: Dataset
            ) -> tuple[np.ndarray, tuple[float, float] | None]:
    """The image through the file's VOI, and the window (center, width) it was, or None for the
    file's VOI LUT Sequence."""
    try:
        if "VOILUTSequence" in ds:
            return _apply_voi_lut_sequence(values, ds), None
        if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
            return _apply_window(values, ds), window
    except (ValueError, TypeError, IndexError, AttributeError, ZeroDivisionError):
        pass  # a malformed VOI: fall back to the percentile window below
    center, width = _percentile_window(values)
    if width <= 0:
        return np.zeros(values.shape, dtype=np.float32), (center, 1.0)
    low = center - width / 2
    return np.clip((values.astype(np.float32) - low) / width, 0.0, 1.0), (center, width)


def normalise_with_window(ds: Dataset, raw: np.ndarray
                          ) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Raw stored values -> [0, 1] float32 with bright bone, per the file's LUTs and photometry,
    and the window used (center, width, in modality values; None: the file's VOI LUT)."""
    if raw.ndim == 3 and raw.shape[-1] in (3, 4):  # colour secondary capture: use luminance
        raw = raw[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    values = apply_modality_lut(raw, ds) if raw.ndim == 2 else raw
    image, window = _window(np.asarray(values), ds)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        image = 1.0 - image
    return np.ascontiguousarray(image, dtype=np.float32), window


def normalise(ds: Dataset, raw: np.ndarray) -> np.ndarray:
    return normalise_with_window(ds, raw)[0]


def decode(source: Path | Dataset, max_pixels: int | None = None) -> DecodedImage:
    """Decode the first frame of a file (or a data set read with its pixel data)."""
    start = time.perf_counter()
    try:
        ds = source if isinstance(source, Dataset) else dcmread(source)
        rows, columns = int(ds.Rows), int(ds.Columns)
        if max_pixels is not None and rows * columns > max_pixels:
            raise DecodeError(f"image of {rows}x{columns} exceeds the pixel limit")
        raw = ds.pixel_array
    except (DecodeError, KeyboardInterrupt, SystemExit):
        raise
    # pydicom and its plugins raise many kinds on bad pixel data, and the Rust codecs
    # (pylibjpeg-rle) panic on some: pyo3's PanicException is a BaseException, which would
    # otherwise pass every `except Exception` and leave the image held, unanswered, for good.
    except BaseException as error:  # noqa: BLE001
        raise DecodeError(
            f"cannot decode pixel data: {error.__class__.__name__}: {error}") from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raw = raw[0]
    pixels, window = normalise_with_window(ds, raw)
    return DecodedImage(
        pixels=pixels,
        rows=rows,
        columns=columns,
        photometric_interpretation=str(ds.get("PhotometricInterpretation", "")),
        bits_stored=int(ds.get("BitsStored", ds.get("BitsAllocated", 0))),
        decode_seconds=time.perf_counter() - start,
        window=window,
    )


def _decode_or_error(path: Path, max_pixels: int) -> DecodedImage | DecodeError | OSError:
    try:
        return decode(path, max_pixels=max_pixels)
    except (DecodeError, OSError) as error:
        return error


@cache
def _pool(workers: int) -> ProcessPoolExecutor:
    # spawn, not fork: the parent holds torch's thread pools, which do not survive a fork.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def decode_all(paths: list[Path], max_pixels: int,
               workers: int) -> list[DecodedImage | DecodeError | OSError]:
    """Each file decoded, or the error that stopped it, in order. Several files at once go to
    worker processes: the codecs hold the GIL (JPEG 2000 lossless took about 0.4 s per image
    per core), so threads would not help and one decoding thread would keep an accelerator
    waiting."""
    if len(paths) == 1 or workers <= 1:
        return [_decode_or_error(path, max_pixels) for path in paths]
    return list(_pool(workers).map(_decode_or_error, paths, [max_pixels] * len(paths)))
