"""The files of ``POST /v1/images/edits`` -> the engine's :class:`mgt.editing.Edit`, or an error naming the field.

OpenAI's mask convention is turned into the engine's here: an OpenAI mask is a PNG whose fully transparent
pixels (alpha 0) are the ones to redraw, the engine's mask is white where it redraws. Only 8-bit images are
converted (to RGB); 16-bit and float images are refused rather than rescaled by a guess. The size is checked
from the header before the pixels are decoded, so a small compressed file cannot expand to a huge image.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from jobs.serve.openai_schema import MAX_SIDE
from mgt.editing import Edit, check_image_header

EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


class ImageFieldError(ValueError):
    """A file of the form cannot be used; ``param`` is its field (``image`` or ``mask``)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def open_image(data: bytes, param: str) -> Image.Image:
    """The decoded 8-bit image of ``data``; ImageFieldError naming ``param`` if it is not one or is too large."""
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise ImageFieldError(param, f"{param} is not an image this server reads ({len(data)} bytes); send a PNG, "
                              "JPEG or WebP file") from None
    try:
        check_image_header(image, param, MAX_SIDE)
    except ValueError as error:
        raise ImageFieldError(param, str(error)) from None
    if image.mode not in EIGHT_BIT_MODES:
        raise ImageFieldError(param, f"{param} has mode {image.mode} (16-bit or float pixels), which this server "
                              "does not convert; send an 8-bit RGB, RGBA or grayscale image")
    try:
        image.load()
    except OSError as error:  # truncated or corrupt pixel data behind a valid header
        raise ImageFieldError(param, f"{param} cannot be decoded ({error}); send a complete image file") from None
    return image


def redraw_mask(mask: Image.Image) -> Image.Image:
    """The engine's mask (mode L, 255 = redraw) of an OpenAI mask: its pixels of alpha 0 are redrawn."""
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise ImageFieldError("mask", f"mask has no alpha channel (mode {mask.mode}): its fully transparent pixels "
                              "(alpha 0) are the ones redrawn, so send a PNG with transparency (RGBA)")
    alpha = mask.convert("RGBA").getchannel("A")
    return alpha.point(lambda value: 255 if value == 0 else 0)


def read_edit(image_data: bytes, mask_data: bytes | None, strength: float | None) -> Edit:
    """The edit of an image file and an optional OpenAI mask file, each checked (errors name the field)."""
    image = open_image(image_data, "image")
    mask = None
    if mask_data is not None:
        mask = redraw_mask(open_image(mask_data, "mask"))
        if mask.size != image.size:
            raise ImageFieldError("mask", f"mask is {mask.width}x{mask.height} but image is {image.width}x"
                                  f"{image.height}; send a mask of the image's size")
    return Edit(image.convert("RGB"), mask, strength, name="image")
