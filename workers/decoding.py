"""Decoding several files at once, in worker processes: the codecs hold the GIL (JPEG 2000
lossless took about 0.4 s per image per core), so threads would not help and one decoding
thread would keep an accelerator waiting."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from pathlib import Path

from workers.imaging import DecodedImage, DecodeError, decode


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
    """Each file decoded, or the error that stopped it, in order."""
    if len(paths) == 1 or workers <= 1:
        return [_decode_or_error(path, max_pixels) for path in paths]
    return list(_pool(workers).map(_decode_or_error, paths, [max_pixels] * len(paths)))
