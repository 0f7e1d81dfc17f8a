"""Actor pools of the generate dataflow: how many generator and scorer actors, with what resources each.

Sizing rules (docs/ray-notes.md §3): stages use ``compute=ActorPoolStrategy(...)``, a fixed size or a MIN:MAX
range that Ray Data scales, sized by ``plan_stages`` from what the cluster has now (fixed cluster) or can add
(autoscaling cluster, ``pipeline.capacity``); a GPU stage gets an integer batch size; actors leave a CPU free so
read and write tasks can still be scheduled. On an autoscaling cluster ``watch_autoscaler`` logs the nodes the
pools wait for and each node that joins or leaves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import ray

from pipeline.capacity import ENV as CAPACITY_ENV
from pipeline.capacity import Capacity, NodeWatch, nodes_to_wait_for, per_node
from pipeline.config import GenerateConfig, pool_range

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
                             f"nodes are not up yet: give its node types in {CAPACITY_ENV}, or wait for them with "
                             f"--wait-for-capacity SECONDS; see docs/cluster.md)")
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
    generator = _autoscaling_stage(capacity, StageRequest("generator", job.generator_gpus, job.generator_cpus,
                                                          job.generator_actors, job.batch_size, job.torch_threads))
    if job.scorer is None:
        return generator, None
    scorer = _autoscaling_stage(capacity, StageRequest("scorer", job.scorer_gpus, job.scorer_cpus or job.generator_cpus,
                                                       job.scorer_actors, job.scorer_batch_size, None))
    if generator.num_gpus and scorer.num_gpus and generator.max_actors and job.generator_actors is None:
        # the eager generator pool would take every GPU and leave the scorer's first actors no room
        displaced = math.ceil(scorer.min_actors * scorer.num_gpus / generator.num_gpus - 1e-9)
        generator = replace(generator, max_actors=max(generator.min_actors, generator.max_actors - displaced))
    return generator, scorer


@dataclass(frozen=True)
class StageRequest:
    """What the flags ask of one stage's actors: ``--<stage>-gpus``, ``--<stage>-cpus`` (None: the default
    share), ``--<stage>-actors`` (None: as many as the cluster holds), the batch size and torch threads."""

    stage: str
    gpus: float
    cpus: float | None
    actors: int | str | None
    batch_size: int
    torch_threads: int | None


def _autoscaling_stage(capacity: Capacity, request: StageRequest) -> StagePlan:
    """One stage's plan on an autoscaling cluster (rules in ``_plan_autoscaling``)."""
    stage, gpus, cpus, pool = request.stage, request.gpus, request.cpus, request.actors
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
    return StagePlan(low, high, share, gpus, request.batch_size, request.torch_threads, eager=stage == "generator")


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
