"""The VinDr-SpineXR reader and the synthetic phantoms written in its layout."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from training.phantoms import CLASS_FREQUENCIES, conditions_path, generate, read_bands
from training.vindr import COLUMNS, DatasetError, csv_path, read_split
from workers.imaging import decode


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("phantoms"), train=300, test=20, height=128,
                    width=96, seed=7)


def test_layout_and_reader(phantoms: Path) -> None:
    train, test = read_split(phantoms, "train"), read_split(phantoms, "test")
    assert (len(train), len(test)) == (300, 20)
    assert (phantoms / "train_images" / f"{train[0].image_id}.dicom").is_file()
    with open(csv_path(phantoms, "train")) as handle:
        assert tuple(csv.DictReader(handle).fieldnames) == COLUMNS
    for record in train[:40]:
        ds = dcmread(record.path, stop_before_pixels=True)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1" and "Modality" not in ds
        assert ds.BitsStored == 12 and ds.PhotometricInterpretation in ("MONOCHROME1",
                                                                         "MONOCHROME2")
        for box in record.boxes:
            assert 0 <= box.x0 < box.x1 <= ds.Columns and 0 <= box.y0 < box.y1 <= ds.Rows


def test_about_half_normal_and_the_papers_class_imbalance(phantoms: Path) -> None:
    train = read_split(phantoms, "train")
    normal = sum(not r.abnormal for r in train) / len(train)
    assert abs(normal - 0.5) < 4 * (0.25 / len(train)) ** 0.5  # within 4 sigma of a coin
    counts = Counter(box.class_name for r in train for box in r.boxes)
    total = sum(counts.values())
    for name, share in CLASS_FREQUENCIES.items():
        sigma = (share * (1 - share) / total) ** 0.5
        assert abs(counts[name] / total - share) < 4 * sigma + 0.01, (name, counts)


def test_deterministic_by_seed(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", train=5, test=2, height=96, width=64, seed=3)
    b = generate(tmp_path / "b", train=5, test=2, height=96, width=64, seed=3)
    c = generate(tmp_path / "c", train=5, test=2, height=96, width=64, seed=4)
    assert csv_path(a, "train").read_text() == csv_path(b, "train").read_text()
    assert csv_path(a, "train").read_text() != csv_path(c, "train").read_text()
    first_a, first_b = read_split(a, "train")[0], read_split(b, "train")[0]
    assert dcmread(first_a.path).PixelData == dcmread(first_b.path).PixelData


def test_bone_is_bright_whatever_the_photometry(phantoms: Path) -> None:
    seen = set()
    for record in read_split(phantoms, "train")[:20]:
        ds = dcmread(record.path)
        seen.add(ds.PhotometricInterpretation)
        pixels = decode(ds).pixels
        spine = pixels[:, 40:56].mean()  # the column of vertebrae is in the middle
        edge = pixels[:, :8].mean()
        assert spine > edge
    assert seen == {"MONOCHROME1", "MONOCHROME2"}


def test_jpeg2000_like_vindr(tmp_path: Path) -> None:
    root = generate(tmp_path, train=2, test=1, height=96, width=64, seed=1, compress=True)
    (record,) = read_split(root, "test")
    ds = dcmread(record.path)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    assert decode(ds).rows == 96


def _write_csv(root: Path, header: list[str], rows: list[list[str]]) -> None:
    path = csv_path(root, "train")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.mark.parametrize("header,rows,message", [
    ([c for c in COLUMNS if c != "xmin"], [], "missing column(s) xmin"),
    (list(COLUMNS), [["s", "e", "i", "R1", "Bone spur", "1", "1", "5", "5"]],
     "unknown lesion type 'Bone spur'"),
    (list(COLUMNS), [["s", "e", "i", "R1", "Osteophytes", "5", "1", "5", "5"]], "empty box"),
    (list(COLUMNS), [["s", "e", "i", "R1", "Osteophytes", "a", "1", "5", "5"]],
     "'a' is not a number"),
    (list(COLUMNS), [["s", "e", "i", "R1", "No finding", "", "", "", ""]],
     "1 image(s) of train missing"),
])
def test_reader_errors_are_one_clear_line(tmp_path: Path, header: list[str],
                                          rows: list[list[str]], message: str) -> None:
    _write_csv(tmp_path, header, rows)
    with pytest.raises(DatasetError) as error:
        read_split(tmp_path, "train")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_several_radiologists_rows_make_one_image(tmp_path: Path) -> None:
    rows = [["s", "e", "img1", "R1", "Osteophytes", "1", "1", "5", "5"],
            ["s", "e", "img1", "R2", "Osteophytes", "1", "1", "5", "5"],  # same box again
            ["s", "e", "img1", "R2", "Surgical implant", "2", "2", "9", "9"],
            ["s", "e", "img2", "R1", "No finding", "", "", "", ""]]
    _write_csv(tmp_path, list(COLUMNS), rows)
    records = {r.image_id: r for r in read_split(tmp_path, "train", check_files=False)}
    assert [b.class_name for b in records["img1"].boxes] == ["Osteophytes", "Surgical implant"]
    assert records["img1"].rad_ids == {"R1", "R2"} and records["img1"].abnormal
    assert not records["img2"].abnormal
    assert np.isclose(records["img1"].boxes[1].x1, 9)


def _noise(pixels: np.ndarray) -> float:
    """The image's noise, from neighbouring pixels' differences (flat regions dominate)."""
    image = pixels.astype(np.float64) / pixels.max()
    return float(np.median(np.abs(np.diff(image, axis=1))) / 0.6745 / 2**0.5)


def test_varied_phantoms_span_the_conditions_and_record_them(tmp_path: Path) -> None:
    root = generate(tmp_path, train=0, test=36, seed=2, variety=True)
    with open(conditions_path(root, "test"), newline="") as handle:
        drawn = {row["image_id"]: row for row in csv.DictReader(handle)}
    records = read_split(root, "test")
    assert set(drawn) == {r.image_id for r in records} and read_bands(root, "test") == {
        image_id: row["band"] for image_id, row in drawn.items()}
    rows = [int(row["rows"]) for row in drawn.values()]
    assert min(rows) < 500 and max(rows) > 2000 and all(300 <= r <= 3000 for r in rows)
    assert {row["band"] for row in drawn.values()} == {"easy", "medium", "hard"}
    assert {row["photometric"] for row in drawn.values()} == {"MONOCHROME1", "MONOCHROME2"}
    assert len({row["levels"] for row in drawn.values()}) >= 3
    noise: dict[str, list[float]] = {}
    for record in records:
        row, ds = drawn[record.image_id], dcmread(record.path)
        assert (ds.Rows, ds.Columns) == (int(row["rows"]), int(row["columns"]))
        assert all(0 <= b.x0 < b.x1 <= ds.Columns and 0 <= b.y0 < b.y1 <= ds.Rows
                   for b in record.boxes)
        noise.setdefault(row["band"], []).append(_noise(ds.pixel_array))
    # Measured on the pixels, not taken from the file: harder bands are noisier.
    median = {band: float(np.median(values)) for band, values in noise.items()}
    assert median["easy"] < median["medium"] < median["hard"], median
    assert read_bands(generate(tmp_path / "plain", train=0, test=2, height=96, width=64),
                      "test") == {}  # the plain look records no bands
