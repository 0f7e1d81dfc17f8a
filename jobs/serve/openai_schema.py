"""HTTP bodies of the endpoint: the OpenAI Images API (``POST /v1/images/generations`` and ``/edits``) plus
maskray's fields.

The request keeps OpenAI's names and meanings (``prompt``, ``n``, ``size`` as ``"WxH"``, ``response_format``,
``model``) and adds the engine's (``seed``, ``sampler``, ``steps``, ``guidance``, ``negative_prompt``), whose help
text comes from :class:`mgt.config.GenerationSettings` so a sampler is spelled the same way in YAML, on the
command line and here. Unknown fields are rejected (422 naming the field) rather than ignored. Errors use
OpenAI's ``{"error": {"message", "type", "param", "code"}}`` shape, which its clients parse.
"""

from __future__ import annotations

import re
from typing import Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mgt.config import GenerationSettings
from mgt.editing import IMG2IMG_STRENGTH, INPAINT_STRENGTH
from mgt.sampling.sampler_config import SamplerConfig

MAX_PROMPT_CHARS = 2000  # CLIP reads 77 tokens; longer text only costs tokenizer time
MAX_IMAGES = 10  # OpenAI's own bound on n
MAX_SIDE = 2048  # pixels; Meissonic is trained at 1024
MAX_STEPS = 256
MAX_GUIDANCE = 50.0
MAX_SEED = 2**53  # exact in every JSON parser; seeds seed..seed+n-1 stay valid torch seeds
MAX_SAMPLER_SPEC_CHARS = 1000  # a spec with every override is a few hundred; the engine's errors quote it whole
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_SETTINGS = GenerationSettings.model_fields


class ImageGenerationRequest(BaseModel):
    """Body of ``POST /v1/images/generations``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prompt: str = Field(..., max_length=MAX_PROMPT_CHARS, description="What to draw; an empty string draws an "
                        "unconditional sample.")
    model: str | None = Field(None, description="The served model id (see GET /v1/models). Unset: that model.")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="Number of images, with seeds seed, seed+1, ...")
    size: str | None = Field(None, description="'WIDTHxHEIGHT' in pixels, each a multiple of the model's size "
                             f"step and at most {MAX_SIDE}; 'auto' or unset: the model's default size.")
    response_format: Literal["b64_json"] = Field("b64_json", description="Only b64_json: images come back inline "
                                                 "as base64 PNG (this server stores no files to link to).")
    output_format: Literal["png"] = Field("png", description="Only png (lossless, so a seed reproduces bytes).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed of the first image; image i uses seed+i. "
                             "Unset: a random seed, returned with each image so it can be reproduced.")
    sampler: SamplerConfig | None = Field(None, description=_SETTINGS["sampler"].description + " A preset name "
                                          "(vanilla, ...) or an object of SamplerConfig fields. Unset: vanilla.")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description=_SETTINGS["steps"].description)
    guidance: float | None = Field(None, ge=0, le=MAX_GUIDANCE, description=_SETTINGS["guidance"].description)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS,
                                        description=_SETTINGS["negative_prompt"].description)

    @field_validator("response_format", mode="before")
    @classmethod
    def _only_b64(cls, value):
        if value == "url":
            raise ValueError("'url' is not supported: this server keeps no image files; use 'b64_json'")
        return "b64_json" if value is None else value

    @field_validator("size")
    @classmethod
    def _size_shape(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return None
        match = _SIZE.match(value)  # the messages leave the value out: the error handler quotes a prefix of it
        if not match:
            raise ValueError("size is not 'WIDTHxHEIGHT' (e.g. '1024x1024') or 'auto'")
        if not all(1 <= int(side) <= MAX_SIDE for side in match.groups()):
            raise ValueError(f"size is out of bounds: each side must be 1..{MAX_SIDE} pixels")
        return value

    @field_validator("sampler", mode="before")
    @classmethod
    def _sampler_spec(cls, value):
        if not isinstance(value, str):
            return value  # a mapping: checked per field
        if len(value) > MAX_SAMPLER_SPEC_CHARS:
            raise ValueError(f"a sampler spec is at most {MAX_SAMPLER_SPEC_CHARS} characters; send a preset name "
                             "with a few overrides, or a mapping of SamplerConfig fields")
        return SamplerConfig.from_spec(value)

    def dimensions(self) -> tuple[int, int] | None:
        """``(width, height)`` from ``size``, or None for the model's default."""
        return None if self.size is None else tuple(int(side) for side in self.size.split("x"))


class ImageEditRequest(ImageGenerationRequest):
    """Form fields of ``POST /v1/images/edits`` (multipart): OpenAI's ``image`` and ``mask`` files, the fields of
    a generation (``sampler`` as a preset spec such as ``vanilla`` or ``zsampling:zsampling.num_steps=4``, since a
    form field is a string) and ``strength``. The output has the image's size."""

    image: UploadFile = Field(..., description="The image to edit (PNG, JPEG, WebP...), each side a multiple of "
                              f"the model's size step and at most {MAX_SIDE} pixels. Its alpha, if any, is ignored: "
                              "the mask says what is redrawn.")
    mask: UploadFile | None = Field(None, description="PNG with an alpha channel and the image's size: its fully "
                                    "transparent pixels (alpha 0) are redrawn, the rest kept (OpenAI's convention). "
                                    "Unset: img2img of the whole image.")
    size: str | None = Field(None, description="The image's own size as 'WIDTHxHEIGHT', or 'auto'/unset: edits "
                             "keep the image's size.")
    strength: float | None = Field(None, gt=0, le=1, description="Share of the steps that run (the last "
                                   f"int(steps * strength)). Unset: {IMG2IMG_STRENGTH} without a mask (img2img "
                                   f"re-masks that share of the tokens), {INPAINT_STRENGTH} with one.")


class ImageData(BaseModel):
    """One generated image."""

    b64_json: str = Field(..., description="The image as a base64-encoded PNG.")
    seed: int = Field(..., description="The seed that reproduces this image with the same prompt and settings.")
    score: float | None = Field(None, description="The configured scorer's rating of this image for its prompt "
                                "(e.g. HPS v2.1); absent without a scorer.")


class ImagesResponse(BaseModel):
    """Body of a successful ``POST /v1/images/generations`` or ``/edits``."""

    created: int = Field(..., description="Unix time, in seconds, when the images were made.")
    data: list[ImageData] = Field(..., description="The images, in seed order.")
    model: str = Field(..., description="The model id that made them.")
    size: str = Field(..., description="'WIDTHxHEIGHT' of every image.")
    output_format: Literal["png"] = Field("png", description="The image encoding.")
    scorer: str | None = Field(None, description="Name of the scorer behind `score`, or null.")


class ModelCard(BaseModel):
    id: str = Field(..., description="The id to pass as `model`.")
    object: Literal["model"] = "model"
    created: int = Field(..., description="Unix time, in seconds, when this server loaded the model.")
    owned_by: str = Field("maskray", description="Who serves it.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(..., description="The served models.")


class ErrorBody(BaseModel):
    message: str = Field(..., description="What went wrong and how to fix it.")
    type: str = Field(..., description="invalid_request_error, authentication_error, rate_limit_error, "
                      "timeout_error, service_unavailable or server_error.")
    param: str | None = Field(None, description="The request field at fault, as the client spelled it.")
    code: str | None = Field(None, description="A stable machine-readable code.")


class ErrorResponse(BaseModel):
    error: ErrorBody
