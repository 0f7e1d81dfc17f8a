"""The batch generation dataflow: shards -> read -> expand -> repartition -> generate -> score -> write, resumable.

``build_dataset`` only builds (lazy Ray Data plan) over the shards still to do; ``run_generate`` checks the
input and ``--out``, finds the done shards (``pipeline.shards``, ``pipeline.manifest``), sizes the actor pools
(``pipeline.pools``), executes the plan into a ``SampleSink`` and finalizes the run. Ray must already be
initialised (the job starts it: ``jobs/generate_cmd.py``), so the same code runs on a laptop and on a cluster.
Tiny prompt shards are coalesced by the reader, so the sample rows are repartitioned into blocks of
``batch_size`` rows and every actor gets work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import ray

from actors.generator import Generator
from actors.scoring_stage import ScoringStage
from mgt.models.families import model_family
from pipeline import manifest as run_manifest
from pipeline.capacity import pool_usage
from pipeline.capacity_wait import plan_pools
from pipeline.config import UNHASHED_MODEL_FIELDS, GenerateConfig
from pipeline.curation import Curation
from pipeline.lease import LeaseLost, RunLease
from pipeline.partial import assemble_whole_pieces
from pipeline.pools import StagePlan, watch_autoscaler
from pipeline.prompts import expand_samples, scan_prompts
from pipeline.redact import secret_values
from pipeline.result import RunResult
from pipeline.shards import Shard, default_shard_size, plan_shards, read_shards
from pipeline.sinks.datasink import SampleSink
from pipeline.sinks.registry import SinkBuilder
from pipeline.storage import Storage


@dataclass(frozen=True)
class WorkPlan:
    """What a run reads and what it has left to do, as the driver found it before Ray work starts.

    Attributes:
        prompts: the ``--prompts`` storage.
        columns: the prompt columns to read.
        shards: every shard of the run (what ``finalize`` counts).
        todo: the shards without a good completion record, to generate.
        shard_size: samples per shard.
        partly_written: of ``todo``, the partial shards (``"pieces"`` or ``"record"``, ``pipeline.partial``):
            their read task keeps the samples already written and only the others are generated.
    """

    prompts: Storage
    columns: list[str]
    shards: list[Shard]
    todo: list[Shard]
    shard_size: int
    partly_written: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Stages:
    """The dataflow's actor stages: their pools (``pipeline.pools``) and the generator's actor class.

    ``generator_stage`` takes ``Generator``'s constructor arguments and returns its columns (a benchmark plugs in
    a stub there).
    """

    generator: StagePlan
    scorer: StagePlan | None
    generator_stage: type = Generator


def build_dataset(config: GenerateConfig, work: WorkPlan, stages: Stages) -> ray.data.Dataset:
    """The lazy plan from the shards ``work.todo`` to scored image rows (the sink is attached by ``run_generate``).

    Each shard descriptor is its own block, so shards are read in parallel and reach the actors in plan
    order (few shards in flight at a time). The read task of a partly written shard keeps the samples already
    written under ``--out`` (``pipeline.partial``).
    """
    job = config.job
    generator, scorer = stages.generator, stages.scorer
    batches = -(-sum(s.samples for s in work.todo) // generator.batch_size)
    descriptors = [{"name": s.name, "file": s.file, "start": s.start, "stop": s.stop, "samples": s.samples,
                    "resume": work.partly_written.get(s.name, "")} for s in work.todo]
    written = SampleSink(Storage(job.out, job.storage_options), {}, job.image_format, job.layout,
                         curation=curation(config))
    ds = ray.data.from_items(descriptors, override_num_blocks=max(1, len(descriptors)))
    ds = ds.map_batches(read_shards, batch_format="pyarrow",
                        fn_kwargs={"storage": work.prompts, "columns": work.columns, "sink": written,
                                   "keep_failed": job.keep_failed})
    ds = ds.map_batches(expand_samples, batch_format="numpy",
                        fn_kwargs={"run_seed": job.seed, "num_images": job.num_images, "best_of": job.best_of})
    ds = ds.repartition(target_num_rows_per_block=generator.batch_size)
    ds = ds.map_batches(
        stages.generator_stage, batch_format="numpy", batch_size=generator.batch_size, udf_modifying_row_count=False,
        compute=generator.compute(batches), num_cpus=generator.num_cpus,
        num_gpus=generator.num_gpus or None,
        fn_constructor_kwargs={"model": config.generator_model().model_dump(mode="json"),
                               "settings": config.generation.model_dump(mode="json"),
                               "image_format": job.image_format, "image_quality": job.image_quality,
                               "fail_fast": job.fail_fast, "torch_threads": generator.torch_threads,
                               "storage_options": job.storage_options})
    if scorer is not None:
        ds = ds.map_batches(
            ScoringStage, batch_format="numpy", batch_size=scorer.batch_size, udf_modifying_row_count=False,
            compute=scorer.compute(batches), num_cpus=scorer.num_cpus,
            num_gpus=scorer.num_gpus or None,
            fn_constructor_kwargs={"scorer": config.scorer_config().model_dump(mode="json"),
                                   "fail_fast": job.fail_fast})
    return ds


def curation(config: GenerateConfig) -> Curation:
    """The run's candidate selection (``pipeline.curation``)."""
    job = config.job
    return Curation(job.best_of, job.keep, job.min_score, job.keep_all_images)


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


def prompt_check(config: GenerateConfig) -> Callable[[Sequence[str], str | None], None] | None:
    """The model family's prompt check with the run's ``--negative-prompt``, for the scan before Ray starts
    (None when the driver cannot tell the family; the workers then refuse a bad prompt per row)."""
    family = model_family(config.model.model)
    if family is None:
        return None
    negative = config.generation.negative_prompt

    def check(prompts: Sequence[str], row_negative: str | None) -> None:
        family.check_prompts(prompts, negative or row_negative)

    return check


def run_generate(config: GenerateConfig, log: Callable[[str], None] = print,
                 connect: Callable[[], None] | None = None, generator_stage: type = Generator) -> RunResult:
    """Generate every shard of ``config.job.prompts`` that has no good completion record under ``config.job.out``.

    Order: scan the prompts (errors here leave ``--out`` untouched), take ``--out``'s lease
    (``pipeline.lease``: a second live run is refused), check ``--out``'s config hash and shard size, plan the
    shards, call ``connect`` (the job's ``ray.init``; None when Ray is already up), assemble the shards a crash
    left whole in pieces, read the completion records (the failed samples of a shard are generated again unless
    ``--keep-failed``), open an attempt, run the plan over the samples left (``pipeline.partial``), finalize. An
    exception after the attempt opened closes it as failed in ``manifest.json``, with the error's type and
    message (credentials scrubbed). ``generator_stage`` is the generator's actor class (``Stages``).

    Returns:
        The run's result (``pipeline.manifest.finalize``) with its ``timings``: ``resume_seconds`` (input scan,
        shard plan and record check: until the run knows what is left), ``ray_start_seconds``,
        ``generate_seconds`` and ``finalize_seconds``; and its ``actors``: per stage, the most actors alive
        at once, the nodes they ran on and each one's start in seconds from the run's start (also stored in the
        manifest's attempt).
    """
    job = config.job
    begun = time.perf_counter()
    prompts = Storage(job.prompts, job.storage_options)
    out = Storage(job.out, job.storage_options)
    scan = scan_prompts(job.prompts, prompts, job.num_images, prompt_check(config), job.allowed_image_schemes)
    with RunLease(out, job.lock_stale_seconds, job.force, log) as lease:
        existing = run_manifest.check_out(out, config)
        most = SinkBuilder.config_type(job.layout).default_max_shard_size
        # a shard holds every candidate of its samples (--best-of): its size and rows count candidates
        candidates = scan.samples * job.best_of
        size = run_manifest.shard_size(existing, job, candidates, lambda n: default_shard_size(n, most))
        plan = plan_shards(scan.files, [rows * job.best_of for rows in scan.row_samples], size)
        before_ray = time.perf_counter()
        if connect is not None:
            connect()
        connected = time.perf_counter()
        capacity, *plans = plan_pools(config, log)  # waits up to --wait-for-capacity for a cluster to hold them
        planned = time.perf_counter()
        stages = Stages(*plans, generator_stage=generator_stage)
        # assembly uses no run constants; whole pieces left by a crash become records before the record scan
        partial = assemble_whole_pieces(SampleSink(out, {}, job.image_format, job.layout, curation=curation(config)),
                                        {shard.name: shard.samples for shard in plan})
        records = run_manifest.scan_records(out, plan, keep_failed=job.keep_failed)
        for name, reason in sorted(records.bad.items()):
            again = "its failed samples are" if name in records.failed else "its shard is"
            log(f"maskray generate: completion record {out.url('_shards', name + '.parquet')} is {reason}; "
                f"{again} generated again")
        todo = [shard for shard in plan if shard.name not in records.done]
        partly_written = {**{name: "pieces" for name in partial}, **{name: "record" for name in records.failed}}
        partly_written = {name: how for name, how in partly_written.items() if name not in records.done}
        work = WorkPlan(prompts, scan.columns, plan, todo, size, partly_written)
        done = sum(records.done.values())
        resume = (before_ray - begun) + (time.perf_counter() - planned)  # not the wait for capacity
        generator, scorer = stages.generator, stages.scorer
        log(f"maskray generate: {scan.rows} prompts -> {scan.samples} samples"
            + (f" x {job.best_of} candidates" if job.best_of > 1 else "") + f" in {len(scan.files)} file(s), "
            f"{len(plan)} shard(s) of ~{size}; {len(plan) - len(todo)} shard(s) ({done} samples) already done under "
            f"{out.uri}" + (f", {len(partly_written)} partly written (their written samples are kept)"
                              if partly_written else "")
            + f"; {generator.describe()} generator actor(s) "
            f"({generator.num_gpus:g} GPU, {generator.num_cpus:g} CPU each, batch {generator.batch_size})"
            + (f", {scorer.describe()} scorer actor(s) ({job.scorer})" if scorer else ", no scorer"))
        watch = watch_autoscaler(capacity, generator, scorer, log)
        manifest = run_manifest.start_attempt(out, config, existing, [prompts.uri], done, size)
        try:
            result = _execute(config, work, stages, manifest, lease)
        except LeaseLost:  # --out belongs to another run now: its manifest is not this run's to write
            raise
        except BaseException as error:  # a crash or Ctrl-C: the attempt is closed as failed, never left running
            run_manifest.fail_attempt(out, manifest, error, secret_values(config.model_dump(mode="json")))
            raise
        finally:
            if watch is not None:
                watch.stop()
    result = replace(result, timings={"resume_seconds": round(resume, 3),
                                      "ray_start_seconds": round(connected - before_ray, 3), **result.timings})
    score = "n/a" if result.mean_score is None else f"{result.mean_score:.4f}"
    log(f"maskray generate: {result.rows}/{result.expected} samples under {out.uri} "
        f"({result.generated} generated now, {result.errors} errors, "
        f"{result.images_per_second or 0:.2f} images/s incl. actor start-up, mean score {score})")
    if result.dropped:
        kept_score = "n/a" if result.mean_kept_score is None else f"{result.mean_kept_score:.4f}"
        log(f"maskray generate: kept {result.kept} image(s) (mean score {kept_score}) of {result.rows} candidate(s); "
            f"dropped {sum(result.dropped.values())} sample(s)"
            + (f": {result.dropped['below_min_score']} below --min-score {job.min_score}," if job.min_score is not None
               else ":")
            + f" {result.dropped['no_good_candidate']} without a good scored candidate")
    return result


def _execute(config: GenerateConfig, work: WorkPlan, stages: Stages, manifest: dict, lease: RunLease) -> RunResult:
    """Generate the shards ``work.todo`` (keeping the written samples of the partly written ones) and finalize
    (only while this run still holds ``--out``'s lease)."""
    job = config.job
    out = Storage(job.out, job.storage_options)
    attempt = manifest["attempts"][-1]["attempt"]
    sink = SampleSink(out, run_constants(config, attempt), job.image_format, job.layout, work.shard_size,
                      curation=curation(config))
    started, started_at = time.perf_counter(), time.time()
    if work.todo:
        build_dataset(config, work, stages).write_datasink(sink)
    generated = time.perf_counter()
    actors = {"generator": pool_usage(stages.generator_stage.__name__, started_at).as_dict(),
              **({"scorer": pool_usage("ScoringStage", started_at).as_dict()} if stages.scorer else {})}
    manifest["attempts"][-1]["actors"] = actors  # written with the attempt by finalize
    lease.check()  # finalize removes leftovers: never on behalf of a run that lost --out to another
    result = run_manifest.finalize(sink, manifest, work.shards, generated - started)
    return replace(result, actors=actors, timings={"generate_seconds": round(generated - started, 3),
                                                   "finalize_seconds": round(time.perf_counter() - generated, 3)})
