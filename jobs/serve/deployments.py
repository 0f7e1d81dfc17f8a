"""The model-holding Serve deployments: ``ImageGenerator`` (batched MGT sampling) and ``ImageScorer``.

Batching keeps every image's own seed: ``@serve.batch`` gathers single images from all the requests a
replica holds, the batch is split by generation settings (steps, guidance, size, sampler: what one
``MGTPipeline.generate`` call must share) and each group runs as one call with one ``torch.Generator`` per
image. An image therefore depends only on (prompt, seed, settings), never on its batch-mates, so a batched
request returns the bytes it would get alone. Negative prompts are per image and do not split a group, and
neither are edits (``mgt.editing.Edit``: init image, mask, strength): the engine takes one per sample, encodes
each image alone and runs samples of different start steps as separate loops, so an edited image too depends
only on (prompt, seed, settings, edit), and edits share batches with generations of the same settings.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
from ray import serve

from actors.scoring.registry import ScorerConfig
from jobs.serve.config import ServeConfig
from mgt.config import GenerationSettings, ModelConfig
from mgt.editing import Edit


class GenerationCancelled(RuntimeError):
    """Every request of a group was cancelled (timed out or disconnected) while it was sampling."""


@dataclass
class ImageJob:
    """One image to generate. ``settings`` carries no negative prompt: that is per image."""

    prompt: str
    seed: int
    negative_prompt: str | None
    settings: GenerationSettings
    edit: Edit | None = None  # img2img or inpainting of this image; None: a plain generation
    cancelled: bool = False  # set by the request's coroutine, read by the sampling thread between steps

    @property
    def batch_key(self) -> str:
        """Images with equal keys can share one ``generate`` call."""
        return self.settings.model_dump_json()


def check_settings(pipe, settings: GenerationSettings, edit: Edit | None = None) -> None:
    """Raise the engine's own ValueError for settings ``pipe.generate`` would refuse, before any work starts: a
    size off the model's grid, Masked Z-Sampling zigzagging on more steps than T-1, or an edit whose image is
    not of the settings' size or whose strength runs no step."""
    pipe.check_size(settings.width, settings.height)
    settings.check_sampler_steps()
    if edit is not None:
        edit.check(settings.width, settings.height)
        edit.start_step(settings.steps)


def load_model(config: ModelConfig):
    """The pipeline of ``config``; every ModelConfig field reaches ``mgt.load_pipeline`` by name, so a field the
    loader does not know fails loudly instead of being silently ignored."""
    import mgt

    return mgt.load_pipeline(config.model, **config.model_dump(exclude={"model"}))


@serve.deployment(ray_actor_options={"num_cpus": 1})
class ImageGenerator:
    """Holds one loaded model and answers ``generate`` calls, batching their images (see the module doc)."""

    def __init__(self, config: ServeConfig):
        self.pipe = load_model(config.model)
        self._generate_batch.set_max_batch_size(config.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self._stats = {"batches": 0, "generate_calls": 0, "images": 0, "largest_batch": 0, "cancelled_calls": 0}

    def describe(self) -> dict:
        """The model's family, default settings and size step, for the ingress to validate requests."""
        d = self.pipe.defaults
        return {"family": self.pipe.family, "size_multiple": self.pipe.size_multiple, "steps": d.steps,
                "guidance": d.guidance, "width": d.width, "height": d.height, "loaded_at": int(time.time())}

    def stats(self) -> dict:
        """Counters since start: batches formed, generate calls (one per settings group), images, the largest
        batch and generate calls abandoned because all their requests were cancelled."""
        return dict(self._stats)

    async def generate(self, prompt: str, seeds: list[int], negative_prompt: str | None,
                       settings: GenerationSettings, edit: Edit | None = None) -> list[np.ndarray]:
        """One ``(H, W, 3)`` uint8 image per seed for ``prompt``, each batched with other requests' images.

        Args:
            prompt: the text to draw.
            seeds: one seed per image.
            negative_prompt: the unconditional branch's text; None is the family default.
            settings: steps, guidance, width, height and sampler, all resolved (no negative prompt).
            edit: the image every seed edits (its size is the settings'), or None to generate.
        """
        check_settings(self.pipe, settings, edit)  # a refusal is the client's: no image of it joins a batch
        jobs = [ImageJob(prompt, seed, negative_prompt, settings, edit) for seed in seeds]
        try:
            results = await asyncio.gather(*(self._generate_batch(job) for job in jobs))
        except asyncio.CancelledError:
            for job in jobs:
                job.cancelled = True
            raise
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)  # both reset from the config in __init__
    async def _generate_batch(self, jobs: list[ImageJob]) -> list[np.ndarray | Exception]:
        groups: dict[str, list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.batch_key, []).append(index)
        results: list[np.ndarray | Exception] = [None] * len(jobs)
        for indices in groups.values():
            group = [jobs[i] for i in indices]
            try:
                images = await asyncio.to_thread(self._run_group, group)
            except Exception as error:  # one group's failure is its own, not its batch-mates'
                images = [error] * len(group)
            for index, image in zip(indices, images):
                results[index] = image
        self._stats["batches"] += 1
        self._stats["images"] += len(jobs)
        self._stats["largest_batch"] = max(self._stats["largest_batch"], len(jobs))
        return results

    def _run_group(self, group: list[ImageJob]) -> list[np.ndarray]:
        settings = group[0].settings

        def stop_if_abandoned(step: int) -> None:
            if all(job.cancelled for job in group):
                self._stats["cancelled_calls"] += 1
                raise GenerationCancelled(f"all {len(group)} requests of this generate call were cancelled at "
                                          f"step {step + 1}/{settings.steps}")

        self._stats["generate_calls"] += 1
        output = settings.generate(self.pipe, [job.prompt for job in group], [job.seed for job in group],
                                   negative_prompts=[job.negative_prompt for job in group],
                                   edits=[job.edit for job in group], on_step=stop_if_abandoned)
        return list(output.images)


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class ImageScorer:
    """Holds one scorer (``actors.scoring.registry``) and rates images against their prompts, batched across requests."""

    def __init__(self, config: ScorerConfig):
        from actors.scoring.registry import build_scorer_from_config

        self.scorer = build_scorer_from_config(config)

    async def score(self, images: list[np.ndarray], prompts: list[str]) -> list[float]:
        """One score per ``(H, W, 3)`` uint8 image and its prompt, higher meaning a better match."""
        return list(await asyncio.gather(*(self._score_batch((image, prompt))
                                           for image, prompt in zip(images, prompts))))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)  # the scorer splits by its own batch_size
    async def _score_batch(self, pairs: list[tuple[np.ndarray, str]]) -> list[float]:
        from PIL import Image

        images = [Image.fromarray(image) for image, _ in pairs]
        return await asyncio.to_thread(self.scorer.score, images, [prompt for _, prompt in pairs])
