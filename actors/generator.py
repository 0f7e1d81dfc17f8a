"""``Generator``: a loaded MGT that turns a batch of prompt rows into a batch of encoded-image rows.

The same plain class is a Ray Data ``map_batches`` UDF (``compute=ActorPoolStrategy``) and can be the body
of a Serve deployment: ``__init__`` loads the model once per actor, ``__call__`` maps a column batch to a
column batch. Images leave the actor as compact PNG/WebP/JPEG bytes, never as Python objects, so the object
store accounts for them exactly (docs/ray-notes.md §1; ray-project/ray issue #44577).

Bad rows are data (docs/ray-notes.md §2): a row that fails gets an ``error`` column "Type: message" and empty image
bytes in the good rows' schema, and the job goes on; ``fail_fast=True`` re-raises instead.

Rows with an ``init_image`` (and optionally ``mask_image``, ``strength``) are edits (``mgt.editing``): the
actor reads their images through fsspec and passes one ``Edit`` per row, None for the plain rows, in the same
batch. Every row has the run's size, so an image of another size fails its row, before the batch runs.
"""

from __future__ import annotations

import io
import time
from typing import Any, Literal

import numpy as np

from actors.stage import RowStage
from mgt.config import GenerationSettings, ModelConfig

ImageFormat = Literal["png", "webp", "jpeg"]
ERROR_PROMPT_CHARS = 80


class Generator(RowStage):
    """A masked generative transformer held by one actor: prompt rows in, image rows out.

    Args:
        model: which checkpoint to load, its dtype and device. The pipeline passes ``cuda`` for a stage given
            GPUs (Ray sets ``CUDA_VISIBLE_DEVICES`` to the actor's GPUs, so ``cuda`` is its own) and ``cpu``
            otherwise, so a CPU actor on a GPU node never grabs a GPU it was not assigned.
        settings: steps, guidance, size, negative prompt and sampler, shared by every row.
        image_format: ``png`` (lossless, default), ``webp`` or ``jpeg``.
        image_quality: WebP/JPEG quality 1-100 (PNG ignores it).
        fail_fast: re-raise the first row error instead of recording it.
        torch_threads: intra-op threads for this actor; ``None`` keeps what Ray set (``OMP_NUM_THREADS`` =
            the actor's CPUs, at least 1).
        storage_options: fsspec options for reading the rows' ``init_image`` and ``mask_image`` URIs (the job's
            ``storage_options``).
    """

    REQUIRED_COLUMNS = {
        "prompt": "the text prompt (str; '' is an unconditional sample)",
        "seed": "the sample's seed (int64): the image depends only on (prompt, seed, settings)",
    }

    def __init__(self, model: ModelConfig | dict, settings: GenerationSettings | dict, *,
                 image_format: ImageFormat = "png", image_quality: int = 95, fail_fast: bool = False,
                 torch_threads: int | None = None, storage_options: dict | None = None):
        import torch

        import mgt

        self.model = ModelConfig.model_validate(model)
        self.settings = GenerationSettings.model_validate(settings)
        if image_format not in ("png", "webp", "jpeg"):
            raise ValueError(f"unknown image_format {image_format!r}; choose png, webp or jpeg")
        self.image_format, self.image_quality, self.fail_fast = image_format, int(image_quality), fail_fast
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        # ModelConfig's fields are load_pipeline's keyword arguments (dtype, device, variant, quantization,
        # token merging ...), so an engine option added to the config reaches every actor unchanged.
        self.pipe = mgt.load_pipeline(self.model.model, **self.model.model_dump(exclude={"model"}))
        self.storage_options = dict(storage_options or {})
        # The run's size, made explicit: left unset, the engine would take it from the batch's first edit, and a
        # plain row's image would then depend on its batch-mates.
        self.settings = self.settings.model_copy(update={"width": self.settings.width or self.pipe.defaults.width,
                                                         "height": self.settings.height or self.pipe.defaults.height})

    def process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Generate one image per row.

        Args:
            batch: columns of B rows; ``prompt`` and ``seed`` required, ``negative_prompt``, ``init_image``,
                ``mask_image`` and ``strength`` optional, every other column (``prompt_id``, ``sample_idx`` ...)
                is passed through untouched.

        Returns:
            The input columns plus ``image`` (B,) encoded bytes (``b""`` for a failed row), ``nfe`` (B,)
            int64 transformer calls, ``gen_seconds`` (B,) float64 (the batch's wall time shared equally by
            its rows) and ``error`` (B,) str ("" when the row succeeded).
        """
        prompts = [str(p) for p in batch["prompt"]]
        seeds = [int(s) for s in batch["seed"]]
        negatives = self._negatives(batch)
        count = len(prompts)
        images: list[bytes] = [b""] * count
        errors: list[str] = [""] * count
        nfe = np.zeros(count, dtype=np.int64)
        started = time.perf_counter()
        edits, unread = self._edits(batch, count)
        failed = {i: _describe(error, prompts[i]) for i, error in unread.items()}
        rows = [i for i in range(count) if i not in failed]
        if rows:
            failed.update(self.run_isolated(
                rows, lambda part: self._generate(part, prompts, seeds, negatives, edits, images, nfe),
                lambda error, row: _describe(error, prompts[row])))
        for index, message in failed.items():
            errors[index] = message
        seconds = (time.perf_counter() - started) / max(count, 1)
        out = {name: np.asarray(column) for name, column in batch.items()}
        out["image"] = np.array(images, dtype=object)
        out["nfe"] = nfe
        out["gen_seconds"] = np.full(count, seconds, dtype=np.float64)
        out["error"] = np.array(errors, dtype=object)
        return out

    def _negatives(self, batch: dict[str, np.ndarray]) -> list[str | None] | str | None:
        """Per-row negative prompts; a missing or empty cell means the run's setting (None: family default)."""
        default = self.settings.negative_prompt
        if "negative_prompt" not in batch:
            return default
        return [n if isinstance(n, str) and n else default for n in batch["negative_prompt"]]

    def _edits(self, batch: dict[str, np.ndarray], count: int) -> tuple[list, dict[int, BaseException]]:
        """Per row, its ``Edit`` (images read now) or None; and the rows whose images failed, with the error.

        A failure (missing or unreadable file, not an image, not the run's size) costs only its row and never
        sends the batch into the row-by-row retry.
        """
        from mgt.editing import Edit, load_image

        edits: list = [None] * count
        failed: dict[int, BaseException] = {}
        if "init_image" not in batch:
            return edits, failed
        masks = batch.get("mask_image")
        strengths = batch.get("strength")
        for i, uri in enumerate(batch["init_image"]):
            if not isinstance(uri, str) or not uri:
                continue
            mask_uri = masks[i] if masks is not None and isinstance(masks[i], str) and masks[i] else None
            strength = None if strengths is None or strengths[i] is None or np.isnan(strengths[i]) \
                else float(strengths[i])
            try:
                size = (self.settings.width, self.settings.height)  # checked from the headers, before decoding
                image = load_image(uri, "init_image", self.storage_options, size=size)
                mask = load_image(mask_uri, "mask_image", self.storage_options, size=size) if mask_uri else None
                edit = Edit(image, mask, strength, name=f"init_image {uri}")
                edit.check(*image.size)
                edit.start_step(self.settings.steps or self.pipe.defaults.steps)  # strength leaves >= 1 step
                edits[i] = edit
            except Exception as error:  # a bad image is its row's error, not a dead job
                if self.fail_fast:
                    raise
                failed[i] = error
        return edits, failed

    def _generate(self, rows, prompts, seeds, negatives, edits, images, nfe) -> None:
        rows = list(rows)
        result = self.settings.generate(self.pipe, [prompts[i] for i in rows], [seeds[i] for i in rows],
                                        negative_prompts=negatives if not isinstance(negatives, list)
                                        else [negatives[i] for i in rows],
                                        edits=[edits[i] for i in rows])
        for position, index in enumerate(rows):
            images[index] = encode_image(result.images[position], self.image_format, self.image_quality)
            nfe[index] = result.nfe


def encode_image(pixels: np.ndarray, image_format: ImageFormat, quality: int = 95) -> bytes:
    """`(H, W, 3)` uint8 pixels -> PNG/WebP/JPEG bytes (PNG at zlib level 6; WebP/JPEG at ``quality``)."""
    from PIL import Image

    buffer = io.BytesIO()
    options: dict[str, Any] = {} if image_format == "png" else {"quality": quality}
    Image.fromarray(pixels).save(buffer, format=image_format.upper(), **options)
    return buffer.getvalue()


def _describe(error: BaseException, prompt: str) -> str:
    """``"Type: message (prompt: '...')"`` with the prompt truncated, as Ray Data LLM's row errors."""
    short = prompt if len(prompt) <= ERROR_PROMPT_CHARS else prompt[:ERROR_PROMPT_CHARS] + "..."
    return f"{type(error).__name__}: {error} (prompt: {short!r})"
