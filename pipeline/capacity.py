"""What the Ray cluster can supply (its node types when it autoscales), and what a job's actor pools got.

A fixed cluster supplies what is up now (``ray.cluster_resources()``). An autoscaling cluster supplies what its
node types can add, up to each type's maximum count; the node types are read, in this order, from:

1. Ray's autoscaler state in the GCS: the ``ClusterConfig`` record (node groups with their resources, min and max
   count) that Ray Train and Ray Data also consult (``ray._private.state.state.get_cluster_config()``), filled
   by autoscalers that publish it. Ray 2.60's open-source autoscalers (the ``ray start --autoscaling-config``
   monitor, KubeRay's) do not publish it, hence:
2. ``MASKRAY_AUTOSCALING_CONFIG``: the cluster's configured maximum as Ray's autoscaler config
   (``available_node_types`` with ``resources``, ``min_workers``, ``max_workers``; the file given to
   ``ray start --autoscaling-config`` or ``ray up``), a path or the YAML/JSON text itself. The KubeRay manifests
   of ``maskray infra render`` set it on the head pod, where RayJob and ``maskray submit`` drivers run.
3. ``~/ray_bootstrap_config.yaml`` on the head of a ``ray up`` cluster: the cluster launcher copies the cluster
   config there, with ``available_node_types`` and their resources filled in, and starts the autoscaler from it
   (``ray/autoscaler/_private/commands.py``; Ray Tune detects ``ray up`` clusters by the same file). Drivers run on
   the head (``ray job submit``, ``ray submit``, ``maskray submit``), so the file is in their user's home folder.

With none of them, the cluster is taken as fixed.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ENV = "MASKRAY_AUTOSCALING_CONFIG"
BOOTSTRAP_CONFIG = "ray_bootstrap_config.yaml"  # where `ray up` leaves the cluster config, in the head's home


@dataclass(frozen=True)
class NodeType:
    """One kind of node the cluster has or can add: per-node resources and the bounds of its count."""

    name: str
    resources: dict[str, float]
    min_count: int = 0
    max_count: int | None = None  # None: no upper bound

    def describe(self) -> str:
        """``gpu {CPU: 8, GPU: 1} x 0-8``."""
        shown = ", ".join(f"{k}: {v:g}" for k, v in sorted(self.resources.items()) if k in ("CPU", "GPU") or v)
        count = "unbounded" if self.max_count is None else f"{self.min_count}-{self.max_count}"
        return f"{self.name} {{{shown}}} x {count}"


@dataclass(frozen=True)
class Capacity:
    """The resources up now and, on an autoscaling cluster, the node types that can join."""

    resources: dict[str, float]
    node_types: tuple[NodeType, ...] = ()
    source: str = ""  # where the node types were read

    @property
    def autoscaling(self) -> bool:
        return any(t.max_count is None or t.max_count > t.min_count for t in self.node_types)

    def describe(self) -> str:
        """The node types, ``; ``-separated, and their source."""
        return "; ".join(t.describe() for t in self.node_types) + (f" (from {self.source})" if self.source else "")


def per_node(resources: dict[str, float], bundle: dict[str, float]) -> int:
    """How many actors of ``bundle`` (resource -> amount per actor) one node of ``resources`` holds."""
    wanted = {k: v for k, v in bundle.items() if v > 0}
    if not wanted:
        raise ValueError(f"an actor bundle needs some resource, got {bundle}")
    return min(math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in wanted.items())


def node_types_from_autoscaling_config(config: dict[str, Any], source: str) -> tuple[NodeType, ...]:
    """Node types of a Ray autoscaler config: the head counts once, a worker type between its min and max.

    A worker type without ``max_workers`` takes the config's top-level ``max_workers`` (Ray's rule), and is
    unbounded without either.

    Raises:
        ValueError: no ``available_node_types`` mapping, or a type without a ``resources`` mapping.
    """
    types = config.get("available_node_types") if isinstance(config, dict) else None
    if not isinstance(types, dict) or not types:
        raise ValueError(f"{source} has no available_node_types: give Ray's autoscaler config, e.g. "
                         "{available_node_types: {gpu: {resources: {CPU: 8, GPU: 1}, min_workers: 0, "
                         "max_workers: 8}}, head_node_type: head}")
    out = []
    for name, spec in types.items():
        resources = (spec or {}).get("resources")
        if not isinstance(resources, dict):
            raise ValueError(f"{source}: node type {name!r} needs a resources mapping such as {{CPU: 8, GPU: 1}}")
        if name == config.get("head_node_type"):
            out.append(NodeType(str(name), {k: float(v) for k, v in resources.items()}, 1, 1))
            continue
        maximum = spec.get("max_workers", config.get("max_workers"))
        out.append(NodeType(str(name), {k: float(v) for k, v in resources.items()}, int(spec.get("min_workers", 0)),
                            None if maximum is None else int(maximum)))
    return tuple(out)


def node_types_from_cluster_config(cluster_config: Any) -> tuple[NodeType, ...]:
    """Node types of the GCS ``ClusterConfig`` protobuf (``max_count`` -1 means unbounded)."""
    return tuple(NodeType(group.name, {k: float(v) for k, v in group.resources.items()}, int(group.min_count),
                          None if group.max_count < 0 else int(group.max_count))
                 for group in cluster_config.node_group_configs)


def load_autoscaling_config(value: str) -> tuple[dict[str, Any], str]:
    """``MASKRAY_AUTOSCALING_CONFIG``'s mapping (the YAML/JSON text itself, or the file it names) and its source."""
    data, source = yaml.safe_load(value), ENV
    if isinstance(data, str):
        path = Path(data).expanduser()
        if not path.is_file():
            raise ValueError(f"{ENV}={value!r} is neither a YAML mapping nor an existing file")
        data, source = yaml.safe_load(path.read_text()), f"{ENV} ({path})"
    if not isinstance(data, dict):
        raise ValueError(f"{ENV} must hold Ray's autoscaler config (a mapping), got {type(data).__name__}")
    return data, source


def bootstrap_node_types(home: Path) -> tuple[tuple[NodeType, ...], str] | None:
    """Node types of the ``ray up`` bootstrap config in ``home`` and its source; None when there is no such file.

    Raises:
        ValueError: the file is there but holds no usable node types (names the file and the way out).
    """
    path = home / BOOTSTRAP_CONFIG
    if not path.is_file():
        return None
    source = f"the cluster launcher's {path}"
    try:
        config = yaml.safe_load(path.read_text())
        return node_types_from_autoscaling_config(config, source), source
    except (yaml.YAMLError, ValueError) as error:
        first_line = str(error).splitlines()[0]
        raise ValueError(f"{first_line}; give the cluster's node types in {ENV} instead (it is read first), "
                         "see docs/cluster.md") from error


def read_capacity(home: Path | None = None) -> Capacity:
    """The connected cluster's capacity (Ray must be initialised); see the module docstring for the sources.

    Args:
        home: the folder to look for ``ray up``'s bootstrap config in (default: this user's home, ``$HOME``).
    """
    import ray
    import ray._private.state

    resources = {k: float(v) for k, v in ray.cluster_resources().items()}
    published = ray._private.state.state.get_cluster_config()
    if published is not None and published.node_group_configs:
        return Capacity(resources, node_types_from_cluster_config(published), "Ray's autoscaler state (GCS)")
    if os.environ.get(ENV):
        config, source = load_autoscaling_config(os.environ[ENV])
        return Capacity(resources, node_types_from_autoscaling_config(config, source), source)
    bootstrap = bootstrap_node_types(Path.home() if home is None else home)
    if bootstrap is not None:
        return Capacity(resources, *bootstrap)
    return Capacity(resources)


def nodes_to_wait_for(capacity: Capacity, bundle: dict[str, float], actors: int) -> tuple[int, str] | None:
    """(nodes, type name) the autoscaler must add before ``actors`` actors of ``bundle`` fit; None if they fit now.

    What is up now is counted as one node (fragmentation ignored); the missing actors go on the first worker
    type that can hold them.
    """
    missing = actors - per_node(capacity.resources, bundle)
    if missing <= 0:
        return None
    for node_type in capacity.node_types:
        slots = per_node(node_type.resources, bundle)
        if slots and (node_type.max_count is None or node_type.max_count > node_type.min_count):
            return math.ceil(missing / slots), node_type.name
    return None


class NodeWatch:
    """Logs every node that joins or leaves the cluster while a job runs (the autoscaler's progress).

    A daemon thread polls ``ray.nodes()``; ``stop`` ends it, and it ends by itself once Ray is shut down.
    """

    def __init__(self, log: Callable[[str], None], prefix: str, interval_s: float = 1.0):
        self.log, self.prefix, self.interval_s = log, prefix, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maskray-node-watch", daemon=True)
        self._started = time.monotonic()
        self._known: dict[str, dict[str, float]] = {}

    def start(self) -> NodeWatch:
        self._known = _alive_nodes()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import ray

        while not self._stop.wait(self.interval_s) and ray.is_initialized():
            nodes = _alive_nodes()
            for node_id in sorted(nodes.keys() - self._known.keys()):
                self._report("joined", node_id, nodes[node_id], nodes)
            for node_id in sorted(self._known.keys() - nodes.keys()):
                self._report("left", node_id, self._known[node_id], nodes)
            self._known = nodes

    def _report(self, event: str, node_id: str, resources: dict[str, float], nodes: dict) -> None:
        total = {k: sum(r.get(k, 0.0) for r in nodes.values()) for k in ("GPU", "CPU")}
        self.log(f"{self.prefix}: node {node_id[-12:]} {event} ({_short(resources)}) after "
                 f"{time.monotonic() - self._started:.1f} s; the cluster now has {total['GPU']:g} GPU, "
                 f"{total['CPU']:g} CPU on {len(nodes)} node(s)")


def _alive_nodes() -> dict[str, dict[str, float]]:
    import ray

    return {n["NodeID"]: n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")}


def _short(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {resources.get(k, 0.0):g}" for k in ("GPU", "CPU"))


@dataclass
class PoolUsage:
    """The actors one stage's pool ran: when each came up, on which node, and the most alive at once."""

    peak: int = 0
    nodes: list[str] = field(default_factory=list)
    started_s: list[float] = field(default_factory=list)  # seconds from the run's start to each actor's start

    def as_dict(self) -> dict[str, Any]:
        return {"peak": self.peak, "actors": len(self.started_s), "nodes": self.nodes,
                "started_s": [round(s, 2) for s in self.started_s]}


def pool_usage(udf: str, since: float) -> PoolUsage:
    """Usage of the actor pool running ``udf`` (Ray Data names its actors ``MapWorker(MapBatches(<udf>))``).

    Reads this job's actors from the GCS actor table (``ray._private.state.actors``: the public
    ``ray.util.state`` needs the dashboard, which a local run does not start), keeping those started at or after
    ``since`` (epoch seconds), so each run of an evaluation counts only its own pool.
    """
    import ray
    import ray._private.state

    job_id = ray.get_runtime_context().get_job_id()
    name = f"MapWorker(MapBatches({udf}))"
    spans, nodes = [], []
    for actor in ray._private.state.actors(job_id=ray.JobID.from_hex(job_id)).values():
        start, end = actor["StartTime"] / 1000, actor["EndTime"] / 1000
        if actor["ActorClassName"] != name or not start or start < since:
            continue
        spans.append((start, end or math.inf))
        node = actor["Address"]["NodeID"]
        if node not in nodes:
            nodes.append(node)
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    alive = peak = 0
    for _, step in events:
        alive += step
        peak = max(peak, alive)
    return PoolUsage(peak, nodes, sorted(s - since for s, _ in spans))
