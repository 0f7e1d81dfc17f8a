"""``maskray generate`` loses a node: a real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``:
a head without GPUs and two worker nodes declaring one logical GPU each, models on CPU), a generator pool of
``--generator-gpus 1`` spread over both workers, and one worker node removed mid-run. The job must finish
with every (prompt_id, sample_idx) exactly once.

A fresh GPU node joins once the node is lost, and the generator actor that ran there must restart on another node
(the fresh one, or the other worker once its own actor is idle): Ray warns that such a restart fails when "the
arguments in the object store go out of scope or are lost" (ray-project/ray#53727). Ray Data's arguments are
``ray.put`` by the driver and held by the operator, so the restarted actor reads them from the driver's node
(docs/ray-notes.md section 6)."""

from __future__ import annotations

import threading
import time

import pyarrow.parquet as pq
import pytest
from generate_helpers import check_exactly_once, shards


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0,
                                                            "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def test_worker_node_lost_mid_run_still_exactly_once(cluster, tmp_path):
    import ray

    from pipeline.config import GenerateConfig
    from pipeline.generate import run_generate

    cluster, workers = cluster
    ids = shards(tmp_path / "prompts", count=2, per_shard=12)
    config = GenerateConfig.model_validate({
        "job": {"prompts": str(tmp_path / "prompts"), "out": str(tmp_path / "out"), "batch_size": 2,
                "generator_gpus": 1, "shard_size": 2},
        "model": {"device": "cpu"}, "generation": {"steps": 4, "width": 32, "height": 32}})
    runs: list = []
    runner = threading.Thread(target=lambda: runs.append(run_generate(config, log=lambda _: None)))
    runner.start()
    records = tmp_path / "out" / "_shards"
    deadline, removed_at = time.monotonic() + 240, None
    while runner.is_alive() and removed_at is None and time.monotonic() < deadline:
        written = len(list(records.glob("*.parquet"))) if records.is_dir() else 0
        if written and ray.available_resources().get("GPU", 0) == 0:  # a generator actor holds each node's GPU
            cluster.remove_node(workers[0])  # its generator actor, tasks and objects are gone
            removed_at = written
            fresh = cluster.add_node(num_cpus=1, num_gpus=1)  # where the lost actor restarts
        time.sleep(0.05)
    runner.join(timeout=600)
    assert removed_at is not None and removed_at < 12, "the node was not removed mid-run"
    (result,) = runs
    assert result.rows == 24 and result.errors == 0 and result.shards_done == result.shards == 12
    check_exactly_once(pq.read_table(tmp_path / "out" / "metrics.parquet"), ids, 1)
    generators = [actor for actor in ray._private.state.actors().values()
                  if actor["ActorClassName"] == "MapWorker(MapBatches(Generator))"]
    restarted = [actor["Address"]["NodeID"] for actor in generators if actor["NumRestarts"] > 0]
    assert len(restarted) == 1 and restarted[0] in (fresh.node_id, workers[1].node_id), generators
