"""The decode/normalise module that serving and training share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from tests.support.hostile import rle_overrun
from tests.support.samples import real_cr, transcode
from training.synthetic import make_radiograph
from workers.imaging import (
    FALLBACK_WINDOW_PERCENTILES,
    DecodeError,
    decode,
    decode_all,
    normalise,
    percentiles_of_mapped,
)


def test_lossless_syntaxes_decode_to_identical_pixels(tmp_path: Path) -> None:
    source = make_radiograph(tmp_path / "src.dcm", rows=120, columns=90, window=(2000, 3000))
    reference = decode(source).pixels
    for syntax in ("jpeg-lossless", "jpeg-ls", "jpeg2000", "rle", "deflated", "big-endian"):
        image = decode(transcode(source, tmp_path / f"{syntax}.dcm", syntax))
        np.testing.assert_array_equal(image.pixels, reference, err_msg=syntax)
    real = decode(real_cr("RG1_J2KR.dcm")).pixels
    np.testing.assert_array_equal(real, decode(real_cr("RG1_UNCR.dcm")).pixels)


def test_linear_window_follows_the_standard(tmp_path: Path) -> None:
    ds = dcmread(make_radiograph(tmp_path / "w.dcm", window=(1000, 501)))
    raw = np.array([[0, 749, 750, 1000, 1250, 1251, 4095]], dtype=np.uint16)
    image = normalise(ds, raw)
    # PS3.3 C.11.2.1.2.1: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped to [0, 1]
    expected = np.clip((raw - 999.5) / 500.0 + 0.5, 0, 1)
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert image[0, 0] == 0 and image[0, -1] == 1


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_window_functions_agree_with_pydicom(tmp_path: Path, function: str) -> None:
    """Our window (all of PS3.3 C.11.2.1.2's functions) against pydicom's apply_voi_lut, whose
    output spans the stored bit range: scaled to [0, 1] the two must agree."""
    from pydicom.pixels import apply_voi_lut

    ds = dcmread(make_radiograph(tmp_path / "w.dcm", window=(1800, 1201), bits_stored=12))
    ds.VOILUTFunction = function
    raw = np.arange(0, 4096, 7, dtype=np.uint16).reshape(1, -1)
    reference = apply_voi_lut(raw.astype(np.float64), ds, prefer_lut=False) / 4095
    np.testing.assert_allclose(normalise(ds, raw), reference, atol=1e-5)


def test_rescale_is_applied_before_the_window(tmp_path: Path) -> None:
    ds = dcmread(make_radiograph(tmp_path / "r.dcm", window=(0, 2001)))
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1000
    raw = np.array([[0, 500, 1000]], dtype=np.uint16)
    values = raw * 2.0 - 1000  # -1000, 0, 1000
    expected = np.clip((values + 0.5) / 2000 + 0.5, 0, 1)
    np.testing.assert_allclose(normalise(ds, raw), expected, atol=1e-6)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    ds = dcmread(make_radiograph(tmp_path / "m.dcm", window=(2048, 4096)))
    raw = ds.pixel_array
    bright = normalise(ds, raw)
    ds.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_allclose(normalise(ds, raw), 1.0 - bright, atol=1e-6)


def test_voi_lut_sequence_is_used(tmp_path: Path) -> None:
    from pydicom import Dataset

    ds = dcmread(make_radiograph(tmp_path / "lut.dcm"))
    lut = Dataset()
    # A 12-bit LUT that compresses the upper half of the range (a typical CR curve's shape).
    entries = np.concatenate([np.linspace(0, 3071, 2048),
                              np.linspace(3072, 4095, 2048)]).astype(np.uint16)
    lut.add_new(0x00283002, "US", [4096, 0, 12])  # LUT Descriptor
    lut.add_new(0x00283006, "US", [int(v) for v in entries])  # LUT Data
    ds.VOILUTSequence = [lut]
    raw = np.array([[0, 1024, 2047, 4095]], dtype=np.uint16)
    expected = entries[raw] / 4095
    np.testing.assert_allclose(normalise(ds, raw), expected, atol=1e-6)


def test_percentile_window_without_voi(tmp_path: Path) -> None:
    ds = dcmread(make_radiograph(tmp_path / "p.dcm"))
    raw = ds.pixel_array
    image = normalise(ds, raw)
    low, high = np.percentile(raw, FALLBACK_WINDOW_PERCENTILES)
    assert image.min() == 0 and image.max() == 1
    assert np.mean(raw <= low) == pytest.approx(np.mean(image == 0), abs=1e-3)
    assert np.mean(raw >= high) == pytest.approx(np.mean(image == 1), abs=1e-3)


@pytest.mark.parametrize(("dtype", "low", "high", "slope", "intercept"), [
    (np.uint16, 0, 4096, 1.0, 0.0),        # a DX: stored values, rescale 1/0
    (np.int16, -2000, 3000, 0.37, -1024.5),  # signed, a fractional rescale
    (np.uint16, 0, 50, -2.0, 7.0),         # few values, a falling rescale (order reversed)
    (np.uint16, 17, 18, 1.0, 0.0),         # one value
])
def test_the_histogram_percentiles_are_numpys_exactly(dtype, low, high, slope,
                                                      intercept) -> None:
    """The fallback window's percentiles come from a histogram of the stored values; they must
    be np.percentile's of the modality values to the last bit (the same pixels as before)."""
    rng = np.random.default_rng(0)
    q = (*FALLBACK_WINDOW_PERCENTILES, 0, 50, 13.7, 100)
    for size in (1, 2, 7, 1000, 4099):
        raw = rng.integers(low, high, size).astype(dtype).reshape(1, -1)

        def to_values(stored: np.ndarray) -> np.ndarray:
            return stored.astype(np.float64) * slope + intercept

        assert percentiles_of_mapped(raw, to_values, q) == list(np.percentile(to_values(raw), q))


def test_records_header_facts(tmp_path: Path) -> None:
    image = decode(real_cr("RG1_UNCR.dcm"))
    assert (image.rows, image.columns) == (1955, 1841)
    assert image.photometric_interpretation == "MONOCHROME1"
    assert image.bits_stored == 15 and image.pixels.dtype == np.float32
    assert image.decode_seconds > 0


def test_bad_pixel_data_is_a_decode_error(tmp_path: Path) -> None:
    path = transcode(make_radiograph(tmp_path / "src.dcm"), tmp_path / "j2k.dcm", "jpeg2000")
    ds = dcmread(path)
    ds.PixelData = ds.PixelData[:40] + b"\x00" * 10  # a broken codestream in a valid frame
    with pytest.raises(DecodeError):
        decode(ds)
    with pytest.raises(DecodeError, match="pixel limit"):
        decode(make_radiograph(tmp_path / "big.dcm", rows=200, columns=200), max_pixels=1000)


def test_rle_segments_longer_than_the_image_are_a_decode_error(tmp_path: Path) -> None:
    """pylibjpeg-rle panics on them (pyo3's PanicException, a BaseException): that must end as
    a DecodeError like any other bad pixel data, not escape and leave the image held."""
    bomb = rle_overrun(make_radiograph(tmp_path / "src.dcm"))
    with pytest.raises(DecodeError, match="cannot decode pixel data"):
        decode(bomb)


def test_decode_processes_give_the_same_images_and_errors_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode processes hand the pixels back through files (not the result pipe): the images
    equal an in-process decode, each error stays in its place, and no file is left behind."""
    good = [make_radiograph(tmp_path / f"{seed}.dcm", rows=300, columns=240, seed=seed)
            for seed in (1, 2)]
    broken = transcode(good[0], tmp_path / "j2k.dcm", "jpeg2000")
    ds = dcmread(broken)
    ds.PixelData = ds.PixelData[:40] + b"\x00" * 10
    ds.save_as(broken)
    missing = tmp_path / "missing.dcm"
    spill = tmp_path / "tmp"
    spill.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(spill))  # where decode_all puts its folder
    results = decode_all([good[0], broken, missing, good[1]], 10**7, workers=2)
    assert isinstance(results[1], DecodeError) and isinstance(results[2], OSError)
    for path, result in zip(good, (results[0], results[3]), strict=True):
        expected = decode(path)
        assert isinstance(result, type(expected))
        np.testing.assert_array_equal(result.pixels, expected.pixels)
        assert (result.rows, result.columns, result.window) == \
            (expected.rows, expected.columns, expected.window)
    assert list(spill.iterdir()) == []
