"""``--wait-for-capacity``: on a cluster whose node types maskray cannot read, wait for the autoscaler.

A KubeRay cluster that ``maskray infra render`` did not render, or a ``ray up`` cluster whose driver runs off the
head, tells a job neither its node types nor that it autoscales (``pipeline.capacity``), so the job sees only what
is up. A GPU job there is refused at 0 GPU nodes; with ``--wait-for-capacity SECONDS`` it instead asks the
autoscaler for its first actors (``ray.autoscaler.sdk.request_resources``, the supported way to ask for nodes
without scheduling work), plans again every few seconds, logs what it wants, what is up and the seconds left, and
proceeds once the pools fit. When the time is up it gives the refusal it gives without waiting. The request is
withdrawn when the wait ends, so the autoscaler can remove the nodes once they idle (Ray keeps one request per
cluster: this also withdraws another client's ``request_resources``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from pipeline.capacity import Capacity, read_capacity
from pipeline.config import GenerateConfig
from pipeline.pools import StagePlan, plan_stages

T = TypeVar("T")
POLL_S = 2.0  # how often the cluster is read again
REPORT_EVERY_S = 10.0  # how often a progress line is logged


def retry_until(attempt: Callable[[], T], seconds: float, progress: Callable[[float], None],
                clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                poll_s: float = POLL_S, report_every_s: float = REPORT_EVERY_S) -> T:
    """``attempt()``'s result once it stops raising ``ValueError``, trying again for ``seconds``.

    ``progress(seconds_left)`` is called at the first failure and then every ``report_every_s``. With
    ``seconds`` 0 the first error is raised at once; when the time is up, the last error is raised unchanged.
    """
    deadline = clock() + seconds
    reported = None
    while True:
        try:
            return attempt()
        except ValueError:
            now = clock()
            if now >= deadline:
                raise
            if reported is None or now - reported >= report_every_s:
                progress(deadline - now)
                reported = now
            sleep(min(poll_s, deadline - now))


def first_actor_bundles(config: GenerateConfig) -> list[dict[str, float]]:
    """The resources of each stage's first actor: what the autoscaler is asked for while the job waits."""
    job = config.job
    stages = [(job.generator_gpus, job.generator_cpus)]
    if job.scorer is not None:
        stages.append((job.scorer_gpus, job.scorer_cpus or job.generator_cpus))
    return [{"GPU": gpus} if gpus else {"CPU": cpus or 1.0} for gpus, cpus in stages]


def describe_wanted(config: GenerateConfig) -> str:
    """``1 GPU (--generator-gpus 1) + 0.25 GPU (--scorer-gpus 0.25)``: what the first actors need."""
    job = config.job
    parts = [f"{job.generator_gpus:g} GPU (--generator-gpus {job.generator_gpus:g})" if job.generator_gpus
             else f"{job.generator_cpus or 1:g} CPU per generator actor"]
    if job.scorer is not None and job.scorer_gpus:
        parts.append(f"{job.scorer_gpus:g} GPU (--scorer-gpus {job.scorer_gpus:g})")
    return " + ".join(parts)


def describe_cluster(capacity: Capacity, nodes: int) -> str:
    return (f"{capacity.resources.get('GPU', 0.0):g} GPU, {capacity.resources.get('CPU', 0.0):g} CPU on "
            f"{nodes} node(s)")


def plan_pools(config: GenerateConfig, log: Callable[[str], None],
               read: Callable[[], Capacity] = read_capacity) -> tuple[Capacity, StagePlan, StagePlan | None]:
    """The cluster's capacity and the two stages' plans (``pipeline.pools.plan_stages``), waiting up to
    ``--wait-for-capacity`` seconds for a cluster that is taken as fixed to hold them.

    Raises:
        ValueError: the pools do not fit (after the wait): ``plan_stages``'s refusal. On a cluster whose node types
            are known the refusal is immediate, as no node that joins can change it.
    """
    import ray
    from ray.autoscaler.sdk import request_resources

    seconds = config.job.wait_for_capacity
    capacity = read()
    if capacity.autoscaling or seconds <= 0:
        return (capacity, *plan_stages(config, capacity))
    latest, requested = [capacity], False

    def attempt() -> tuple[Capacity, StagePlan, StagePlan | None]:
        latest[0] = read()
        return (latest[0], *plan_stages(config, latest[0]))

    def progress(left: float) -> None:
        nonlocal requested
        if not requested:
            request_resources(bundles=first_actor_bundles(config))
            requested = True
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        log(f"maskray generate: waiting for capacity (--wait-for-capacity {seconds:g}): wanted "
            f"{describe_wanted(config)}, the cluster has {describe_cluster(latest[0], nodes)}; {left:.0f} s left")

    try:
        return retry_until(attempt, seconds, progress)
    finally:
        if requested:
            request_resources(bundles=[])
