"""``maskray evaluate``: does sampler X beat the baseline on this model, and by how much?

Every (prompt, seed) is generated once per sampler through the batch generation pipeline, with the same
derived seed for every sampler, and scored; the report pairs each candidate's image with the baseline's
image of the same prompt and seed (arXiv 2411.10781's HPS v2 winning rate). Each sampler's generations
live in their own resumable run folder, ``runs/<name>-<config hash>/``, so a rerun reuses every image
already there and adding a candidate later costs only that candidate's images.

A candidate may be best-of-N of a sampler, ``vanilla:best_of=3``: each (prompt, seed) gets N candidates (candidate 0
with the baseline's seed, ``pipeline.curation``) and the best scored one is compared; its NFE and time are those of
all N, so the report's "NFE per kept image" sets the paper's samplers against best-of-N at equal model calls.
"""

from __future__ import annotations

import hashlib
import io
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jobs.evaluation.report import write_report
from mgt.config import GenerationSettings, ModelConfig
from mgt.sampling.sampler_config import SamplerConfig
from mgt.validation import describe_validation_error
from pipeline.config import GenerateConfig, JobOptions
from pipeline.manifest import read_metrics
from pipeline.prompt_sets import load_prompt_set
from pipeline.prompts import prompt_ids
from pipeline.sinks.registry import SinkBuilder, serves_files
from pipeline.storage import Storage


class EvaluateOptions(BaseModel):
    """What to compare: prompt sets, seeds, the baseline and the candidate samplers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: list[str] = Field(default_factory=lambda: ["examples/eval_prompts.jsonl"], description="Prompt "
                               "set(s): a Parquet, JSON, JSONL, CSV or text file, a folder of them or a glob, "
                               "local or s3:// (optional category column; with several sets the file name is "
                               "the category).")
    out: str = Field("eval", description="Output root: runs/<sampler>-<hash>/ per sampler and report/.")
    baseline: str = Field("vanilla", description="Baseline sampler: preset or compact spec.")
    candidates: list[str] = Field(default_factory=lambda: ["noise", "differential", "zsampling"],
                                  description="Candidate samplers: presets or compact specs (comma-separated on "
                                  "the command line; a spec with overrides as its own --candidates flag).")
    seeds_per_prompt: int = Field(2, ge=1, description="Images per prompt (sample indices 0..n-1), each with "
                                  "the same derived seed for every sampler.")
    seed: int = Field(0, description="Run seed from which every (prompt, sample) seed is derived.")
    max_prompts: int | None = Field(None, ge=1, description="Use only the first N prompts of the set.")
    bootstrap_seed: int = Field(0, description="Seed of the bootstrap resampling of the confidence intervals.")

    @field_validator("candidates", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            return [piece for item in value for piece in split_candidates(str(item))]
        return value


def split_candidates(text: str) -> list[str]:
    """``noise,zsampling+noise:noise.amplitude=1.5,zsampling.num_steps=3`` -> the two specs.

    Commas inside brackets, and ``key=value`` pieces after a spec with overrides, stay with their spec.
    """
    pieces, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{(" or -(char in "]})")
        if char == "," and depth == 0:
            pieces.append(current)
            current = ""
        else:
            current += char
    pieces.append(current)
    specs: list[str] = []
    for piece in (p.strip() for p in pieces):
        if piece and specs and "=" in piece and ":" not in piece and ":" in specs[-1]:
            specs[-1] += "," + piece
        elif piece:
            specs.append(piece)
    return specs


BEST_OF = re.compile(r"(?:(?<=:)|,)\s*best_of\s*=\s*(\d+)\s*(?=,|$)")


def split_best_of(spec: str) -> tuple[str, int]:
    """``vanilla:best_of=3`` -> (``vanilla``, 3); ``noise:noise.amplitude=2,best_of=2`` -> (``noise:noise.amplitude=2``,
    2); a spec without ``best_of`` -> (spec, 1)."""
    match = BEST_OF.search(spec)
    if match is None:
        return spec, 1
    rest = (spec[:match.start()] + spec[match.end():]).replace(":,", ":").rstrip(":")
    return rest, int(match[1])


def per_kept_image(metrics: pd.DataFrame) -> pd.DataFrame:
    """A best-of run's metrics as one row per kept image, whose ``nfe`` and ``gen_seconds`` are the sums over all
    candidates of its slot (what the kept image cost)."""
    spent = metrics.groupby(["prompt_id", "sample_idx"])[["nfe", "gen_seconds"]].transform("sum")
    return metrics.assign(nfe=spent.nfe, gen_seconds=spent.gen_seconds)[metrics.kept.fillna(False).astype(bool)]


def sampler_name(spec: str) -> str:
    """A folder-safe name for a sampler spec (presets keep their name)."""
    slug = re.sub(r"[^A-Za-z0-9+_.-]+", "_", spec).strip("_")[:48]
    return slug if slug == spec else f"{slug}-{hashlib.sha256(spec.encode()).hexdigest()[:6]}"


def prepare_prompts(options: EvaluateOptions, job: JobOptions) -> tuple[str, pd.DataFrame]:
    """Write the prompt set as ``prompts.parquet`` under ``--out``; returns its URI and (prompt_id, category)."""
    table = load_prompt_set(options.prompts, job.storage_options)
    if options.max_prompts:
        table = table.slice(0, options.max_prompts)
    ids = prompt_ids(table.select(["prompt"]))
    if len(set(ids)) != len(ids):  # the same prompt twice: keep the first, as the sets are paired by prompt
        first = sorted({i: n for n, i in reversed(list(enumerate(ids)))}.values())
        table, ids = table.take(first), ids[first]
    table = table.append_column("prompt_id", pa.array(list(ids), pa.string()))
    out = Storage(options.out, job.storage_options)
    buffer = io.BytesIO()
    pq.write_table(table.select(["prompt_id", "prompt", "category"]), buffer)
    out.write_atomic(out.path("prompts.parquet"), buffer.getvalue())
    return out.url("prompts.parquet"), table.select(["prompt_id", "category"]).to_pandas()


def run_evaluate(options: EvaluateOptions, job: JobOptions, model: ModelConfig, generation: GenerationSettings,
                 connect: Callable[[], None] | None = None, log: Callable[[str], None] = print) -> dict:
    """Generate and score every sampler's images (reusing what exists), then write the report.

    Returns:
        The report summary (``report/report.json``) plus ``failed_samples``: per sampler whose run has failed
        or missing samples, their counts and its metrics path (the report compares the samples that exist).
    """
    from pipeline.generate import run_generate

    if job.scorer is None:
        raise ValueError("evaluation needs a scorer: pass --scorer (hps-v2, hps-v2.1, clip or a plugin's scorer)")
    if not serves_files(job.layout):
        raise ValueError(f"the evaluation report reads images as files, which layout {job.layout} does not write; "
                         f"use --layout {' or '.join(n for n in SinkBuilder.names() if serves_files(n))}")
    specs = {sampler_name(s): s for s in [options.baseline, *options.candidates]}  # run name -> what the user wrote
    best_of = {name: split_best_of(spec)[1] for name, spec in specs.items()}
    samplers = {name: SamplerConfig.from_spec(split_best_of(spec)[0]) for name, spec in specs.items()}
    baseline, candidates = sampler_name(options.baseline), [sampler_name(c) for c in options.candidates]
    if baseline in candidates:
        raise ValueError(f"the baseline {options.baseline!r} is also a candidate; drop it from --candidates")
    sampler_job = job.model_copy(update={"num_images": options.seeds_per_prompt, "seed": options.seed})
    try:  # every sampler's settings are checked here, before any prompt is written or Ray starts
        configs = {name: GenerateConfig(job=sampler_job.model_copy(update={"best_of": best_of[name]}), model=model,
                                        generation=generation.model_copy(update={"sampler": sampler}))
                   for name, sampler in samplers.items()}
    except ValidationError as error:
        raise ValueError(f"invalid options: {describe_validation_error(error)}") from None
    prompts_uri, categories = prepare_prompts(options, job)
    out = Storage(options.out, job.storage_options)
    connected, frames, failed = False, [], {}
    for name, config in configs.items():
        run_job = config.job.model_copy(update={"prompts": prompts_uri,
                                                 "out": out.url("runs", f"{name}-{config.config_hash()}")})
        config = config.model_copy(update={"job": run_job})
        log(f"maskray evaluate: sampler {name} -> {run_job.out}")
        run = run_generate(config, log=log, connect=None if connected or connect is None else connect)
        connected = True
        if not run.complete:
            failed[name] = {"errors": run.errors, "missing": run.missing, "metrics": run.metrics_uri}
        metrics = read_metrics(Storage(run_job.out, job.storage_options)).to_pandas()
        frames.append((per_kept_image(metrics) if best_of[name] > 1 else metrics).assign(sampler=name))
    scores = pd.concat(frames, ignore_index=True).merge(categories, on="prompt_id", how="left")
    summary = write_report_to(out, scores, baseline, candidates, job.storage_options, options.bootstrap_seed, specs)
    for name in candidates:
        c = summary["comparisons"][name]["overall"]
        log(f"maskray evaluate: {specs[name]} vs {options.baseline}: win rate {100 * c['win_rate']:.1f}% "
            f"({c['wins']}/{c['ties']}/{c['losses']} W/T/L, p={c['sign_test_p']:.3g}), "
            f"mean diff {c['mean_difference']:+.4f}")
    log(f"maskray evaluate: report in {out.url('report')}/ (report.md, report.json, win_rates.png, scores.png, "
        "grid.png)")
    return {**summary, "failed_samples": failed}


def write_report_to(out: Storage, scores: pd.DataFrame, baseline: str, candidates: list[str],
                    storage_options: dict, seed: int, specs: dict[str, str]) -> dict:
    """Write the report under ``--out/report``: directly on local disk, via a temp folder for object stores."""
    def read_image(uri: str) -> bytes:
        storage = Storage(uri, storage_options)
        return storage.read(storage.root)

    if out.local:
        return write_report(scores, baseline, candidates, Path(out.path("report")), read_image, seed, specs)
    with tempfile.TemporaryDirectory(prefix="maskray-report-") as folder:
        summary = write_report(scores, baseline, candidates, Path(folder), read_image, seed, specs)
        for file in Path(folder).iterdir():
            out.write_atomic(out.path("report", file.name), file.read_bytes())
    return summary
