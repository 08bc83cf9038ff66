"""GPU pools on an autoscaling cluster that starts with no worker node (Ray's fake
autoscaler): a pool configured for GPUs asks the autoscaler, waits for the node and runs on
it; a GPU kind the cluster cannot add fails after ``ray.resource_wait_s`` naming it."""
from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from pipeline.cli import run_step
from pipeline.config import load_config
from tests.ray_head import autoscaling_cluster

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "jobs" / "configs" / "demo.yaml")
GPU_NODE = {"resources": {"CPU": 2, "GPU": 1, "accelerator_type:A100": 1},
            "node_config": {}, "min_workers": 0, "max_workers": 1}
SMALL = ["data.demo.num_train_images=12", "data.demo.num_eval_images=8",
         "data.demo.num_nli_groups=40", "data.demo.num_eval_candidates=4",
         "data.demo.image_size_px=32", "data.image_size=16", "data.rows_per_shard=24",
         "ray.progress_bars=false", "ray.address=auto", "ray.resource_wait_s=240"]

pytestmark = pytest.mark.cluster


@pytest.fixture
def gpu_nodes_from_zero(no_local_ray) -> Iterator[None]:
    cluster = autoscaling_cluster(head_cpus=2, worker_types={"gpu.a100": GPU_NODE})
    cluster.start()
    try:
        yield
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


def test_a_gpu_pool_scales_up_from_zero_and_runs_on_the_new_node(
        gpu_nodes_from_zero, tmp_path: pathlib.Path) -> None:
    import ray

    from pipeline.ray_utils import ResourceWaitError, cluster_gpus, uses_gpu
    from pipeline.train.loop import resolve_use_gpu

    argv = ["--config", DEMO, *SMALL, f"output_root={tmp_path}",
            "storage.shared_filesystem=true"]  # the fake nodes share this machine's disk
    run_step(argv, "prepare_data")
    head = ray.get_runtime_context().get_node_id()
    assert cluster_gpus() == 0 and not uses_gpu("auto", "teacher.use_gpu")

    manifest = run_step([*argv, "teacher.use_gpu=true", "teacher.num_actors=1",
                         "teacher.cpus_per_actor=1"], "teacher_embed")
    gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}
    assert len(gpu_nodes) == 1 and head not in gpu_nodes
    assert set(manifest["nodes"]) == gpu_nodes  # every shard ran on the added node
    assert manifest["rows_out"] == 40

    # Training asks for its GPU kind: there now, or never coming (fails, naming it).
    a100 = load_config(DEMO, ["train.use_gpu=true", "train.num_workers=1",
                              "train.accelerator_type=A100", "ray.resource_wait_s=5"])
    assert resolve_use_gpu(a100.train, a100.ray.resource_wait_s) is True
    h100 = load_config(DEMO, ["train.use_gpu=true", "train.num_workers=1",
                              "train.accelerator_type=H100"])
    with pytest.raises(ResourceWaitError, match=r"waited 5 s for 1 GPU on "
                                                r"accelerator_type:H100 nodes, the cluster has 0"):
        resolve_use_gpu(h100.train, resource_wait_s=5)
