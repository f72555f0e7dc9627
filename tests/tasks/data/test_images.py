"""Image folders as a source: listing, labels from folder names, parallel decoding, and the errors that name the fix."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import write_image_folder
from ptqflow.storage.tables import Columns
from ptqflow.tasks.core.errors import InvalidDataset
from ptqflow.tasks.data.datasets import Draw, load_dataset, peek_dataset, source_fingerprint


def test_a_folder_of_class_folders_is_a_labelled_table(tmp_path):
    write_image_folder(tmp_path / "images")
    table = load_dataset(str(tmp_path / "images"))
    assert table.features.shape == (36, 16, 16, 3) and table.features.dtype == np.uint8
    assert table.metadata["class_names"] == ["circle", "square", "triangle"]
    assert np.bincount(table.labels).tolist() == [12, 12, 12]
    # The label is the folder the image came from: the bright corner says which.
    bright = table.features.reshape(36, 2, 8, 2, 8, 3).mean(axis=(2, 4, 5))
    corners = [(0, 0), (0, 1), (1, 0)]
    assert all(bright[i][corners[label]] > 150 for i, label in enumerate(table.labels))
    assert peek_dataset(str(tmp_path / "images")).features.shape == (1, 16, 16, 3)


def test_a_draw_decodes_only_the_drawn_images(tmp_path, monkeypatch):
    import ptqflow.tasks.data.images as images

    write_image_folder(tmp_path / "images", per_class=20)
    decoded = []
    real = images._decode
    monkeypatch.setattr(
        images, "_decode", lambda fs, path, *rest, **kw: decoded.append(path) or real(fs, path, *rest, **kw)
    )
    table = load_dataset(str(tmp_path / "images"), draw=Draw(size=15, seed=(1,)))
    assert len(table) == 15 and len(decoded) == 15 and np.bincount(table.labels).tolist() == [5, 5, 5]


def test_size_and_colour_mode_are_what_the_options_say(tmp_path):
    write_image_folder(tmp_path / "images", suffix=".jpg")
    grey = load_dataset(str(tmp_path / "images"), Columns(image_size=(8, 12), color_mode="grayscale"))
    assert grey.features.shape == (36, 8, 12, 1)
    write_image_folder(tmp_path / "grey", mode="L")
    assert load_dataset(str(tmp_path / "grey")).features.shape == (36, 16, 16, 1)  # the images' own mode


def test_new_images_change_the_fingerprint(tmp_path):
    write_image_folder(tmp_path / "images")
    before = source_fingerprint(str(tmp_path / "images"))
    assert source_fingerprint(str(tmp_path / "images")) == before
    write_image_folder(tmp_path / "images", per_class=13)
    assert source_fingerprint(str(tmp_path / "images")) != before


def test_images_of_different_sizes_need_image_size(tmp_path):
    write_image_folder(tmp_path / "images")
    write_image_folder(tmp_path / "more", size=(20, 20))
    (tmp_path / "more" / "circle" / "000.png").rename(tmp_path / "images" / "circle" / "big.png")
    with pytest.raises(InvalidDataset, match=r"images of different sizes.*16x16x3.*20x20x3.*pass --image-size H,W"):
        load_dataset(str(tmp_path / "images"))
    assert load_dataset(str(tmp_path / "images"), Columns(image_size=(16, 16))).features.shape == (37, 16, 16, 3)


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda root: (root / "square" / "005.png").write_bytes(b"not a png"), r"square/005.png cannot be decoded"),
        (lambda root: (root / "empty").mkdir(), r"class folder .*/empty has no images"),
        (lambda root: (root / "stray.png").write_bytes((root / "circle" / "000.png").read_bytes()), "class folder"),
    ],
)
def test_bad_folders_say_which_file_and_what_to_do(tmp_path, spoil, message):
    write_image_folder(tmp_path / "images")
    spoil(tmp_path / "images")
    with pytest.raises(InvalidDataset, match=message):
        load_dataset(str(tmp_path / "images"))


def test_a_draw_too_large_to_hold_is_refused_after_one_image(tmp_path, monkeypatch):
    import ptqflow.tasks.data.images as images

    write_image_folder(tmp_path / "images")
    decoded = []
    real = images._decode
    monkeypatch.setattr(
        images, "_decode", lambda fs, path, *rest, **kw: decoded.append(path) or real(fs, path, *rest, **kw)
    )
    monkeypatch.setenv("PTQFLOW_MAX_DECODED_BYTES", str(16 * 16 * 3 * 10))  # ten images
    with pytest.raises(InvalidDataset, match="PTQFLOW_MAX_DECODED_BYTES"):
        load_dataset(str(tmp_path / "images"))
    assert len(decoded) == 1
    assert len(load_dataset(str(tmp_path / "images"), draw=Draw(size=9, seed=(0,)))) == 9


def test_an_image_declaring_too_many_pixels_is_refused_without_decoding_it(tmp_path, monkeypatch):
    from PIL import Image

    write_image_folder(tmp_path / "images")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16 * 16 // 4)  # every 16x16 image is then "too large"
    with pytest.raises(InvalidDataset, match="cannot be decoded as an image \\(more pixels than Pillow decodes"):
        load_dataset(str(tmp_path / "images"))


def test_split_folders_above_the_class_folders_give_each_image_its_split(tmp_path):
    write_image_folder(tmp_path / "train", per_class=6)
    write_image_folder(tmp_path / "val", per_class=2, seed=1)
    write_image_folder(tmp_path / "test", per_class=3, seed=2)
    table = load_dataset(str(tmp_path))
    assert table.metadata["class_names"] == ["circle", "square", "triangle"] and len(table) == 33
    assert np.bincount(table.splits).tolist() == [18, 6, 9]
    assert table.metadata["split_origin"] == {
        "train": "folder train/",
        "validation": "folder val/",
        "test": "folder test/",
    }
    pooled = load_dataset(str(tmp_path), Columns(split=None))  # --splits resplit: one source, the same classes
    assert pooled.splits is None and pooled.metadata["class_names"] == ["circle", "square", "triangle"]
    np.testing.assert_array_equal(pooled.labels, table.labels)


def test_class_folders_named_like_splits_are_classes(tmp_path):
    for name in ("train", "test"):  # images directly in them: these are classes, not splits
        (tmp_path / name).mkdir()
        for i in range(6):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / name / f"{i}.png")
    table = load_dataset(str(tmp_path))
    assert table.splits is None and table.metadata["class_names"] == ["test", "train"]


def test_split_folders_beside_class_folders_are_refused_unless_every_top_folder_is_read_as_a_class(tmp_path):
    write_image_folder(tmp_path / "train", per_class=6)
    write_image_folder(tmp_path / "test", per_class=3, seed=2)
    (tmp_path / "extra").mkdir()  # a class folder beside the splits: train/ would otherwise be read as a class
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(tmp_path / "extra" / "0.png")
    with pytest.raises(InvalidDataset, match=r"mixes split folders holding class folders \(test/, train/\) with other"):
        load_dataset(str(tmp_path))
    pooled = load_dataset(str(tmp_path), Columns(split=None))  # --splits resplit: every top folder is a class
    assert pooled.metadata["class_names"] == ["extra", "test", "train"]


def _postscript() -> bytes:
    """An EPS file: Pillow's EPS plugin would hand it to Ghostscript to render."""
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"


def _encoded(image_format: str, size: tuple[int, int] = (16, 16)) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 20, 200)).save(buffer, format=image_format)
    return buffer.getvalue()


def test_postscript_named_png_is_refused_and_ghostscript_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "ghostscript-ran"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gs", "gsx", "gswin32c", "gswin64c"):
        (bin_dir / name).write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    write_image_folder(tmp_path / "images")
    (tmp_path / "images" / "square" / "005.png").write_bytes(_postscript())
    with pytest.raises(InvalidDataset, match=r"square/005.png cannot be decoded as an image \(not a PNG, JPEG or BMP"):
        load_dataset(str(tmp_path / "images"))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "name", "reason"),
    [("TIFF", "005.png", "not a PNG, JPEG or BMP"), ("PNG", "005.jpg", "a PNG image named .jpg")],
)
def test_an_image_whose_content_is_not_what_its_name_says_is_refused(tmp_path, content, name, reason):
    write_image_folder(tmp_path / "images")
    (tmp_path / "images" / "square" / "005.png").unlink()
    (tmp_path / "images" / "square" / name).write_bytes(_encoded(content))
    with pytest.raises(InvalidDataset, match=rf"square/{name} cannot be decoded as an image \({reason}"):
        load_dataset(str(tmp_path / "images"))


def test_encoded_images_in_parquet_are_refused_from_their_headers_before_decoding(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import ptqflow.storage.images as decoder

    big = _encoded("PNG", (2000, 1000))  # a few kilobytes that declare 6 MB of pixels
    assert len(big) < 100_000
    images = pa.array([{"bytes": big, "path": f"{i}.png"} for i in range(8)])
    pq.write_table(pa.table({"image": images, "label": pa.array([0, 1] * 4)}), tmp_path / "big.parquet")
    decoded = []
    real = decoder.decode_image
    monkeypatch.setattr(decoder, "decode_image", lambda *a, **k: decoded.append(1) or real(*a, **k))
    monkeypatch.setenv("PTQFLOW_MAX_DECODED_BYTES", str(20 << 20))  # three of the eight
    with pytest.raises(InvalidDataset, match=r"declares images of [0-9,]+ bytes once decoded .*PTQFLOW_MAX_DECODED"):
        load_dataset(str(tmp_path / "big.parquet"), Columns(features="image"))
    assert not decoded
    monkeypatch.setenv("PTQFLOW_MAX_DECODED_BYTES", str(60 << 20))
    assert load_dataset(str(tmp_path / "big.parquet"), Columns(features="image")).features.shape == (8, 1000, 2000, 3)
