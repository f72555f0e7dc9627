"""Encoded images (PNG, JPEG and BMP only) to pixels: the one place that decodes them, for image folders and for
Parquet columns of image bytes (the Hugging Face ``Image`` layout).

An image file is data someone else wrote. Pillow picks a decoder by what the bytes say they are, and some of its
decoders run other programs (EPS hands the file to Ghostscript) or parse formats far richer than a training image
needs; so only the PNG, JPEG and BMP decoders are ever offered the bytes, and a file whose name says one of those
formats must hold that format.

JPEGs, the common case, are decoded by libjpeg-turbo through simplejpeg, which parses the header and decodes without
holding the GIL, so a pool of threads decodes in parallel (Pillow parses JPEG markers in Python, which serialises
the threads). It is the same library with the same settings as Pillow's (accurate integer DCT, fancy upsampling), so
the pixels are Pillow's; anything it is not sure of (CMYK, a warning, a declared size near Pillow's limit) goes to
Pillow, which decides as before."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import simplejpeg

if TYPE_CHECKING:
    from PIL import Image as PILImage

PILLOW_MODES = {"rgb": "RGB", "grayscale": "L"}
# Pillow's format names, and the file suffixes that name each.
IMAGE_FORMATS = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "BMP": (".bmp",)}
IMAGE_SUFFIXES = tuple(suffix for suffixes in IMAGE_FORMATS.values() for suffix in suffixes)
# Images a decoding thread takes per task: a future per image costs about as much Python, holding the GIL, as
# decoding a small JPEG does.
IMAGES_PER_TASK = 32


class UndecodableImage(ValueError):
    """The bytes are not a PNG, JPEG or BMP image Pillow can decode, or not the format their name says."""


class ImageHeader(NamedTuple):
    """What an image declares before it is decoded."""

    format: str
    width: int
    height: int
    channels: int

    def decoded_bytes(self, image_size: tuple[int, int] | None = None, color_mode: str | None = None) -> int:
        """Bytes of the uint8 pixels it becomes: decoding allocates the image at its own size, and the result
        is held at ``image_size`` (height, width) in ``color_mode``'s channels."""
        channels = {"rgb": 3, "grayscale": 1}.get(color_mode or "", self.channels)
        height, width = image_size or (self.height, self.width)
        return max(self.width * self.height * self.channels, height * width * channels)


def own_mode(mode: str) -> str:
    """Grey images stay grey, every other mode (palette, RGBA, CMYK, ...) is decoded as RGB."""
    return "L" if mode in ("L", "1", "I", "I;16", "F") else "RGB"


def _opened(data: bytes, name: str | None) -> PILImage.Image:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
    except UnidentifiedImageError:
        raise UndecodableImage("not a PNG, JPEG or BMP image") from None
    suffix = ("." + name.rsplit(".", 1)[-1].lower()) if name and "." in name else ""
    if suffix in IMAGE_SUFFIXES and suffix not in IMAGE_FORMATS[str(image.format)]:
        image.close()
        raise UndecodableImage(f"a {image.format} image named {suffix}")
    return image


def image_header(data: bytes, name: str | None = None) -> ImageHeader:
    """The format, size and channels the image declares, read from its header without decoding its pixels.

    Raises:
        UndecodableImage: not a PNG, JPEG or BMP image, or not the format ``name``'s suffix says.
    """
    try:
        with _opened(data, name) as image:
            return ImageHeader(str(image.format), image.width, image.height, 1 if own_mode(image.mode) == "L" else 3)
    except UndecodableImage:
        raise
    except (OSError, ValueError) as error:
        raise UndecodableImage(type(error).__name__) from None


def _jpeg_pixels(data: bytes, name: str | None, into: np.ndarray | None) -> np.ndarray | None:
    """A JPEG's pixels in its own mode, ``(H, W, 1)`` grey or ``(H, W, 3)`` RGB, decoded outside the GIL (into
    ``into`` when it has that shape); None for bytes that are not a JPEG, a name that says another format, and
    anything Pillow must judge: CMYK and YCCK (converted by Pillow's own formula), an image above Pillow's pixel
    limit (Pillow warns or refuses), and a file libjpeg-turbo warns about (Pillow decodes some of those)."""
    from PIL import Image

    suffix = ("." + name.rsplit(".", 1)[-1].lower()) if name and "." in name else ""
    if data[:3] != b"\xff\xd8\xff" or (suffix in IMAGE_SUFFIXES and suffix not in IMAGE_FORMATS["JPEG"]):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("Gray", "YCbCr", "RGB"):
            return None
        if Image.MAX_IMAGE_PIXELS is not None and height * width > Image.MAX_IMAGE_PIXELS:
            return None
        shape = (height, width, 1 if colorspace == "Gray" else 3)
        # Straight into the caller's array: no copy, and its first touch of fresh memory is outside the GIL too.
        buffer = into if into is not None and into.shape == shape and into.flags.c_contiguous else None
        pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if shape[2] == 1 else "RGB", buffer=buffer)
    except ValueError:
        return None
    return into if buffer is not None else np.asarray(pixels).reshape(shape)


def _in_mode_and_size(image: PILImage.Image, image_size: tuple[int, int] | None, color_mode: str | None) -> np.ndarray:
    from PIL import Image

    mode = PILLOW_MODES[color_mode] if color_mode else own_mode(image.mode)
    converted = image.convert(mode) if image.mode != mode else image
    if image_size and converted.size != (image_size[1], image_size[0]):
        converted = converted.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
    pixels = np.asarray(converted, dtype=np.uint8)
    return pixels[..., np.newaxis] if pixels.ndim == 2 else pixels


def decode_image(
    data: bytes,
    image_size: tuple[int, int] | None = None,
    color_mode: str | None = None,
    name: str | None = None,
    into: np.ndarray | None = None,
) -> np.ndarray:
    """``(H, W, C)`` uint8 pixels: in ``color_mode`` (rgb, grayscale; else the image's own), resized to
    ``image_size`` (height, width) if given. ``name`` (a file name, if the image has one) must not say another
    format than the content is. With ``into`` (a uint8 array), pixels of its shape are written there and ``into``
    is returned; pixels of another shape are returned, and ``into`` is left as it was or partly written.

    Raises:
        UndecodableImage: with the decoder's reason.
    """
    from PIL import Image

    jpeg = _jpeg_pixels(data, name, into)
    if jpeg is None:
        pixels = _decoded_by_pillow(data, image_size, color_mode, name)
    elif (color_mode is None or PILLOW_MODES[color_mode] == ("L" if jpeg.shape[2] == 1 else "RGB")) and (
        image_size is None or jpeg.shape[:2] == tuple(image_size)
    ):
        pixels = jpeg
    else:
        # Converted and resized by Pillow from the same pixels Pillow would have decoded.
        own = "L" if jpeg.shape[2] == 1 else "RGB"
        pixels = _in_mode_and_size(Image.fromarray(jpeg[..., 0] if own == "L" else jpeg, own), image_size, color_mode)
    if into is not None and pixels is not into and pixels.shape == into.shape:
        into[...] = pixels
        return into
    return pixels


def _decoded_by_pillow(
    data: bytes, image_size: tuple[int, int] | None, color_mode: str | None, name: str | None
) -> np.ndarray:
    from PIL import Image

    try:
        with _opened(data, name) as image:
            image.load()
            return _in_mode_and_size(image, image_size, color_mode)
    except Image.DecompressionBombError:
        # Pillow's guard (about 179 megapixels by default): a small file can declare a huge image.
        raise UndecodableImage("more pixels than Pillow decodes safely") from None
    except UndecodableImage:
        raise
    except (OSError, ValueError) as error:
        raise UndecodableImage(type(error).__name__) from None
