"""The typed configuration of a ``maskray generate`` job and its config hash.

``JobOptions`` is flat so that every field is one CLI flag and one YAML key (``jobs/cli_args.py``); the
model and generation settings are the engine's own ``ModelConfig`` / ``GenerationSettings``, so a sampler,
a quantization or a token-merging option spelled in ``maskray sample`` is spelled the same here.
Defaults run on a laptop: local Ray, CPU, the tiny model, no scorer download.

``GenerateConfig.config_hash()`` covers an explicit list of factors that change the output files (pixels,
file format, scores, derived seeds). It keys ``--out``: a rerun with the same hash resumes, another hash is
refused (``pipeline.manifest``). Every ``JobOptions`` field must be listed in ``HASHED_OPTIONS`` or in
``UNHASHED_OPTIONS``, or in ``CURATION_OPTIONS`` (hashed when off its default; a test enforces it).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actors.scoring.registry import ScorerConfig
from mgt.config import GenerationSettings, ModelConfig
from pipeline.sinks.registry import SinkBuilder, describe_layouts

# Options of earlier releases, refused with the way forward rather than ignored (``jobs/cli_args.py`` keeps their
# flags and keys so that they reach this message).
REMOVED_OPTIONS = {
    "webdataset": "--webdataset was removed in maskray 0.1.0; use --layout both (files and WebDataset tars) or "
                  "--layout webdataset",
}


class JobOptions(BaseModel):
    """Input, output and Ray Data sizing of a batch generation job."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    removed_options: ClassVar[dict[str, str]] = REMOVED_OPTIONS

    prompts: str = Field("examples/prompts.parquet", description="Prompt shards: a Parquet file, a folder or a "
                         "glob of them, local or s3:// / gs://. Columns: prompt (required), prompt_id, seed, "
                         "negative_prompt, num_images (optional).")
    out: str = Field("out", description="Output root, a local folder or s3:// / gs:// URI: images/ (or webdataset/), "
                     "metrics.parquet/ (a Parquet dataset), manifest.json. Rerunning into the same --out resumes "
                     "the run.")
    seed: int = Field(0, description="Run seed: a row without a seed gets one derived from (prompt_id, run seed, "
                      "sample index); a row with a seed uses seed + sample index.")
    num_images: int = Field(1, ge=1, description="Images per prompt for rows without a num_images value.")
    image_format: Literal["png", "webp", "jpeg"] = Field("png", description="Encoding of the image files.")
    image_quality: int = Field(95, ge=1, le=100, description="WebP/JPEG quality (PNG is lossless and ignores it).")
    layout: str = Field("files", description=f"Where images go: {describe_layouts()}.")
    shard_size: int | None = Field(None, ge=1, description="Samples per shard, the unit of completion records, "
                                   "tars and resume. Unset: samples/100 within 1..1000; a run keeps the size it "
                                   "started with.")
    fail_fast: bool = Field(False, description="Stop the job at the first failed row instead of recording the "
                            "error in its metrics row.")
    keep_failed: bool = Field(False, description="On a rerun, keep the samples that failed instead of generating "
                              "them again (by default the failed samples of a shard are generated again and its "
                              "good ones kept).")
    force: bool = Field(False, description="Take over --out's lock (_lock.json) even though its owner's heartbeat "
                        "is fresh: only when that run is known to be gone.")
    lock_stale_seconds: float = Field(120.0, ge=5, description="A lock on --out whose heartbeat is older than "
                                      "this is stale and taken over (its owner refreshes it every quarter of it).")
    batch_size: int = Field(4, ge=1, description="Rows per generator call (per GPU forward).")
    generator_actors: int | str | None = Field(None, description="Generator pool: N actors, or MIN:MAX for a pool "
                                               "that Ray Data grows and shrinks between the bounds. Unset: on an "
                                               "autoscaling cluster 1:<actors its node types can host>; on a fixed "
                                               "cluster one per GPU (cluster GPUs / generator-gpus), or on CPU one "
                                               "per 2 cluster CPUs.")
    generator_gpus: float = Field(0.0, ge=0, description="GPUs per generator actor (0: CPU; 0.5 packs two "
                                  "actors on a GPU).")
    generator_cpus: float | None = Field(None, gt=0, description="CPUs reserved per generator actor. Unset: 1, "
                                         "or 0.5 on clusters (autoscaling: nodes) with at most 4 CPUs, lowered so "
                                         "one CPU stays free for the read and write tasks.")
    torch_threads: int | None = Field(None, ge=1, description="Torch intra-op threads per actor. Unset: Ray's "
                                      "setting, the actor's CPUs rounded down, at least 1 (more threads than "
                                      "reserved cores stall every op when the machine is busy).")
    wait_for_capacity: float = Field(0.0, ge=0, description="Seconds to wait for the autoscaler when the cluster, "
                                     "taken as fixed (its node types unknown: see docs/cluster.md), cannot yet hold "
                                     "the pools: the job asks it for their first actors and logs its progress; when "
                                     "the time is up it is refused as without waiting. 0: refuse at once.")
    scorer: str | None = Field(None, description="Scorer name (hps-v2, hps-v2.1, clip, or a scorer a plugin "
                               "registers under maskray.scorers) or unset for no scoring. The real HPS weights are "
                               "downloaded once from the hub (xswu/HPSv2).")
    scorer_checkpoint: str | None = Field(None, description="Scorer weights: local .pt, hub id or s3:// URI "
                                          "(unset: the scorer's default).")
    scorer_model: str | None = Field(None, description="Scorer architecture: open_clip name or JSON config file "
                                     "(HPS), hub id or folder (clip); unset: the scorer's default.")
    scorer_batch_size: int = Field(16, ge=1, description="Rows per scorer call.")
    scorer_actors: int | str | None = Field(None, description="Scorer pool: N actors or MIN:MAX. Unset: on an "
                                            "autoscaling cluster 1:<actors its node types can host>, else 1.")
    scorer_gpus: float = Field(0.0, ge=0, description="GPUs per scorer actor (fp16 on GPU, fp32 on CPU).")
    scorer_cpus: float | None = Field(None, gt=0, description="CPUs reserved per scorer actor (unset: as "
                                      "generator-cpus).")
    best_of: int = Field(1, ge=1, le=64, description="Candidates per sample: every (prompt_id, sample_idx) is "
                         "generated best-of times with derived seeds (candidate 0 uses the sample's own seed), all "
                         "are scored, the --keep best are kept. Needs --scorer.")
    keep: int = Field(1, ge=1, description="Candidates kept per sample with --best-of (the best by score; ties go "
                      "to the lower candidate index).")
    min_score: float | None = Field(None, description="Drop the samples whose kept candidate scores below this: "
                                    "their metrics rows stay with kept = false and their images are not written. "
                                    "Needs --scorer.")
    keep_all_images: bool = Field(False, description="With --best-of or --min-score, write the images of the "
                                  "candidates that are not kept too (their rows say kept = false).")
    report: bool = Field(True, description="At the end of a `maskray generate` run, write report/ under --out "
                         "(score histogram, best and worst images, report.html; `maskray report OUT` writes it "
                         "later).")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for s3:// / gs:// "
                                            "prompts and --out, e.g. {client_kwargs: {endpoint_url: ...}} (YAML only).")
    allowed_image_schemes: list[str] = Field(default_factory=list, description="URI schemes that init_image and "
                                             "mask_image may use besides the prompts' own filesystem's (e.g. https "
                                             "or s3 for local prompts); a row with another scheme is refused before "
                                             "Ray starts. Comma-separated or repeated.")

    @model_validator(mode="before")
    @classmethod
    def _refuse_removed_options(cls, data: Any) -> Any:
        """An option of an earlier release (``REMOVED_OPTIONS``) is refused with its replacement."""
        for name in REMOVED_OPTIONS:
            if isinstance(data, dict) and name in data:
                raise ValueError(REMOVED_OPTIONS[name])
        return data

    @field_validator("storage_options", mode="before")
    @classmethod
    def _refuse_unmapped_options(cls, value: Any) -> Any:
        """A string (or list) here is refused without quoting it: it may hold credentials."""
        if not isinstance(value, dict):
            raise ValueError(f"storage_options must be a mapping of fsspec options (YAML: storage_options: {{key: ..., "
                             f"secret: ...}}), got a {type(value).__name__}, not shown as it may hold credentials")
        return value

    @field_validator("allowed_image_schemes", mode="before")
    @classmethod
    def _split_schemes(cls, value: Any) -> Any:
        """``"http,https"`` or ``["https://"]`` -> ``["http", "https"]`` (lower case, without ``://``)."""
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            return value
        parts = [p for item in items for p in (item.split(",") if isinstance(item, str) else [item])]
        return [p.strip().lower().removesuffix("://") if isinstance(p, str) else p for p in parts
                if not isinstance(p, str) or p.strip()]

    @property
    def curating(self) -> bool:
        """Candidates are selected (``--best-of`` above 1 or ``--min-score``): only kept images are written."""
        return self.best_of > 1 or self.min_score is not None

    def curation_check(self) -> None:
        """Refuse curation without a scorer, and ``--keep`` above ``--best-of`` (before Ray starts).

        Raises:
            ValueError: naming the option and the fix.
        """
        if self.curating and self.scorer is None:
            option = f"--best-of {self.best_of}" if self.best_of > 1 else f"--min-score {self.min_score}"
            raise ValueError(f"{option} selects images by score, but no scorer is set; add --scorer (e.g. "
                             f"--scorer hps-v2.1, or a scorer a plugin registers)")
        if self.keep > self.best_of:
            raise ValueError(f"--keep {self.keep} is more than --best-of {self.best_of}: a sample cannot keep more "
                             f"candidates than it has; lower --keep or raise --best-of")

    @field_validator("layout")
    @classmethod
    def _check_layout(cls, value: str) -> str:
        """A registered layout (``pipeline.sinks``); the error lists them."""
        SinkBuilder.config_type(value)
        return value

    @field_validator("generator_actors", "scorer_actors", mode="before")
    @classmethod
    def _check_pool(cls, value: Any) -> Any:
        """N -> N, " 1:8" -> "1:8"; anything else is refused (by ``pool_range``)."""
        bounds = pool_range(value)
        if bounds is None:
            return None
        return bounds[0] if isinstance(value, int) or ":" not in value else f"{bounds[0]}:{bounds[1]}"


def pool_range(value: int | str | None) -> tuple[int, int] | None:
    """``4`` or ``"4"`` -> (4, 4), ``"1:8"`` -> (1, 8), None -> None (the pool is sized from the cluster).

    Raises:
        ValueError: not N or MIN:MAX with 1 <= MIN <= MAX (the message shows both forms).
    """
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", str(value)) if isinstance(value, (int, str)) else None
    if isinstance(value, bool) or match is None or not 1 <= int(match[1]) <= int(match[2] or match[1]):
        raise ValueError(f"{value!r} is not a pool size: give N actors or MIN:MAX with 1 <= MIN <= MAX "
                         f"(e.g. 4 or 1:8)")
    return int(match[1]), int(match[2] or match[1])


# Factors of the output files: a rerun into the same --out must agree on all of them.
HASHED_OPTIONS = ("seed", "image_format", "image_quality", "layout", "scorer", "scorer_checkpoint", "scorer_model")
# Curation: they change the output, but count in the hash only when set off their default, so the hash of a run
# without them is what it was before they existed.
CURATION_OPTIONS = {"best_of": 1, "keep": 1, "min_score": None, "keep_all_images": False}
# Throughput, placement, input location and bookkeeping: they never change a written file.
UNHASHED_OPTIONS = ("prompts", "out", "num_images", "fail_fast", "batch_size", "generator_actors",
                    "generator_gpus", "generator_cpus", "torch_threads", "scorer_batch_size", "scorer_actors",
                    "scorer_gpus", "scorer_cpus", "storage_options", "keep_failed", "force", "lock_stale_seconds", "report",
                    "wait_for_capacity", "shard_size", "allowed_image_schemes")  # recorded in manifest.json, which refuses a different --shard-size
# ModelConfig fields that only place or schedule the model's math; every other field (quantization, token
# merging ...) counts. compile runs the same blocks with fused kernels: tokens agree with eager on CPU (a test
# checks it) and, like a change of device, may differ only by float rounding on a GPU; the VQ decode is not
# compiled, so equal tokens give equal pixels.
UNHASHED_MODEL_FIELDS = ("device", "compile")


class GenerateConfig(BaseModel):
    """Everything a ``maskray generate`` run needs; the manifest records it in full."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    job: JobOptions = Field(default_factory=JobOptions, description="Input, output and stage sizing.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model and where it runs.")
    generation: GenerationSettings = Field(default_factory=GenerationSettings, description="Per-image settings.")

    @model_validator(mode="after")
    def _check_before_ray(self) -> GenerateConfig:
        """Refuse here, before Ray starts, what every row would fail on: an unknown scorer, a model name that
        names nothing, a sampler that cannot run the given steps (the engine's own rule)."""
        from mgt.hub.loading import check_model_name

        self.scorer_config()
        self.job.curation_check()
        check_model_name(self.model.model)
        self.generation.check_sampler_steps()
        return self

    def hashed_factors(self) -> dict[str, Any]:
        """The values that change output files, by name (what ``config_hash`` covers)."""
        job = self.job.model_dump(mode="json")
        curation = {name: job[name] for name, default in CURATION_OPTIONS.items() if job[name] != default}
        return {
            "job": {**{name: job[name] for name in HASHED_OPTIONS}, **curation},
            "model": self.model.model_dump(mode="json", exclude=set(UNHASHED_MODEL_FIELDS)),
            "generation": self.generation.model_dump(mode="json"),
        }

    def config_hash(self) -> str:
        """12 hex digits of SHA-256 over ``hashed_factors()``."""
        payload = json.dumps(self.hashed_factors(), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def scorer_config(self) -> ScorerConfig | None:
        """The scorer to build, or None when scoring is off; the device follows the stage's GPUs."""
        job = self.job
        if job.scorer is None:
            return None
        return ScorerConfig(name=job.scorer, checkpoint=job.scorer_checkpoint, model=job.scorer_model,
                            batch_size=job.scorer_batch_size, device="cuda" if job.scorer_gpus > 0 else "cpu")

    def generator_model(self) -> ModelConfig:
        """``model`` with ``device=auto`` resolved from the stage's GPUs (see ``actors.generator``)."""
        if self.model.device != "auto":
            return self.model
        return self.model.model_copy(update={"device": "cuda" if self.job.generator_gpus > 0 else "cpu"})
