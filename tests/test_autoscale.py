"""Actor pools on autoscaling clusters: MIN:MAX pools, sizing from node types, --wait-for-capacity, and jobs on
Ray's fake autoscaler.

The last two tests start a real head with Ray's fake multi-node autoscaler (``fake_multinode`` provider: worker
"nodes" are extra raylets on this machine) with no CPU and no GPU on the head, and run ``maskray generate``
through the CLI against it. With the node types in ``ray up``'s bootstrap config, the pool starts from zero GPU
nodes and grows to two actors as the autoscaler adds two nodes. With no node types anywhere,
``--wait-for-capacity`` asks the autoscaler for a GPU node and the job runs once it has joined.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from generate_helpers import check_exactly_once
from loopback import free_port

from jobs.cli import main
from jobs.cli_args import build_model
from jobs.cluster import ClusterSpec, autoscaling_config, render_all
from mgt.config import GenerationSettings, ModelConfig
from pipeline.capacity import (
    BOOTSTRAP_CONFIG,
    ENV,
    Capacity,
    NodeType,
    bootstrap_node_types,
    load_autoscaling_config,
    node_types_from_autoscaling_config,
    node_types_from_cluster_config,
    nodes_to_wait_for,
    read_capacity,
)
from pipeline.capacity_wait import first_actor_bundles, plan_pools, retry_until
from pipeline.config import GenerateConfig, JobOptions
from pipeline.pools import StagePlan, plan_stages

ROOT = Path(__file__).resolve().parents[1]
# The fake cluster: a head with nothing to run on, GPU workers {CPU: 1, GPU: 1} from 0 to 2 nodes.
FAKE_TYPES = {"ray.head.default": {"resources": {"CPU": 0, "GPU": 0}, "node_config": {}, "max_workers": 0},
              "ray.worker.gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
                                 "max_workers": 2}}
FAKE = node_types_from_autoscaling_config({"available_node_types": FAKE_TYPES, "head_node_type": "ray.head.default"},
                                          "the fake config")
EMPTY_FAKE = Capacity({}, FAKE, "the fake config")  # no worker node up yet


def job(**options) -> GenerateConfig:
    return GenerateConfig(job=options)


# ---------------------------------------------------------------------------------------------------
# the pool flags


@pytest.mark.parametrize("value, bounds", [(3, (3, 3)), ("3", (3, 3)), ("1:8", (1, 8)), (" 2 : 4 ", (2, 4))])
def test_pool_flags_take_n_or_min_max(value, bounds):
    options = JobOptions(generator_actors=value, scorer_actors=value)
    plan, _ = plan_stages(GenerateConfig(job=options), {"CPU": 64.0})
    assert (plan.min_actors, plan.max_actors) == bounds
    assert yaml.safe_load(yaml.safe_dump(options.model_dump(mode="json"))) == options.model_dump(mode="json")


@pytest.mark.parametrize("command, flag, value", [
    ("generate", "--generator-actors", "3:1"), ("generate", "--generator-actors", "0"),
    ("generate", "--scorer-actors", "two"), ("evaluate", "--scorer-actors", "1:2:3"),
    ("evaluate", "--generator-actors", "2:1")])
def test_bad_pool_flags_are_refused_naming_the_flag(capsys, tmp_path, command, flag, value):
    assert main([command, "--out", str(tmp_path / "out"), flag, value]) == 2
    error = capsys.readouterr().err
    assert flag in error and "N actors or MIN:MAX" in error and not (tmp_path / "out").exists()


def test_pool_range_in_a_yaml_config(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("generator_actors: 1:4\nscorer_actors: 2\n")
    assert main(["generate", "--config", str(config), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["generator_actors"] == "1:4" and printed["scorer_actors"] == 2


# ---------------------------------------------------------------------------------------------------
# where the node types come from


def test_node_types_from_ray_autoscaler_config_file_or_text(tmp_path, monkeypatch):
    path = tmp_path / "autoscaler.yaml"
    path.write_text(yaml.safe_dump({"max_workers": 5, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 4}}, "cpu": {"resources": {"CPU": 16}, "min_workers": 1},
        "gpu": {"resources": {"CPU": 8, "GPU": 4}, "max_workers": 3}}}))
    for value in (str(path), path.read_text()):
        config, source = load_autoscaling_config(value)
        types = {t.name: t for t in node_types_from_autoscaling_config(config, source)}
        assert types["head"] == NodeType("head", {"CPU": 4.0}, 1, 1)
        assert types["cpu"] == NodeType("cpu", {"CPU": 16.0}, 1, 5)  # the top-level max_workers
        assert types["gpu"] == NodeType("gpu", {"CPU": 8.0, "GPU": 4.0}, 0, 3)
    with pytest.raises(ValueError, match=f"{ENV}=.*neither a YAML mapping nor an existing file"):
        load_autoscaling_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="no available_node_types"):
        node_types_from_autoscaling_config({"provider": {}}, ENV)


def test_node_types_from_ray_autoscaler_state_in_the_gcs():
    from ray.core.generated import autoscaler_pb2

    published = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="gpu", resources={"CPU": 8, "GPU": 1}, min_count=0, max_count=8),
        autoscaler_pb2.NodeGroupConfig(name="spot", resources={"CPU": 8, "GPU": 1}, max_count=-1)])
    assert node_types_from_cluster_config(published) == (NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, 0, 8),
                                                        NodeType("spot", {"CPU": 8.0, "GPU": 1.0}, 0, None))
    plan, _ = plan_stages(job(generator_gpus=1), Capacity({}, node_types_from_cluster_config(published)))
    assert (plan.min_actors, plan.max_actors) == (1, None)  # an unbounded type: Ray Data's pool has no cap


def test_node_types_from_the_ray_up_bootstrap_config(tmp_path):
    assert bootstrap_node_types(tmp_path) is None  # not a `ray up` head
    (tmp_path / BOOTSTRAP_CONFIG).write_text(yaml.safe_dump({
        "cluster_name": "c", "max_workers": 2, "head_node_type": "ray.head.default", "provider": {"type": "aws"},
        "available_node_types": FAKE_TYPES}))
    types, source = bootstrap_node_types(tmp_path)
    assert types == FAKE and source == f"the cluster launcher's {tmp_path / BOOTSTRAP_CONFIG}"
    (tmp_path / BOOTSTRAP_CONFIG).write_text(yaml.safe_dump({"available_node_types": {"gpu": {"max_workers": 2}}}))
    with pytest.raises(ValueError, match=rf"{BOOTSTRAP_CONFIG}: node type 'gpu' needs a resources mapping .*; give "
                                         rf"the cluster's node types in {ENV} instead"):
        bootstrap_node_types(tmp_path)


def test_read_capacity_prefers_ray_autoscaler_state_to_the_environment_to_the_bootstrap_config(
        ray_local, monkeypatch, tmp_path):
    import ray._raylet
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    assert not read_capacity(home=tmp_path).autoscaling  # the local Ray: a fixed cluster
    (tmp_path / BOOTSTRAP_CONFIG).write_text(yaml.safe_dump({"available_node_types": {
        "gpu": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 3}}}))
    from_bootstrap = read_capacity(home=tmp_path)
    assert from_bootstrap.node_types == (NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, 0, 3),)
    assert str(tmp_path) in from_bootstrap.source
    monkeypatch.setenv(ENV, json.dumps({"available_node_types": FAKE_TYPES}))
    from_env = read_capacity(home=tmp_path)
    assert from_env.source == ENV and from_env.autoscaling and from_env.resources["CPU"] == 2
    published = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="gpu", resources={"CPU": 4, "GPU": 1}, max_count=4)])
    key, namespace = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE
    _internal_kv_put(key, published.SerializeToString(), namespace=namespace)
    try:
        from_gcs = read_capacity()
    finally:
        _internal_kv_del(key, namespace=namespace)
    assert from_gcs.source == "Ray's autoscaler state (GCS)"
    assert from_gcs.node_types == (NodeType("gpu", {"CPU": 4.0, "GPU": 1.0}, 0, 4),)


# ---------------------------------------------------------------------------------------------------
# sizing against what the cluster can supply


def test_gpu_pool_on_an_empty_autoscaling_cluster_waits_instead_of_failing():
    generator, scorer = plan_stages(job(generator_gpus=1), EMPTY_FAKE)
    assert (generator.min_actors, generator.max_actors, generator.eager) == (1, 2, True)
    # the single CPU of a worker stays free for the read and write tasks: the GPU actor reserves none
    assert generator.num_cpus == 0 and scorer is None
    assert nodes_to_wait_for(Capacity({}, FAKE), {"GPU": 1.0, "CPU": 0.0}, 1) == (1, "ray.worker.gpu")
    assert nodes_to_wait_for(Capacity({"CPU": 1.0, "GPU": 1.0}, FAKE), {"GPU": 1.0, "CPU": 0.0}, 1) is None


def test_eager_pool_asks_for_its_maximum_capped_by_the_work():
    plan = StagePlan(1, 8, 1.0, 1.0, 8, None, eager=True)
    assert plan.compute(batches=100).initial_size == 8 and plan.compute(batches=3).initial_size == 3
    assert StagePlan(1, 8, 1.0, 1.0, 8, None).compute(batches=100).initial_size == 1


def test_request_no_node_type_can_hold_is_refused_naming_the_node_types():
    with pytest.raises(ValueError, match=r"generator actor with 2 GPU .* fits no node type.*"
                                         r"ray\.worker\.gpu \{CPU: 1, GPU: 1\} x 0-2 \(from the fake config\); "
                                         r"lower --generator-gpus"):
        plan_stages(job(generator_gpus=2), EMPTY_FAKE)
    with pytest.raises(ValueError, match=r"--generator-actors 3:4 needs 3 generator actors .* at most 2"):
        plan_stages(job(generator_gpus=1, generator_actors="3:4"), EMPTY_FAKE)
    # a CPU scorer at its default share would take the only CPU of these nodes: refused, an explicit one fits
    with pytest.raises(ValueError, match="scorer actor with 0 GPU and the default CPU share fits no node type"):
        plan_stages(job(generator_gpus=1, scorer="shapes"), EMPTY_FAKE)
    _, scorer = plan_stages(job(generator_gpus=1, scorer="shapes", scorer_cpus=0.5), EMPTY_FAKE)
    assert (scorer.min_actors, scorer.max_actors, scorer.eager) == (1, 4, False)


def test_pool_maximum_is_capped_by_the_node_types():
    plan, _ = plan_stages(job(generator_gpus=1, generator_actors="1:5"), EMPTY_FAKE)
    assert (plan.min_actors, plan.max_actors) == (1, 2)


@pytest.mark.parametrize("node, gpus, share, per_node", [
    ({"CPU": 8, "GPU": 1}, 1.0, 1.0, 1),     # KubeRay's shipped worker: 7 CPUs free after the actor
    ({"CPU": 4, "GPU": 4}, 1.0, 0.5, 4),     # small node: half a CPU each, 2 of 4 CPUs left
    ({"CPU": 2, "GPU": 2}, 0.5, 0.25, 4),    # 4 half-GPU actors share the one spare CPU
    ({"CPU": 16}, 0.0, 1.0, 15),             # CPU actors on a CPU node leave one CPU free
])
def test_actors_leave_a_cpu_free_on_every_node_while_the_head_has_none(node, gpus, share, per_node):
    types = (NodeType("head", {"CPU": 0.0}, 1, 1), NodeType("worker", {k: float(v) for k, v in node.items()}, 0, 3))
    plan, _ = plan_stages(job(generator_gpus=gpus), Capacity({}, types))
    assert plan.num_cpus == pytest.approx(share) and plan.max_actors == 3 * per_node
    assert per_node * plan.num_cpus <= node["CPU"] - 1


def test_fixed_cluster_is_sized_from_what_is_up_as_before():
    fixed = (NodeType("head", {"CPU": 16.0, "GPU": 2.0}, 1, 1),)  # node types that cannot scale: fixed
    for node_types in ((), fixed):
        plan, _ = plan_stages(job(generator_gpus=1), Capacity({"CPU": 16.0, "GPU": 2.0}, node_types))
        assert (plan.min_actors, plan.max_actors, plan.eager) == (2, 2, False)
        pool = plan.compute(batches=10)
        assert (pool.min_size, pool.max_size) == (2, 2)
    with pytest.raises(ValueError, match=f"has 0 GPUs.*{ENV}"):
        plan_stages(job(generator_gpus=1), {"CPU": 4.0})


# ---------------------------------------------------------------------------------------------------
# --wait-for-capacity


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_retry_until_reports_progress_then_gives_up_with_the_last_error():
    clock, reports = FakeClock(), []

    def never() -> None:
        raise ValueError(f"no GPU at {clock.now:g} s")

    with pytest.raises(ValueError, match=r"^no GPU at 30 s$"):
        retry_until(never, 30, reports.append, clock, clock.sleep, poll_s=2, report_every_s=10)
    assert reports == [30, 20, 10]  # seconds left at 0, 10 and 20 s
    attempts = iter([ValueError("not yet"), ValueError("not yet"), "planned"])

    def third_time() -> str:
        outcome = next(attempts)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert retry_until(third_time, 30, reports.append, clock, clock.sleep, poll_s=2) == "planned"

    def refused() -> None:
        raise ValueError("at once")

    with pytest.raises(ValueError, match="at once"):  # 0 s: today's behaviour
        retry_until(refused, 0, pytest.fail, clock, clock.sleep)


def test_wait_for_capacity_counts_in_no_hash_and_asks_for_the_first_actors():
    plain, waiting = job(generator_gpus=1), job(generator_gpus=1, wait_for_capacity=600)
    assert plain.config_hash() == waiting.config_hash()
    assert first_actor_bundles(job(generator_gpus=1, scorer="shapes", scorer_gpus=0.25)) == [{"GPU": 1.0},
                                                                                              {"GPU": 0.25}]
    assert first_actor_bundles(job(generator_cpus=2)) == [{"CPU": 2.0}]


def test_wait_for_capacity_on_a_cluster_that_never_grows_refuses_as_without_it(ray_local, tmp_path):
    """The local Ray has no autoscaler: the job asks for a GPU node, logs its wait, then gives today's refusal
    and withdraws its request."""
    import ray.autoscaler._private.constants as autoscaler_constants
    from ray.experimental.internal_kv import _internal_kv_get

    def requested() -> list:
        return json.loads(_internal_kv_get(autoscaler_constants.AUTOSCALER_RESOURCE_REQUEST_CHANNEL) or b"[]")

    lines, asked = [], []

    def log(line: str) -> None:
        lines.append(line)
        asked.append(requested())

    with pytest.raises(ValueError) as today:
        plan_stages(job(generator_gpus=1), read_capacity(home=tmp_path))
    with pytest.raises(ValueError) as waited:
        plan_pools(job(generator_gpus=1, wait_for_capacity=1.5), log, lambda: read_capacity(home=tmp_path))
    assert str(waited.value) == str(today.value) and "has 0 GPUs" in str(today.value)
    assert "or wait for them with --wait-for-capacity SECONDS" in str(today.value)  # the refusal names both ways
    (line,) = lines
    assert re.fullmatch(r"maskray generate: waiting for capacity \(--wait-for-capacity 1\.5\): wanted 1 GPU "
                        r"\(--generator-gpus 1\), the cluster has 0 GPU, 2 CPU on 1 node\(s\); [12] s left", line)
    assert asked == [[{"GPU": 1.0}]] and requested() == []


# ---------------------------------------------------------------------------------------------------
# the shipped KubeRay manifests


def _shipped_configs() -> dict[str, GenerateConfig]:
    """The generate and evaluate RayJobs' job arguments, parsed as `maskray generate|evaluate` parse them."""
    from jobs import evaluate_cmd, generate_cmd

    spec = ClusterSpec.model_validate(yaml.safe_load((ROOT / "infra" / "cluster.yaml").read_text()))
    configs = {}
    parser = argparse.ArgumentParser()
    generate_cmd.add_arguments(parser)
    configs["generate"] = generate_cmd.resolve_config(parser.parse_args(spec.generate_args))
    parser = argparse.ArgumentParser()
    evaluate_cmd.add_arguments(parser)
    args = parser.parse_args(spec.evaluate_args)
    options = build_model(JobOptions, {}, argparse.Namespace(**{k: v for k, v in vars(args).items()
                                                                 if k not in evaluate_cmd.OWNED_JOB_FIELDS}))
    configs["evaluate"] = GenerateConfig(job=options, model=build_model(ModelConfig, {}, args),
                                         generation=build_model(GenerationSettings, {}, args))
    return configs


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_shipped_rayjob_args_size_their_pools_from_the_worker_group(command):
    spec = ClusterSpec.model_validate(yaml.safe_load((ROOT / "infra" / "cluster.yaml").read_text()))
    rayjob = render_all(spec, ROOT)[f"rayjob-{command}.yaml"]
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    value = next(e["value"] for e in head["env"] if e["name"] == ENV)
    assert json.loads(value) == autoscaling_config(spec)
    config, source = load_autoscaling_config(value)
    node_types = node_types_from_autoscaling_config(config, source)
    generator, scorer = plan_stages(_shipped_configs()[command], Capacity({}, node_types, source))  # no GPU up
    workers = spec.max_workers * spec.worker_gpus
    # the generator leaves one GPU for the scorer's first actor (0.25 GPU each, 4 per GPU)
    assert (generator.min_actors, generator.max_actors, generator.num_gpus) == (1, workers - 1, 1.0)
    assert (scorer.min_actors, scorer.max_actors) == (1, workers * 4)
    assert generator.num_cpus + 4 * scorer.num_cpus <= spec.worker_cpus - 1


def test_submit_sends_a_local_autoscaling_config_as_its_text(tmp_path):
    from jobs.submit_cmd import job_env

    path = tmp_path / "autoscaler.yaml"
    path.write_text(yaml.safe_dump({"available_node_types": FAKE_TYPES}))
    sent = job_env({ENV: str(path)}, ["HF_HUB_OFFLINE=1"], [])[ENV]
    config, source = load_autoscaling_config(sent)  # what the job reads on the cluster
    assert source == ENV and node_types_from_autoscaling_config(config, source)[1].max_count == 2
    assert job_env({}, [f"{ENV}={{available_node_types: {{}}}}"], [])[ENV] == "{available_node_types: {}}"


# ---------------------------------------------------------------------------------------------------
# a generate job on Ray's fake multi-node autoscaler



def session_processes(marker: str) -> set[int]:
    """PIDs whose command line names ``marker`` (this cluster's temp dir), with all their descendants.

    Ray workers rename themselves (``ray::...``) but stay children of their node's raylet; the fake worker
    nodes are raylets the autoscaler monitor started, with the head's session dir on their command line.
    """
    parents, matched = {}, set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if marker in cmdline:
            matched.add(int(proc.name))
    tree = set(matched)
    while children := {pid for pid, ppid in parents.items() if ppid in tree} - tree:
        tree |= children
    return tree - {os.getpid()}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_session(head: subprocess.Popen, marker: str, grace_s: float = 10) -> set[int]:
    """Stop every process of this cluster (head, monitor, fake nodes, workers); returns those still alive."""
    pids = session_processes(marker) | {head.pid}
    for pid in pids:  # SIGTERM first: the raylets then take their workers down with them
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace_s
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.5)
    for pid in pids | session_processes(marker):
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    head.wait(timeout=30)
    time.sleep(1)
    return {p for p in pids | session_processes(marker) if _alive(p)}


@contextmanager
def fake_head(node_types: dict, max_workers: int, head_cpus: int = 0):
    """A Ray head on loopback with Ray's fake multi-node autoscaler over ``node_types`` (``available_node_types``
    of a cluster config, head type ``ray.head.default``); yields its address, config file, environment and temp dir.
    Every process of the cluster is stopped on exit.

    Raises:
        RuntimeError: the head did not start within 120 s (with its log's end), or processes survived the stop.
    """
    temp = Path(tempfile.mkdtemp(prefix="mras-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    config = {"cluster_name": "maskray-fake", "max_workers": max_workers, "head_node_type": "ray.head.default",
              "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{port}", "use_node_id_as_ip": True,
                           "disable_node_updaters": True, "disable_launch_config_check": True,
                           "launch_multiple": True},  # a launch of 2 nodes starts 2, not 1 per update
              "available_node_types": node_types, "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
              "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
              "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
              "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
              "worker_start_ray_commands": []}
    (temp / "autoscaler.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}  # loopback only, own token-free
    log = temp / "head.log"
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", str(head_cpus), "--num-gpus", "0", f"--autoscaling-config={temp / 'autoscaler.yaml'}",
         "--temp-dir", str(temp), "--include-dashboard", "false", "--ray-client-server-port", str(free_port()),
         "--disable-usage-stats"],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            if time.time() > deadline or head.poll() is not None:
                raise RuntimeError("the Ray head did not come up on 127.0.0.1 within 120 s:\n" + log.read_text()[-3000:])
            time.sleep(0.5)
        yield {"address": f"127.0.0.1:{port}", "config": temp / "autoscaler.yaml", "env": env, "temp": temp}
    finally:
        left = stop_session(head, str(temp))
    if left:
        raise RuntimeError(f"processes of the fake cluster survived: {sorted(left)} (logs in {temp})")
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def fake_cluster():
    """A head (0 CPU, 0 GPU) with Ray's fake autoscaler: worker type {CPU: 1, GPU: 1}, min 0, max 2, on loopback."""
    with fake_head(FAKE_TYPES, max_workers=2) as cluster:
        yield cluster


RAY_RESTART_WARNING = "has constructor arguments in the object store"  # docs/ray-notes.md section 6


def generate_on(cluster: dict, tmp_path: Path, prompts: int, home: Path, *flags: str) -> tuple[list[str], Path, str]:
    """Run ``maskray generate`` through the CLI against the fake cluster, as a driver on its head whose user's home
    folder is ``home`` (where ``ray up`` would leave its bootstrap config); returns the ids, --out and stdout."""
    ids = [f"p{i:02d}" for i in range(prompts)]
    pq.write_table(pa.table({"prompt_id": ids, "prompt": [f"a red circle number {i}" for i in range(prompts)]}),
                   tmp_path / "prompts.parquet")
    out = tmp_path / "out"
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"], "HF_HUB_OFFLINE": "1", "HOME": str(home)}
    for name in ("RAY_FAKE_CLUSTER", "AUTOSCALER_UPDATE_INTERVAL_S", ENV):  # the driver is no part of the autoscaler
        env.pop(name, None)
    command = [sys.executable, "-m", "jobs.cli", "generate", "--prompts", str(tmp_path / "prompts.parquet"),
               "--out", str(out), "--model", "tiny-meissonic", "--device", "cpu", "--generator-gpus", "1",
               "--steps", "8", "--width", "64", "--height", "64", "--batch-size", "2", *flags]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    print(result.stdout)  # pytest shows it when the test fails
    assert result.returncode == 0, shlex.join(command) + "\n" + result.stdout[-3000:] + result.stderr[-3000:]
    assert RAY_RESTART_WARNING not in result.stdout + result.stderr
    check_exactly_once(pq.read_table(out / "metrics.parquet"), ids, 1)
    return ids, out, result.stdout


@pytest.mark.slow
def test_generate_pool_grows_from_zero_gpu_nodes_with_the_autoscaler(fake_cluster, tmp_path):
    """The node types come from the cluster launcher's bootstrap config in the head user's home folder, as on a
    ``ray up`` head: no MASKRAY_AUTOSCALING_CONFIG."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(fake_cluster["config"], home / BOOTSTRAP_CONFIG)
    started = time.time()
    # 24 batches: enough for the first actor to still be busy when the second is up, on a quiet machine too (12
    # batches were done by the first actor alone before the second started)
    ids, out, stdout = generate_on(fake_cluster, tmp_path, 48, home)
    seconds = time.time() - started
    assert "1-2 generator actor(s) (1 GPU, 0 CPU each" in stdout
    assert f"autoscaling cluster: ray.head.default {{CPU: 0, GPU: 0}} x 1-1; ray.worker.gpu {{CPU: 1, GPU: 1}} x 0-2 " \
           f"(from the cluster launcher's {home / BOOTSTRAP_CONFIG})" in stdout
    assert "waiting for 1 GPU node(s) of type ray.worker.gpu from the autoscaler" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    actors = manifest["attempts"][-1]["actors"]["generator"]
    assert actors["peak"] == 2 and len(set(actors["nodes"])) == 2
    assert all(node.startswith("ffffffff") for node in actors["nodes"])  # the fake provider's worker node ids
    assert stdout.count("joined (GPU 1, CPU 1)") >= 2  # the autoscaler's progress, logged by the job
    assert manifest["counts"]["errors"] == 0 and len(list((out / "images").iterdir())) == len(ids)
    run_start = datetime.fromisoformat(manifest["attempts"][-1]["started_at"]).timestamp() - started  # +-1 s
    print(f"\nfake autoscaler: job {seconds:.1f} s; the run started {run_start:.0f} s after the command (prompt "
          f"scan, Ray connect); generator actors up {actors['started_s']} s after the run started, on "
          f"{actors['nodes']}")


@pytest.mark.slow
def test_generate_waits_for_capacity_on_a_cluster_that_hides_its_node_types(fake_cluster, tmp_path):
    """No node types anywhere (a KubeRay cluster maskray did not render): --wait-for-capacity asks the autoscaler
    for a GPU node, logs its wait, and the job runs once the node has joined."""
    started = time.time()
    _, out, stdout = generate_on(fake_cluster, tmp_path, 4, tmp_path, "--wait-for-capacity", "240")
    waits = [line for line in stdout.splitlines() if "waiting for capacity" in line]
    assert waits and waits[0].startswith("maskray generate: waiting for capacity (--wait-for-capacity 240): wanted "
                                         "1 GPU (--generator-gpus 1), the cluster has 0 GPU, 0 CPU on 1 node(s); ")
    assert "autoscaling cluster" not in stdout  # the cluster is taken as fixed: sized from the node that joined
    planned = next(line for line in stdout.splitlines() if "generator actor(s)" in line)
    assert "; 1 generator actor(s) (1 GPU" in planned
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"\nwaited for capacity: job {time.time() - started:.1f} s, {len(waits)} progress line(s); generator "
          f"actors on {manifest['attempts'][-1]['actors']['generator']['nodes']}")
