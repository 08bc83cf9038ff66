"""Several Ray nodes (``ray.cluster_utils.Cluster`` on one machine), outputs on the loopback
S3 server: the teacher job, the mining job and a two-worker stage 1 spread their work over
both worker nodes, read and write only S3, and a local output_root is refused."""
from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import pytest

from pipeline.cli import run_step
from pipeline.config import ConfigError, load_config
from tests.ray_head import HEAD_ENV

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "jobs" / "configs" / "demo.yaml")
# Each worker node has 2 CPUs and each actor / training worker takes 2: one per node, so
# the placement (not luck) decides that both nodes work. The head's CPU runs Ray Data's tasks.
NODE_CPUS = 2
SMALL = ["data.demo.num_train_images=12", "data.demo.num_eval_images=8",
         "data.demo.num_nli_groups=40", "data.demo.num_eval_candidates=4",
         "data.demo.image_size_px=32", "data.image_size=16", "data.rows_per_shard=8",
         "ray.progress_bars=false", "ray.resource_wait_s=300",
         "teacher.num_actors=2", f"teacher.cpus_per_actor={NODE_CPUS}",
         "mining.num_actors=2", f"mining.cpus_per_actor={NODE_CPUS}", "mining.num_negatives=3",
         "stage2.mined_negatives=2",
         "train.num_workers=2", f"train.cpus_per_worker={NODE_CPUS}",
         "stage1.global_batch_groups=8", "stage1.epochs=1", "stage1.max_steps=2"]

pytestmark = pytest.mark.cluster


def input_uris(inputs: object) -> Iterator[str]:
    """Every ``uri`` of a manifest's input fingerprints, however nested."""
    if isinstance(inputs, dict):
        if isinstance(inputs.get("uri"), str):
            yield inputs["uri"]
        for value in inputs.values():
            yield from input_uris(value)
    elif isinstance(inputs, list):
        for value in inputs:
            yield from input_uris(value)


@pytest.fixture
def two_worker_nodes(no_local_ray, s3_endpoint: str) -> Iterator[tuple[str, set[str]]]:
    """(address, worker node ids) of a head with 1 CPU and two worker nodes."""
    from ray.cluster_utils import Cluster

    os.environ.update(HEAD_ENV)
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 1, "object_store_memory": 300 * 1024 * 1024})
    workers = {cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=300 * 1024 * 1024)
               for _ in range(2)}
    cluster.wait_for_nodes()
    try:
        yield cluster.address, {node.node_id for node in workers}
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


def test_jobs_spread_over_nodes_and_use_only_s3(two_worker_nodes, s3_bucket: str,
                                                tmp_path: pathlib.Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import storage

    address, worker_nodes = two_worker_nodes
    # The driver runs in an empty folder that nothing may write to or read from.
    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()
    monkeypatch.chdir(driver_dir)
    root = f"{s3_bucket}/run"
    argv = ["--config", DEMO, *SMALL, f"ray.address={address}", f"output_root={root}"]
    manifests = {step: run_step(argv, step) for step in
                 ("prepare_data", "teacher_embed", "stage1", "mine_negatives")}

    assert set(manifests["teacher_embed"]["nodes"]) == worker_nodes
    assert set(manifests["mine_negatives"]["nodes"]["embed"]) == worker_nodes
    assert set(manifests["mine_negatives"]["nodes"]["search"]) <= worker_nodes
    assert set(manifests["stage1"]["worker_nodes"]) == worker_nodes
    assert manifests["stage1"]["steps"] == 2
    # Everything the steps read and wrote is on S3; the driver's folder stayed empty.
    for step, manifest in manifests.items():
        assert storage.exists(f"{root}/{step}/_manifest.json"), step
        uris = list(input_uris(manifest["inputs"]))
        assert uris and all(uri.startswith(f"{root}/") for uri in uris), (step, uris)
    assert manifests["stage1"]["student"]["uri"].startswith("s3://")
    assert list(driver_dir.iterdir()) == []


def test_a_local_output_root_is_refused_on_several_nodes(two_worker_nodes,
                                                         tmp_path: pathlib.Path) -> None:
    from pipeline.ray_utils import init_ray

    address, _ = two_worker_nodes
    local = load_config(DEMO, [f"ray.address={address}", f"output_root={tmp_path}"])
    with pytest.raises(ConfigError, match="3 nodes: the workers cannot see"):
        init_ray(local)
    shared = load_config(DEMO, [f"ray.address={address}", f"output_root={tmp_path}",
                                "storage.shared_filesystem=true"])
    init_ray(shared)  # the user says every node mounts it
