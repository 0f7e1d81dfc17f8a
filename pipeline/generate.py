"""The batch generation dataflow: shards -> read -> expand -> repartition -> generate -> score -> write, resumable.

``build_dataset`` only builds (lazy Ray Data plan) over the shards still to do; ``run_generate`` checks the
input and ``--out``, finds the done shards (``pipeline.shards``, ``pipeline.manifest``), executes the plan
into a ``SampleSink`` and finalizes the run. Ray must already be initialised (the job starts
it: ``jobs/generate_cmd.py``), so the same code runs on a laptop and on a cluster.

Sizing rules (DESIGN.md "Ray facts that bite"): stages use ``compute=ActorPoolStrategy(size=...)``; a GPU
stage gets an integer batch size; on clusters with at most 4 CPUs actors reserve half a CPU so read and
write tasks can still be scheduled; tiny prompt shards are coalesced by the reader, so the sample rows are
repartitioned into blocks of ``batch_size`` rows and every actor gets work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import ray

from actors.generator import Generator
from actors.scoring_stage import ScoringStage
from pipeline import manifest as run_manifest
from pipeline.config import GenerateConfig, UNHASHED_MODEL_FIELDS
from pipeline.prompts import expand_samples, scan_prompts
from pipeline.shards import Shard, default_shard_size, plan_shards, read_shards
from pipeline.sink import PIECES, SampleSink
from pipeline.storage import Storage

SMALL_CLUSTER_CPUS = 4


@dataclass(frozen=True)
class StagePlan:
    """Resolved resources of one actor stage."""

    actors: int
    num_cpus: float
    num_gpus: float
    batch_size: int
    torch_threads: int | None


def plan_stages(config: GenerateConfig, resources: dict[str, float]) -> tuple[StagePlan, StagePlan | None]:
    """Pool sizes and per-actor resources for the generator and scorer stages on a cluster of ``resources``.

    Unset CPU shares are 1 per actor (0.5 on clusters of at most 4 CPUs), lowered so that one CPU stays free
    for Ray Data's read and write tasks: without it the read task never starts and the job waits forever.

    Raises:
        ValueError: GPUs are requested but the cluster has none, or explicit CPU shares leave no CPU for the
            read and write tasks (names the flags to change).
    """
    job = config.job
    cpus, gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
    default_cpus = 0.5 if cpus <= SMALL_CLUSTER_CPUS else 1.0
    for flag, wanted in (("--generator-gpus", job.generator_gpus), ("--scorer-gpus", job.scorer_gpus)):
        if wanted > gpus:
            raise ValueError(f"{flag} {wanted} but the Ray cluster has {gpus:g} GPUs; lower {flag} (0 runs on CPU) "
                             f"or connect to a GPU cluster with RAY_ADDRESS")
    if job.generator_actors is not None:
        actors = job.generator_actors
    elif job.generator_gpus > 0:
        actors = max(1, int(gpus // job.generator_gpus))
    else:
        actors = max(1, int(cpus // 2))
    scorer_actors = job.scorer_actors if job.scorer is not None else 0
    pool = actors + scorer_actors
    if cpus > 1 and pool * default_cpus > cpus - 1:  # unset shares leave one CPU for the read and write tasks
        default_cpus = (cpus - 1) / pool
    generator_cpus = job.generator_cpus or default_cpus
    scorer_cpus = job.scorer_cpus or job.generator_cpus or default_cpus
    reserved = actors * generator_cpus + scorer_actors * scorer_cpus
    if reserved > cpus - 1 and cpus > 1:
        raise ValueError(f"the actor pools reserve {reserved:g} of the cluster's {cpus:g} CPUs ({actors} generator x "
                         f"{generator_cpus:g} + {scorer_actors} scorer x {scorer_cpus:g}), leaving less than the 1 CPU "
                         f"that Ray Data's read and write tasks need, so the job would wait forever; lower "
                         f"--generator-cpus / --scorer-cpus or --generator-actors / --scorer-actors")
    generator = StagePlan(actors, generator_cpus, job.generator_gpus, job.batch_size, job.torch_threads)
    if job.scorer is None:
        return generator, None
    return generator, StagePlan(scorer_actors, scorer_cpus, job.scorer_gpus, job.scorer_batch_size, None)


def build_dataset(config: GenerateConfig, shards: list[Shard], columns: list[str], prompts: Storage,
                  generator: StagePlan, scorer: StagePlan | None,
                  generator_stage: type = Generator) -> ray.data.Dataset:
    """The lazy plan from the shards to do to scored image rows (the sink is attached by ``run_generate``).

    Each shard descriptor is its own block, so shards are read in parallel and reach the actors in plan
    order (few shards in flight at a time). ``generator_stage`` is the generator actor class; it takes
    ``Generator``'s constructor arguments and returns its columns (a benchmark plugs in a stub there).
    """
    job = config.job
    descriptors = [{"name": s.name, "file": s.file, "start": s.start, "stop": s.stop, "samples": s.samples}
                   for s in shards]
    ds = ray.data.from_items(descriptors, override_num_blocks=max(1, len(descriptors)))
    ds = ds.map_batches(read_shards, batch_format="pyarrow", fn_kwargs={"storage": prompts, "columns": columns})
    ds = ds.map_batches(expand_samples, batch_format="numpy",
                        fn_kwargs={"run_seed": job.seed, "num_images": job.num_images})
    ds = ds.repartition(target_num_rows_per_block=generator.batch_size)
    ds = ds.map_batches(
        generator_stage, batch_format="numpy", batch_size=generator.batch_size, udf_modifying_row_count=False,
        compute=ray.data.ActorPoolStrategy(size=generator.actors), num_cpus=generator.num_cpus,
        num_gpus=generator.num_gpus or None,
        fn_constructor_kwargs={"model": config.generator_model().model_dump(mode="json"),
                               "settings": config.generation.model_dump(mode="json"),
                               "image_format": job.image_format, "image_quality": job.image_quality,
                               "fail_fast": job.fail_fast, "torch_threads": generator.torch_threads})
    if scorer is not None:
        ds = ds.map_batches(
            ScoringStage, batch_format="numpy", batch_size=scorer.batch_size, udf_modifying_row_count=False,
            compute=ray.data.ActorPoolStrategy(size=scorer.actors), num_cpus=scorer.num_cpus,
            num_gpus=scorer.num_gpus or None,
            fn_constructor_kwargs={"scorer": config.scorer_config().model_dump(mode="json"),
                                   "fail_fast": job.fail_fast})
    return ds


def run_constants(config: GenerateConfig, attempt: int) -> dict:
    """The metrics columns that are the same for every row of this run."""
    fields = type(config.model).model_fields
    extra = {k: v for k, v in config.model.model_dump(exclude={"model", "dtype", "variant",
                                                               *UNHASHED_MODEL_FIELDS}).items()
             if v != fields[k].default}  # quantization / token merging when set, e.g. "fp16,quant=w4a8"
    quantization = ",".join([config.model.dtype, *(f"{k}={v}" for k, v in sorted(extra.items()))])
    sampler = config.generation.sampler
    return {"model": config.model.model, "quantization": quantization,
            "sampler": sampler.model_dump_json(), "sampler_hash": sampler.config_hash(),
            "config_hash": config.config_hash(), "scorer": config.job.scorer, "attempt": attempt}


def run_generate(config: GenerateConfig, log: Callable[[str], None] = print,
                 connect: Callable[[], None] | None = None, generator_stage: type = Generator) -> dict:
    """Generate every shard of ``config.job.prompts`` that has no good completion record under ``config.job.out``.

    Order: scan the prompts (errors here leave ``--out`` untouched), check ``--out``'s config hash and
    shard size, plan the shards, call ``connect`` (the job's ``ray.init``; None when Ray is already up),
    read the completion records, open an attempt, run the plan over the shards left, finalize.

    Returns:
        The run summary (see ``pipeline.manifest.finalize``) plus ``timings``: ``resume_seconds`` (input scan,
        shard plan and record check: until the run knows what is left), ``ray_start_seconds``,
        ``generate_seconds`` and ``finalize_seconds``.
    """
    job = config.job
    begun = time.perf_counter()
    prompts = Storage(job.prompts, job.storage_options)
    out = Storage(job.out, job.storage_options)
    scan = scan_prompts(job.prompts, prompts, job.num_images)
    existing = run_manifest.check_out(out, config)
    size = run_manifest.shard_size(existing, job, scan.samples, default_shard_size)
    plan = plan_shards(scan.files, scan.row_samples, size)
    before_ray = time.perf_counter()
    if connect is not None:
        connect()
    connected = time.perf_counter()
    generator, scorer = plan_stages(config, ray.cluster_resources())
    records = run_manifest.scan_records(out, plan)
    for name, reason in sorted(records.bad.items()):
        log(f"maskray generate: completion record {out.url('_shards', name + '.parquet')} is {reason}; its shard "
            f"is generated again")
    todo = [shard for shard in plan if shard.name not in records.done]
    done = sum(records.done.values())
    resume = (before_ray - begun) + (time.perf_counter() - connected)
    log(f"maskray generate: {scan.rows} prompts -> {scan.samples} samples in {len(scan.files)} file(s), "
        f"{len(plan)} shard(s) of ~{size}; {len(plan) - len(todo)} shard(s) ({done} samples) already done under "
        f"{out.uri}; {generator.actors} generator actor(s) "
        f"({generator.num_gpus:g} GPU, {generator.num_cpus:g} CPU each, batch {generator.batch_size})"
        + (f", {scorer.actors} scorer actor(s) ({job.scorer})" if scorer else ", no scorer"))
    manifest = run_manifest.start_attempt(out, config, existing, [prompts.uri], done, size)
    attempt = manifest["attempts"][-1]["attempt"]
    started = time.perf_counter()
    if todo:
        out.remove(out.path(PIECES))  # rows of shards a crashed attempt left incomplete: those shards are redone
        ds = build_dataset(config, todo, scan.columns, prompts, generator, scorer, generator_stage)
        ds.write_datasink(SampleSink(out, run_constants(config, attempt), job.image_format, job.layout, size))
    generated = time.perf_counter()
    summary = run_manifest.finalize(out, manifest, plan, generated - started)
    summary["timings"] = {"resume_seconds": round(resume, 3), "ray_start_seconds": round(connected - before_ray, 3),
                          "generate_seconds": round(generated - started, 3),
                          "finalize_seconds": round(time.perf_counter() - generated, 3)}
    score = "n/a" if summary["mean_score"] is None else f"{summary['mean_score']:.4f}"
    log(f"maskray generate: {summary['rows']}/{summary['expected']} samples under {out.uri} "
        f"({summary['generated']} generated now, {summary['errors']} errors, "
        f"{summary['images_per_second'] or 0:.2f} images/s incl. actor start-up, mean score {score})")
    return summary
