"""The batch generation dataflow: shards -> read -> expand -> repartition -> generate -> score -> write, resumable.

``build_dataset`` only builds (lazy Ray Data plan) over the shards still to do; ``run_generate`` checks the
input and ``--out``, finds the done shards (``pipeline.shards``, ``pipeline.manifest``), executes the plan
into a ``SampleSink`` and finalizes the run. Ray must already be initialised (the job starts
it: ``jobs/generate_cmd.py``), so the same code runs on a laptop and on a cluster.

Sizing rules (docs/ray-notes.md §3): stages use ``compute=ActorPoolStrategy(...)``, a fixed size
or a MIN:MAX range that Ray Data scales, sized by ``plan_stages`` from what the cluster has now (fixed
cluster) or can add (autoscaling cluster, ``pipeline.capacity``); a GPU stage gets an integer batch size;
actors leave a CPU free so read and write tasks can still be scheduled; tiny prompt shards are coalesced by
the reader, so the sample rows are repartitioned into blocks of ``batch_size`` rows and every actor gets work.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import ray

from actors.generator import Generator
from actors.scoring_stage import ScoringStage
from pipeline import manifest as run_manifest
from pipeline.capacity import ENV as CAPACITY_ENV
from pipeline.capacity import Capacity, NodeWatch, nodes_to_wait_for, per_node, pool_usage, read_capacity
from pipeline.config import UNHASHED_MODEL_FIELDS, GenerateConfig, pool_range
from pipeline.lease import LeaseLost, RunLease
from pipeline.partial import assemble_whole_pieces
from pipeline.prompts import expand_samples, scan_prompts
from pipeline.redact import secret_values
from pipeline.shards import Shard, default_shard_size, plan_shards, read_shards
from pipeline.sink import SampleSink
from pipeline.storage import Storage

SMALL_CLUSTER_CPUS = 4


@dataclass(frozen=True)
class StagePlan:
    """Resolved resources of one actor stage: a pool of ``min_actors`` to ``max_actors`` (None: no bound).

    ``eager``: start the pool at its maximum (capped by the work), so that an autoscaler is asked for every
    node at once instead of Ray Data doubling the pool every few seconds; idle actors still scale it down.
    """

    min_actors: int
    max_actors: int | None
    num_cpus: float
    num_gpus: float
    batch_size: int
    torch_threads: int | None
    eager: bool = False

    @property
    def actors(self) -> int | None:
        """The most actors the pool may run (on a fixed cluster, its size)."""
        return self.max_actors

    def compute(self, batches: int) -> ray.data.ActorPoolStrategy:
        """The pool for ``batches`` batches of work: a fixed size, or a range Ray Data scales."""
        if self.min_actors == self.max_actors:
            return ray.data.ActorPoolStrategy(size=self.min_actors)
        initial = self.min_actors
        if self.eager and self.max_actors is not None:
            initial = max(self.min_actors, min(self.max_actors, batches))
        return ray.data.ActorPoolStrategy(min_size=self.min_actors, max_size=self.max_actors, initial_size=initial)

    def describe(self) -> str:
        """``4``, ``1-8`` or ``1+`` actor(s)."""
        if self.min_actors == self.max_actors:
            return str(self.min_actors)
        return f"{self.min_actors}-{self.max_actors}" if self.max_actors else f"{self.min_actors}+"


def plan_stages(config: GenerateConfig,
                capacity: Capacity | dict[str, float]) -> tuple[StagePlan, StagePlan | None]:
    """Pool sizes and per-actor resources of the generator and scorer stages.

    On a fixed cluster (a plain resources dict, or node types that cannot scale) the pools are sized from
    what is up now; on an autoscaling cluster from what its node types can supply (``_plan_autoscaling``).
    ``--generator-actors`` / ``--scorer-actors`` (N or MIN:MAX) override the sizes.

    Raises:
        ValueError: the request can never be met: more GPUs per actor than the cluster has (fixed) or than any
            node type has (autoscaling), or CPU shares that leave no CPU for the read and write tasks (names
            the flags to change).
    """
    if not isinstance(capacity, Capacity):
        capacity = Capacity(capacity)
    if capacity.autoscaling:
        return _plan_autoscaling(config, capacity)
    return _plan_fixed(config, capacity.resources)


def _plan_fixed(config: GenerateConfig, resources: dict[str, float]) -> tuple[StagePlan, StagePlan | None]:
    """Sizes from the resources up now.

    Unset CPU shares are 1 per actor (0.5 on clusters of at most 4 CPUs), lowered so that one CPU stays free
    for Ray Data's read and write tasks: without it the read task never starts and the job waits forever.
    """
    job = config.job
    cpus, gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
    default_cpus = 0.5 if cpus <= SMALL_CLUSTER_CPUS else 1.0
    for flag, wanted in (("--generator-gpus", job.generator_gpus), ("--scorer-gpus", job.scorer_gpus)):
        if wanted > gpus:
            raise ValueError(f"{flag} {wanted} but the Ray cluster has {gpus:g} GPUs; lower {flag} (0 runs on CPU) "
                             f"or connect to a GPU cluster with RAY_ADDRESS (an autoscaling cluster whose GPU "
                             f"nodes are not up yet: give its node types in {CAPACITY_ENV}, see docs/cluster.md)")
    if job.generator_actors is not None:
        low, actors = pool_range(job.generator_actors)
    elif job.generator_gpus > 0:
        low = actors = max(1, int(gpus // job.generator_gpus))
    else:
        low = actors = max(1, int(cpus // 2))
    scorer_low, scorer_actors = pool_range(job.scorer_actors) or (1, 1)
    if job.scorer is None:
        scorer_actors = 0
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
    generator = StagePlan(low, actors, generator_cpus, job.generator_gpus, job.batch_size, job.torch_threads)
    if job.scorer is None:
        return generator, None
    return generator, StagePlan(scorer_low, scorer_actors, scorer_cpus, job.scorer_gpus, job.scorer_batch_size, None)


def _plan_autoscaling(config: GenerateConfig, capacity: Capacity) -> tuple[StagePlan, StagePlan | None]:
    """Sizes from what the node types can supply, whatever is up now.

    Each actor leaves one CPU of its node free for Ray Data's read and write tasks (the CPUs come with the
    worker nodes, so the head may have none): an unset CPU share is 1 (0.5 on nodes of at most 4 CPUs), lowered
    to (node CPUs - 1) / actors per node, so 0 on a GPU node with a single CPU. An unset pool is 1 up to the
    actors the node types hold at their maximum counts (unbounded if a type is), the generator's less the
    GPUs the scorer's minimum pool needs when both stages use GPUs; a pool's minimum that no count of nodes can
    hold, or an actor that fits no node type, is refused.
    """
    job = config.job
    generator = _autoscaling_stage(capacity, "generator", job.generator_gpus, job.generator_cpus,
                                   job.generator_actors, job.batch_size, job.torch_threads)
    if job.scorer is None:
        return generator, None
    scorer = _autoscaling_stage(capacity, "scorer", job.scorer_gpus, job.scorer_cpus or job.generator_cpus,
                                job.scorer_actors, job.scorer_batch_size, None)
    if generator.num_gpus and scorer.num_gpus and generator.max_actors and job.generator_actors is None:
        # the eager generator pool would take every GPU and leave the scorer's first actors no room
        displaced = math.ceil(scorer.min_actors * scorer.num_gpus / generator.num_gpus - 1e-9)
        generator = replace(generator, max_actors=max(generator.min_actors, generator.max_actors - displaced))
    return generator, scorer


def _autoscaling_stage(capacity: Capacity, stage: str, gpus: float, cpus: float | None, pool: int | str | None,
                       batch_size: int, torch_threads: int | None) -> StagePlan:
    """One stage's plan on an autoscaling cluster (rules in ``_plan_autoscaling``); ``cpus`` None: default share."""
    hosts, shares = [], []  # (node type, actors per node), the default CPU share on each
    for node_type in capacity.node_types:
        node_cpus = node_type.resources.get("CPU", 0.0)
        free = max(node_cpus - 1, 0.0)  # one CPU of every node stays free for the read and write tasks
        share = 0.5 if node_cpus <= SMALL_CLUSTER_CPUS else 1.0
        if gpus > 0:
            share = min(share, free / max(per_node(node_type.resources, {"GPU": gpus}), 1))
        available = node_type.resources if cpus is not None else {**node_type.resources, "CPU": free}
        fits = per_node(available, {"GPU": gpus, "CPU": share if cpus is None else cpus})
        if fits:
            hosts.append((node_type, fits))
            shares.append(share)
    if not hosts:
        cpu_text = "the default CPU share" if cpus is None else f"{cpus:g} CPU"
        raise ValueError(f"a {stage} actor with {gpus:g} GPU and {cpu_text} fits no node type of this cluster: "
                         f"{capacity.describe()}; lower --{stage}-gpus / --{stage}-cpus or add a node type that "
                         f"holds one")
    share = cpus if cpus is not None else min(shares)
    if any(t.max_count is None for t, _ in hosts):
        most = None
    else:
        most = sum(fits * t.max_count for t, fits in hosts)
    low, high = pool_range(pool) or (1, most)
    if most is not None and low > most:
        raise ValueError(f"--{stage}-actors {pool} needs {low} {stage} actors but the node types hold at most "
                         f"{most}: {capacity.describe()}; lower --{stage}-actors")
    if most is not None and high is not None:
        high = min(high, most)
    return StagePlan(low, high, share, gpus, batch_size, torch_threads, eager=stage == "generator")


def build_dataset(config: GenerateConfig, shards: list[Shard], columns: list[str], prompts: Storage,
                  generator: StagePlan, scorer: StagePlan | None, generator_stage: type = Generator,
                  partly_written: dict[str, str] | None = None) -> ray.data.Dataset:
    """The lazy plan from the shards to do to scored image rows (the sink is attached by ``run_generate``).

    Each shard descriptor is its own block, so shards are read in parallel and reach the actors in plan
    order (few shards in flight at a time). ``generator_stage`` is the generator actor class; it takes
    ``Generator``'s constructor arguments and returns its columns (a benchmark plugs in a stub there).
    ``partly_written`` names the partial shards (``"pieces"`` or ``"record"``, ``pipeline.partial``): their read task
    keeps the samples already written under ``--out`` and only the others are generated.
    """
    job = config.job
    partly_written = partly_written or {}
    batches = -(-sum(s.samples for s in shards) // generator.batch_size)
    descriptors = [{"name": s.name, "file": s.file, "start": s.start, "stop": s.stop, "samples": s.samples,
                    "resume": partly_written.get(s.name, "")} for s in shards]
    ds = ray.data.from_items(descriptors, override_num_blocks=max(1, len(descriptors)))
    ds = ds.map_batches(read_shards, batch_format="pyarrow",
                        fn_kwargs={"storage": prompts, "columns": columns, "out": Storage(job.out, job.storage_options),
                                   "tars": job.layout != "files", "keep_failed": job.keep_failed})
    ds = ds.map_batches(expand_samples, batch_format="numpy",
                        fn_kwargs={"run_seed": job.seed, "num_images": job.num_images})
    ds = ds.repartition(target_num_rows_per_block=generator.batch_size)
    ds = ds.map_batches(
        generator_stage, batch_format="numpy", batch_size=generator.batch_size, udf_modifying_row_count=False,
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


def watch_autoscaler(capacity: Capacity, generator: StagePlan, scorer: StagePlan | None,
                     log: Callable[[str], None]) -> NodeWatch | None:
    """On an autoscaling cluster: log the nodes the pools wait for, then each node that joins or leaves."""
    if not capacity.autoscaling:
        return None
    log(f"maskray generate: autoscaling cluster: {capacity.describe()}")
    for stage, plan in (("generator", generator), ("scorer", scorer)):
        if plan is None:
            continue
        waiting = nodes_to_wait_for(capacity, {"GPU": plan.num_gpus, "CPU": plan.num_cpus}, plan.min_actors)
        if waiting:
            kind = "GPU" if plan.num_gpus > 0 else "CPU"
            log(f"maskray generate: waiting for {waiting[0]} {kind} node(s) of type {waiting[1]} from the "
                f"autoscaler before the first {plan.min_actors} {stage} actor(s) can start; the pool grows to "
                f"{plan.max_actors or 'any number of'} actor(s) as nodes join")
    return NodeWatch(log, "maskray generate").start()


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

    Order: scan the prompts (errors here leave ``--out`` untouched), take ``--out``'s lease
    (``pipeline.lease``: a second live run is refused), check ``--out``'s config hash and shard size, plan the
    shards, call ``connect`` (the job's ``ray.init``; None when Ray is already up), assemble the shards a crash
    left whole in pieces, read the completion records (the failed samples of a shard are generated again unless
    ``--keep-failed``), open an attempt, run the plan over the samples left (``pipeline.partial``), finalize. An exception after the attempt opened closes it as failed in ``manifest.json``,
    with the error's type and message (credentials scrubbed).

    Returns:
        The run summary (see ``pipeline.manifest.finalize``) plus ``timings``: ``resume_seconds`` (input scan,
        shard plan and record check: until the run knows what is left), ``ray_start_seconds``,
        ``generate_seconds`` and ``finalize_seconds``. And ``actors``: per stage, the most actors alive
        at once, the nodes they ran on and each one's start in seconds from the run's start (also stored in the
        manifest's attempt).
    """
    job = config.job
    begun = time.perf_counter()
    prompts = Storage(job.prompts, job.storage_options)
    out = Storage(job.out, job.storage_options)
    scan = scan_prompts(job.prompts, prompts, job.num_images)
    with RunLease(out, job.lock_stale_seconds, job.force, log) as lease:
        existing = run_manifest.check_out(out, config)
        size = run_manifest.shard_size(existing, job, scan.samples, default_shard_size)
        plan = plan_shards(scan.files, scan.row_samples, size)
        before_ray = time.perf_counter()
        if connect is not None:
            connect()
        connected = time.perf_counter()
        capacity = read_capacity()
        generator, scorer = plan_stages(config, capacity)
        # assembly uses no run constants; whole pieces left by a crash become records before the record scan
        partial = assemble_whole_pieces(SampleSink(out, {}, job.image_format, job.layout),
                                        {shard.name: shard.samples for shard in plan})
        records = run_manifest.scan_records(out, plan, keep_failed=job.keep_failed)
        for name, reason in sorted(records.bad.items()):
            again = "its failed samples are" if name in records.failed else "its shard is"
            log(f"maskray generate: completion record {out.url('_shards', name + '.parquet')} is {reason}; "
                f"{again} generated again")
        todo = [shard for shard in plan if shard.name not in records.done]
        partly_written = {**{name: "pieces" for name in partial}, **{name: "record" for name in records.failed}}
        partly_written = {name: how for name, how in partly_written.items() if name not in records.done}
        done = sum(records.done.values())
        resume = (before_ray - begun) + (time.perf_counter() - connected)
        log(f"maskray generate: {scan.rows} prompts -> {scan.samples} samples in {len(scan.files)} file(s), "
            f"{len(plan)} shard(s) of ~{size}; {len(plan) - len(todo)} shard(s) ({done} samples) already done under "
            f"{out.uri}" + (f", {len(partly_written)} partly written (their written samples are kept)"
                              if partly_written else "")
            + f"; {generator.describe()} generator actor(s) "
            f"({generator.num_gpus:g} GPU, {generator.num_cpus:g} CPU each, batch {generator.batch_size})"
            + (f", {scorer.describe()} scorer actor(s) ({job.scorer})" if scorer else ", no scorer"))
        watch = watch_autoscaler(capacity, generator, scorer, log)
        manifest = run_manifest.start_attempt(out, config, existing, [prompts.uri], done, size)
        try:
            summary = _execute(config, out, prompts, manifest, plan, todo, partly_written, size, scan.columns,
                               generator, scorer, generator_stage, lease)
        except LeaseLost:  # --out belongs to another run now: its manifest is not this run's to write
            raise
        except BaseException as error:  # a crash or Ctrl-C: the attempt is closed as failed, never left running
            run_manifest.fail_attempt(out, manifest, error, secret_values(config.model_dump(mode="json")))
            raise
        finally:
            if watch is not None:
                watch.stop()
    summary["timings"] = {"resume_seconds": round(resume, 3), "ray_start_seconds": round(connected - before_ray, 3),
                          **summary["timings"]}
    score = "n/a" if summary["mean_score"] is None else f"{summary['mean_score']:.4f}"
    log(f"maskray generate: {summary['rows']}/{summary['expected']} samples under {out.uri} "
        f"({summary['generated']} generated now, {summary['errors']} errors, "
        f"{summary['images_per_second'] or 0:.2f} images/s incl. actor start-up, mean score {score})")
    return summary


def _execute(config: GenerateConfig, out: Storage, prompts: Storage, manifest: dict, plan: list[Shard],
             todo: list[Shard], partly_written: dict[str, str], size: int, columns: list[str], generator: StagePlan,
             scorer: StagePlan | None, generator_stage: type, lease: RunLease) -> dict:
    """Generate the shards ``todo`` (keeping the written samples of those in ``partly_written``) and finalize
    (only while this run still holds ``--out``'s lease)."""
    job = config.job
    attempt = manifest["attempts"][-1]["attempt"]
    started, started_at = time.perf_counter(), time.time()
    if todo:
        ds = build_dataset(config, todo, columns, prompts, generator, scorer, generator_stage, partly_written)
        ds.write_datasink(SampleSink(out, run_constants(config, attempt), job.image_format, job.layout, size))
    generated = time.perf_counter()
    actors = {"generator": pool_usage(generator_stage.__name__, started_at).as_dict(),
              **({"scorer": pool_usage("ScoringStage", started_at).as_dict()} if scorer else {})}
    manifest["attempts"][-1]["actors"] = actors  # written with the attempt by finalize
    lease.check()  # finalize removes leftovers: never on behalf of a run that lost --out to another
    summary = {**run_manifest.finalize(out, manifest, plan, generated - started), "actors": actors}
    summary["timings"] = {"generate_seconds": round(generated - started, 3),
                          "finalize_seconds": round(time.perf_counter() - generated, 3)}
    return summary
