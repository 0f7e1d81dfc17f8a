"""Image editing inputs: img2img, inpainting and outpainting -> the tokens the sampling loop starts from.

An edit starts the ordinary sampling loop from the init image's VQ tokens instead of a fully masked grid:
the masked positions are redrawn, every other token is kept and never changes. The rules are diffusers
0.42.1's (``pipelines/deprecated/amused/pipeline_amused_img2img.py`` and ``pipeline_amused_inpaint.py``):

- both run steps ``start..T-1`` of a T-step schedule, ``start = T - int(T * strength)``;
- img2img (no mask): each token is masked when a uniform draw from the sample's generator falls below the
  mask schedule's ratio after step ``start - 1`` (``AmusedScheduler.add_noise``);
- inpainting (mask, white = redraw): the mask is resized to the token grid (lanczos) and binarized at 0.5
  (``VaeImageProcessor``), and every step's mask count is scaled by the masked share of the grid;
- outpainting: :func:`outpaint_canvas` puts the image on a larger canvas whose new area is the mask.

Deliberate deviations: strength 1 without a mask masks every token (diffusers looks up step ``-1``, whose
cosine ratio is ``cos(pi/2) < 0``, and masks nothing); the mask is resized to the exact token grid (diffusers
rounds the grid down to a multiple of the VQ scale and then fails to reshape it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    import torch
    from PIL import Image

IMG2IMG_STRENGTH = 0.5  # AmusedImg2ImgPipeline's default
INPAINT_STRENGTH = 1.0  # AmusedInpaintPipeline's default
# The largest side of an image to edit, checked from its header before any pixel is decoded: a 13000x13000 PNG of
# zeros is 164 KB on disk and 169 MB (RGB: 507 MB) decoded. Meissonic is trained at 1024 px.
MAX_IMAGE_SIDE = 4096


class EditOptions(BaseModel):
    """Image editing: img2img from an init image, inpainting with a mask, or outpainting around the image."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    init_image: str | None = Field(None, description="Image to edit (path or fsspec URI such as s3://bucket/a.png); "
                                   "its size is the output size. Alone: img2img.")
    mask_image: str | None = Field(None, description="Inpainting mask of the same size as the init image (path or "
                                   "URI): white pixels are redrawn, black ones kept.")
    strength: float | None = Field(None, gt=0, le=1, description="Share of the steps that run: the last "
                                   "int(steps * strength); img2img re-masks each token with the mask schedule's ratio "
                                   f"at that point (unset: {IMG2IMG_STRENGTH} for img2img, {INPAINT_STRENGTH} "
                                   "with a mask or --outpaint).")
    outpaint: tuple[int, int, int, int] | None = Field(None, description="LEFT,TOP,RIGHT,BOTTOM pixels added around "
                                                       "the init image and generated (multiples of the VQ scale).")

    @field_validator("outpaint", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            try:
                value = tuple(int(part) for part in value.split(","))
            except ValueError:
                raise ValueError(f"outpaint must be LEFT,TOP,RIGHT,BOTTOM integers such as 64,0,64,0; "
                                 f"got {value!r}") from None
        if value is not None and (len(value) != 4 or min(value) < 0 or not any(value)):
            raise ValueError(f"outpaint must be 4 pixel counts >= 0, not all 0, such as 64,0,64,0; got {value!r}")
        return value

    @model_validator(mode="after")
    def _needs_image(self) -> EditOptions:
        if self.init_image is None and (self.mask_image or self.outpaint or self.strength is not None):
            raise ValueError("--mask-image, --outpaint and --strength edit an image: add --init-image PATH")
        if self.mask_image and self.outpaint:
            raise ValueError("--outpaint builds its own mask: drop --mask-image, or pad the image and its mask "
                             "yourself and drop --outpaint")
        return self

    def load(self, multiple: int, storage_options: dict | None = None) -> Edit | None:
        """The :class:`Edit` these options describe (images read now), or None without an init image."""
        if self.init_image is None:
            return None
        image = load_image(self.init_image, "--init-image", storage_options)
        mask = load_image(self.mask_image, "--mask-image", storage_options) if self.mask_image else None
        if self.outpaint:
            image, mask = outpaint_canvas(image, self.outpaint, multiple, name=self.init_image)
        return Edit(image, mask, self.strength, name=self.init_image)


@dataclass(frozen=True)
class Edit:
    """One sample's edit: init image, optional mask (white = redraw), strength (None = the use's default)."""

    image: Image.Image
    mask: Image.Image | None = None
    strength: float | None = None
    name: str = "init image"  # how errors name the image (its path or URI)

    @property
    def resolved_strength(self) -> float:
        if self.strength is not None:
            return self.strength
        return IMG2IMG_STRENGTH if self.mask is None else INPAINT_STRENGTH

    def start_step(self, num_steps: int) -> int:
        """Index of the first step that runs: ``T - int(T * strength)``, as both reference pipelines."""
        strength = self.resolved_strength
        if not 0 < strength <= 1:
            raise ValueError(f"strength of {self.name} must be in (0, 1], got {strength}")
        runs = int(num_steps * strength)
        if runs == 0:
            raise ValueError(f"strength {strength} of {self.name} runs int({num_steps} * {strength}) = 0 of "
                             f"{num_steps} steps, so nothing would change; raise it to at least {1 / num_steps:.3g}")
        return num_steps - runs

    def check(self, width: int, height: int) -> None:
        """Raise a ValueError naming the file when the image or mask is not ``width`` x ``height``."""
        if self.image.size != (width, height):
            raise ValueError(f"{self.name} is {self.image.width}x{self.image.height} but the batch is {width}x"
                             f"{height}; resize the image, or generate it in a batch of its own size")
        if self.mask is not None and self.mask.size != self.image.size:
            raise ValueError(f"the mask of {self.name} is {self.mask.width}x{self.mask.height} but the image is "
                             f"{self.image.width}x{self.image.height}; give a mask of the image's size")


def load_image(uri: str, what: str = "image", storage_options: dict | None = None,
               size: tuple[int, int] | None = None, max_side: int = MAX_IMAGE_SIDE) -> Image.Image:
    """An RGB or L image read through fsspec (local path, ``s3://``, ``gs://``...); errors name ``what`` and ``uri``.

    The header is checked before the pixels are decoded (:func:`check_image_header`): each side at most
    ``max_side``, and exactly ``size`` (width, height) when given.
    """
    import fsspec
    from PIL import Image, UnidentifiedImageError

    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            image = Image.open(f)
            check_image_header(image, f"{what} {uri}", max_side, size)
            image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {uri} does not exist; check the path or URI") from None
    except Image.DecompressionBombError:  # PIL's own limit, far above ``max_side``, met when opening
        raise ValueError(f"{what} {uri} is an image of over {2 * Image.MAX_IMAGE_PIXELS} pixels; each side must be "
                         f"at most {max_side} pixels") from None
    except UnidentifiedImageError:
        raise ValueError(f"{what} {uri} is not an image (PNG, JPEG, WebP...); pass an image file") from None
    return image if image.mode in ("RGB", "L") else image.convert("RGB")


def check_image_header(image: Image.Image, what: str, max_side: int = MAX_IMAGE_SIDE,
                       size: tuple[int, int] | None = None) -> None:
    """Refuse an opened, not yet decoded image from its header: a side above ``max_side``, or (when ``size`` is
    given) another width x height than the run's. A small compressed file can hold a huge image, so this runs
    before ``load()``; the Serve route and the batch generator share it.

    Raises:
        ValueError: naming ``what``, the image's size and the limit.
    """
    width, height = image.size
    if size is not None and (width, height) != tuple(size):
        raise ValueError(f"{what} is {width}x{height} but this run generates {size[0]}x{size[1]} images "
                         f"(--width/--height); resize the image or edit it in a run of its size")
    if max(width, height) > max_side:
        raise ValueError(f"{what} is {width}x{height}; each side must be at most {max_side} pixels")


def outpaint_canvas(image: Image.Image, padding: Sequence[int], multiple: int,
                    name: str = "init image") -> tuple[Image.Image, Image.Image]:
    """The canvas and mask of an outpainting: ``image`` at offset (left, top), the new area masked.

    The new area repeats the image's edge pixels, so the VQ encoder sees the image continued rather than a
    hard border, and the kept tokens along the edge encode as the image does. Each padding must be a multiple
    of ``multiple`` (the VQ scale) so that the mask falls on whole tokens.
    """
    import numpy as np
    from PIL import Image

    left, top, right, bottom = (int(p) for p in padding)
    if any(p % multiple for p in (left, top, right, bottom)):
        raise ValueError(f"outpaint padding {left},{top},{right},{bottom} of {name} must be multiples of {multiple} "
                         f"(the VQ scale) so that the kept region falls on whole tokens")
    pixels = np.asarray(image.convert("RGB"))
    canvas = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    mask[top:top + image.height, left:left + image.width] = 0
    return Image.fromarray(canvas), Image.fromarray(mask, mode="L")


def image_tokens(vqvae, images: Sequence[Image.Image], family=None) -> torch.Tensor:
    """`(B, h, w)` VQ token ids of same-size images, preprocessed and quantized as the reference pipeline does.

    ``family`` (a :class:`mgt.models.families.ModelFamily`; default: Meissonic's) gives the pixel range and the
    quantizer. Images are encoded one at a time: a convolution over another batch size may take another
    kernel, and a token would then depend on its batch-mates.
    """
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from mgt.models.families import get_family

    family = family or get_family("meissonic")
    # Pixels in [0, 1] for aMUSEd and Meissonic (their pipelines build the processor with do_normalize=False),
    # in [-1, 1] for a family whose VQ model takes those (MaskGIT's VQGAN).
    processor = VaeImageProcessor(vae_scale_factor=2 ** (len(vqvae.config.block_out_channels) - 1),
                                  do_normalize=family.pixel_range == (-1.0, 1.0))
    if vqvae.dtype == torch.float16 and vqvae.config.force_upcast:  # as diffusers' needs_upcasting
        vqvae = vqvae.float()
    out = []
    for image in images:
        pixels = processor.preprocess(image.convert("RGB")).to(dtype=vqvae.dtype, device=vqvae.device)
        out.append(family.image_tokens(vqvae, pixels)[0])
    return torch.stack(out)


def mask_grid(mask: Image.Image, height: int, width: int) -> torch.Tensor:
    """`(height, width)` bool: the mask resized to the token grid (lanczos) and binarized at 0.5 (white = True)."""
    from diffusers.image_processor import VaeImageProcessor

    # vae_scale_factor=1: resize to the exact grid (see the module docstring), otherwise diffusers' mask processor.
    processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    return processor.preprocess(mask, height, width).reshape(height, width).bool()


def initial_tokens(
    tokens: torch.Tensor,
    mask: torch.Tensor | None,
    start_step: int,
    num_steps: int,
    mask_schedule,
    generator: torch.Generator,
    mask_token_id: int,
) -> torch.Tensor:
    """One sample's starting `(h, w)` tokens: ``tokens`` with the positions to redraw set to ``mask_token_id``.

    With a ``mask`` (inpainting) those are its True positions; without (img2img) a position is masked when
    ``rand < ratio(start - 1)``, one ``rand`` of shape `(h, w)` from the sample's generator as
    ``AmusedScheduler.add_noise`` draws it (nothing is drawn at ``start_step == 0``: everything is masked).
    """
    import torch

    from mgt.sampling import schedules

    if mask is None:
        if start_step == 0:
            mask = torch.ones_like(tokens, dtype=torch.bool)
        else:
            ratio = schedules.mask_ratio(mask_schedule, start_step - 1, num_steps)
            mask = torch.rand(tokens.shape, generator=generator, device=generator.device).to(tokens.device) < ratio
    return tokens.masked_fill(mask.to(tokens.device), mask_token_id)
