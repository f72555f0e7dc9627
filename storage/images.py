"""Encoded images (JPEG, PNG, BMP, ...) to pixels: the one place that decodes them, for image folders and for
Parquet columns of image bytes (the Hugging Face ``Image`` layout)."""

from __future__ import annotations

import io

import numpy as np

PILLOW_MODES = {"rgb": "RGB", "grayscale": "L"}


class UndecodableImage(ValueError):
    """The bytes are not an image Pillow can decode."""


def own_mode(mode: str) -> str:
    """Grey images stay grey, every other mode (palette, RGBA, CMYK, ...) is decoded as RGB."""
    return "L" if mode in ("L", "1", "I", "I;16", "F") else "RGB"


def decode_image(data: bytes, image_size: tuple[int, int] | None = None, color_mode: str | None = None) -> np.ndarray:
    """``(H, W, C)`` uint8 pixels: in ``color_mode`` (rgb, grayscale; else the image's own), resized to
    ``image_size`` (height, width) if given.

    Raises:
        UndecodableImage: with the decoder's reason.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = PILLOW_MODES[color_mode] if color_mode else own_mode(image.mode)
            converted = image.convert(mode) if image.mode != mode else image
            if image_size and converted.size != (image_size[1], image_size[0]):
                converted = converted.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
            pixels = np.asarray(converted, dtype=np.uint8)
    except Image.DecompressionBombError:
        # Pillow's guard (about 179 megapixels by default): a small file can declare a huge image.
        raise UndecodableImage("more pixels than Pillow decodes safely") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UndecodableImage(type(error).__name__) from None
    return pixels[..., np.newaxis] if pixels.ndim == 2 else pixels
