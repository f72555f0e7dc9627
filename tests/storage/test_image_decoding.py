"""Decoding encoded images: JPEGs take the decoder that runs outside the GIL, and its pixels are Pillow's."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import ptqflow.storage.images as images
from ptqflow.storage.images import UndecodableImage, decode_image


def _jpeg(mode: str, size: tuple[int, int], **options) -> bytes:
    rng = np.random.default_rng(sum(size))
    channels = {"L": 1, "RGB": 3, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def _by_pillow(data: bytes, image_size=None, color_mode=None) -> np.ndarray:
    return images._decoded_by_pillow(data, image_size, color_mode, None)


@pytest.fixture
def fast_decodes(monkeypatch):
    """How many images the GIL-free JPEG decoder decoded."""
    import simplejpeg

    calls = []
    real = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


JPEGS = {
    "4:2:0": ("RGB", (61, 47), {"quality": 90}),
    "4:2:2": ("RGB", (33, 70), {"quality": 75, "subsampling": 1}),
    "4:4:4": ("RGB", (64, 64), {"quality": 95, "subsampling": 0}),
    "progressive": ("RGB", (90, 37), {"quality": 85, "progressive": True}),
    "grey": ("L", (40, 29), {"quality": 80}),
}


@pytest.mark.parametrize("kind", JPEGS)
@pytest.mark.parametrize(
    ("image_size", "color_mode"), [(None, None), (None, "rgb"), (None, "grayscale"), ((24, 20), None)]
)
def test_jpeg_pixels_are_pillows_for_every_layout_size_and_colour_mode(kind, image_size, color_mode, fast_decodes):
    mode, size, options = JPEGS[kind]
    data = _jpeg(mode, size, **options)
    pixels = decode_image(data, image_size, color_mode, name="a.jpg")
    assert fast_decodes == [1]
    expected = _by_pillow(data, image_size, color_mode)
    assert pixels.dtype == np.uint8 and pixels.shape == expected.shape
    np.testing.assert_array_equal(pixels, expected)


def test_pixels_of_the_slots_shape_are_decoded_into_it(fast_decodes):
    data = _jpeg("RGB", (61, 47))
    batch = np.zeros((2, 47, 61, 3), np.uint8)
    slot = batch[1]
    assert decode_image(data, into=slot) is slot and fast_decodes == [1]
    np.testing.assert_array_equal(batch[1], _by_pillow(data))
    assert not batch[0].any()
    # Another shape is returned, and left for the caller to refuse.
    assert decode_image(_jpeg("RGB", (20, 20)), into=batch[0]).shape == (20, 20, 3)
    resized = decode_image(data, (10, 12), into=np.zeros((10, 12, 3), np.uint8))
    np.testing.assert_array_equal(resized, _by_pillow(data, (10, 12)))


def test_cmyk_jpegs_are_left_to_pillow(fast_decodes):
    data = _jpeg("CMYK", (16, 16))
    np.testing.assert_array_equal(decode_image(data, name="a.jpg"), _by_pillow(data))
    assert decode_image(data).shape == (16, 16, 3) and not fast_decodes


def test_a_truncated_jpeg_is_refused_as_pillow_refuses_it():
    data = _jpeg("RGB", (64, 64))
    with pytest.raises(UndecodableImage):
        decode_image(data[: len(data) // 2], name="a.jpg")


def test_a_jpeg_named_as_another_format_is_refused(fast_decodes):
    with pytest.raises(UndecodableImage, match="a JPEG image named .png"):
        decode_image(_jpeg("RGB", (16, 16)), name="a.png")
    assert not fast_decodes


def test_a_jpeg_above_pillows_pixel_limit_is_refused(monkeypatch, fast_decodes):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16 * 16 // 4)
    with pytest.raises(UndecodableImage, match="more pixels than Pillow decodes safely"):
        decode_image(_jpeg("RGB", (16, 16)))
    assert not fast_decodes
