"""Decode a radiograph to the normalised image the models take.

The one implementation of pixel handling: the workers call it on received files and ``training``
calls it on the data set, so training and serving see identical pixels.

Steps: decode (any transfer syntax pydicom has a decoder for), Modality LUT / rescale, VOI LUT or
window (a robust percentile window when the file has neither), MONOCHROME1 inversion, scale to
[0, 1] float32 where 1 is bright (bone).
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from workers import jpeg2000

jpeg2000.install()  # on import: in each decode process too

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


def percentiles_of_mapped(raw: np.ndarray, to_values: Callable[[np.ndarray], np.ndarray],
                          q: Sequence[float]) -> list[float]:
    """``np.percentile(to_values(raw), q)`` (its 'linear' method) for an integer ``raw`` and an
    element-wise ``to_values`` (the Modality LUT), from a histogram of ``raw``: one counting
    pass over the image where np.percentile partially sorts it (26 of a 2500x2000 image's 53
    ms of decoding here). The order statistics are ``to_values`` of the same integers, so they
    are the very numbers np.percentile would pick."""
    flat = raw.ravel()
    offset = int(flat.min()) if flat.dtype.kind == "i" else 0  # bincount counts from 0
    counts = np.bincount(flat.astype(np.int64) - offset if offset else flat)
    present = np.flatnonzero(counts)
    mapped = np.asarray(to_values((present + offset).astype(raw.dtype)))
    order = np.argsort(mapped, kind="stable")
    ranked, cumulative = mapped[order], np.cumsum(counts[present][order])

    def order_statistic(k: int):
        return ranked[np.searchsorted(cumulative, k, side="right")]

    found = []
    for quantile in np.true_divide(q, 100):
        virtual = quantile * (flat.size - 1)  # as numpy's 'linear' method, step for step
        below = int(np.floor(virtual))
        a, b = order_statistic(below), order_statistic(min(below + 1, flat.size - 1))
        gamma, difference = virtual - below, b - a
        found.append(float(a + difference * gamma if gamma < 0.5
                           else b - difference * (1 - gamma)))
    return found


def _percentile_window(values: np.ndarray, raw: np.ndarray,
                       ds: Dataset) -> tuple[float, float]:
    # Up to 16 bits a histogram has at most 65,536 bins; wider integers keep np.percentile.
    if raw.ndim == 2 and raw.dtype.kind in "iu" and raw.dtype.itemsize <= 2:
        low, high = percentiles_of_mapped(raw, lambda stored: apply_modality_lut(stored, ds),
                                          FALLBACK_WINDOW_PERCENTILES)
    else:
        low, high = np.percentile(values, FALLBACK_WINDOW_PERCENTILES)
    return (float(low) + float(high)) / 2, float(high) - float(low)


def _window(values: np.ndarray, raw: np.ndarray, ds: Dataset
            ) -> tuple[np.ndarray, tuple[float, float] | None]:
    """The image (``values``, the Modality LUT applied to ``raw``) through the file's VOI, and
    the window (center, width) it was, or None for the file's VOI LUT Sequence."""
    try:
        if "VOILUTSequence" in ds:
            return _apply_voi_lut_sequence(values, ds), None
        if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
            return _apply_window(values, ds), window
    except (ValueError, TypeError, IndexError, AttributeError, ZeroDivisionError):
        pass  # a malformed VOI: fall back to the percentile window below
    center, width = _percentile_window(values, raw, ds)
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
    image, window = _window(np.asarray(values), raw, ds)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        image = 1.0 - image
    return np.ascontiguousarray(image, dtype=np.float32), window


def normalise(ds: Dataset, raw: np.ndarray) -> np.ndarray:
    return normalise_with_window(ds, raw)[0]


def decode(source: Path | Dataset, max_pixels: int | None = None,
           threads: int = 1) -> DecodedImage:
    """Decode the first frame of a file (or a data set read with its pixel data); a JPEG 2000
    frame on ``threads`` threads (``workers.jpeg2000``)."""
    start = time.perf_counter()
    ds = None
    try:
        ds = source if isinstance(source, Dataset) else dcmread(source)
        rows, columns = int(ds.Rows), int(ds.Columns)
        if max_pixels is not None and rows * columns > max_pixels:
            raise DecodeError(f"image of {rows}x{columns} exceeds the pixel limit")
        ds.pixel_array_options(j2k_threads=threads)
        raw = ds.pixel_array
    except (DecodeError, KeyboardInterrupt, SystemExit):
        raise
    # pydicom and its plugins raise many kinds on bad pixel data, and the Rust codecs
    # (pylibjpeg-rle) panic on some: pyo3's PanicException is a BaseException, which would
    # otherwise pass every `except Exception` and leave the image held, unanswered, for good.
    except BaseException as error:  # noqa: BLE001
        if ds is None and isinstance(error, OSError):
            # The file could not be read at all (gone, a read error): not a verdict on its
            # content, which a DecodeError is (the image fails for good); the caller decides.
            raise
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


def _decode_or_error(path: Path, max_pixels: int,
                     threads: int) -> DecodedImage | DecodeError | OSError:
    try:
        return decode(path, max_pixels=max_pixels, threads=threads)
    except (DecodeError, OSError) as error:
        return error


@dataclass(frozen=True)
class _PixelsInFile:
    """A decoded image whose pixels a decode process left in ``file`` (a .npy) for the parent."""
    image: DecodedImage  # with no pixels
    file: str


def _decode_for_parent(path: Path, max_pixels: int, threads: int, folder: str
                       ) -> _PixelsInFile | DecodeError | OSError:
    """In a decode process: the pixels go back through a file in ``folder``, not the result pipe.
    Pickled through the pipe, 20 MB of float32 an image, one thread of the parent read about 25
    images/s (an H200 machine's 16 decode processes gave 2.2x one process; a 2-core AMD EPYC's
    two, 1.1x)."""
    result = _decode_or_error(path, max_pixels, threads)
    if not isinstance(result, DecodedImage):
        return result
    try:
        handle, file = tempfile.mkstemp(suffix=".npy", dir=folder)
    except OSError as error:  # a full or missing temporary folder: as for an unreadable file
        return error
    try:
        with os.fdopen(handle, "wb") as out:
            np.save(out, result.pixels)
    except BaseException as error:
        os.unlink(file)
        if isinstance(error, OSError):
            return error
        raise
    return _PixelsInFile(replace(result, pixels=np.empty((0, 0), np.float32)), file)


def _from_decode_process(result: _PixelsInFile | DecodeError | OSError
                         ) -> DecodedImage | DecodeError | OSError:
    if not isinstance(result, _PixelsInFile):
        return result
    try:
        return replace(result.image, pixels=np.load(result.file))
    finally:
        os.unlink(result.file)


@cache
def _pool(workers: int) -> ProcessPoolExecutor:
    # spawn, not fork: the parent holds torch's thread pools, which do not survive a fork.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container may narrow)."""
    return len(os.sched_getaffinity(0))


def decode_all(paths: list[Path], max_pixels: int, workers: int,
               cores: int | None = None) -> list[DecodedImage | DecodeError | OSError]:
    """Each file decoded, or the error that stopped it, in order. Several files at once go to
    worker processes: the codecs hold the GIL (JPEG 2000 lossless took about 0.4 s per image
    per core), so Python's threads would not help and one decoding thread would keep an
    accelerator waiting. The cores are shared among the files decoded at once: a JPEG 2000
    frame decodes on its share of them (threads of the codec's own). ``cores``: how many this
    process may use (the worker's torch threads, where set); by default every one it may run on.
    """
    cores = cores or usable_cores()
    if len(paths) == 1 or workers <= 1:
        return [_decode_or_error(path, max_pixels, cores) for path in paths]
    threads = max(1, cores // min(workers, len(paths)))
    # The folder goes with the call, whatever ends it: no decoded image is left on disk.
    with tempfile.TemporaryDirectory(prefix="spinenode-decode-") as folder:
        results = _pool(workers).map(_decode_for_parent, paths, [max_pixels] * len(paths),
                                     [threads] * len(paths), [folder] * len(paths))
        collected = []
        for result in results:
            try:
                collected.append(_from_decode_process(result))
            except OSError as error:  # as for a file the process could not read
                collected.append(error)
        return collected
