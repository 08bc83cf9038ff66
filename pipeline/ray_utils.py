"""Ray from a config, the same way for every job: starting or joining it, sizing actor pools
to the cluster, and running one Ray Data task per output shard."""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

from pipeline import storage
from pipeline.config import Config

logger = logging.getLogger(__name__)

# Ray binds the machine's interface address by default; this keeps a local instance
# (head, workers, Train) on 127.0.0.1 and off the network.
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# Passed on to every worker so that the offline hub settings agree everywhere.
WORKER_ENV_KEYS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")


def init_ray(config: Config) -> Any:
    """Join ``ray.address`` / ``RAY_ADDRESS``, or start a small local instance.

    Returns the ``ray`` module. Safe to call twice (a running instance is reused).
    """
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import ray.data

    if ray.is_initialized():
        return ray
    # Storage settings (endpoint, region, attempts; never credentials) reach the workers
    # through their environment, as configured in this process by pipeline.cli.parse_config.
    env_vars = {**{k: os.environ[k] for k in WORKER_ENV_KEYS if k in os.environ},
                **storage.worker_env()}
    address = config.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        logger.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
    else:
        logger.info("starting local Ray: %d logical CPUs, %d MiB object store",
                    config.ray.num_cpus, config.ray.object_store_memory_mb)
        ray.init(num_cpus=config.ray.num_cpus,
                 object_store_memory=config.ray.object_store_memory_mb * 1024 * 1024,
                 include_dashboard=False, runtime_env={"env_vars": env_vars},
                 log_to_driver=True)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress_bars(config.ray.progress_bars)
    return ray


def progress_bars(setting: str | bool) -> bool:
    """``ray.progress_bars``: auto = only when stderr is a terminal (a log file or CI would
    get a line per bar update: tens of MB for the demo)."""
    if setting == "auto":
        return sys.stderr.isatty()
    return bool(setting)


def actor_pool_resources(num_actors: int, cpus_per_actor: float) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) of a model-actor pool on this cluster.

    One actor per GPU when the cluster has GPUs (``num_actors`` overrides the count);
    otherwise ``(cluster CPUs - 1) / cpus_per_actor`` actors, leaving one CPU for Ray
    Data's own tasks (a pool that takes every CPU starves them: the job waits forever).
    """
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return num_actors or gpus, cpus_per_actor, 1.0
    auto = max(1, int((resources.get("CPU", 1) - 1) // cpus_per_actor))
    return num_actors or auto, cpus_per_actor, 0.0


# -- shard tasks on Ray Data --------------------------------------------------------------------
def _call_task(batch: dict[str, Any], fn: Any, refs: list[Any]) -> dict[str, list]:
    """Ray Data batch of one task index -> one result row (columns of length 1)."""
    import ray

    (index,) = batch["task_index"]
    return {k: [v] for k, v in fn(ray.get(refs[int(index)])).items()}


class _ActorShim:
    """Builds the worker class once per actor, then feeds it one task per call."""

    def __init__(self, worker_cls: type, kwargs: dict[str, Any], refs: list[Any]) -> None:
        self.worker = worker_cls(**kwargs)
        self.refs = refs

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        return _call_task(batch, self.worker, self.refs)


def run_shard_tasks(tasks: list[Any], worker: Any, *, num_cpus: float = 1.0,
                    num_gpus: float = 0.0, pool_size: int | None = None,
                    worker_kwargs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run one Ray Data task per shard task and return their result rows.

    ``worker`` is a function ``task -> dict`` (stateless Ray tasks) or a class whose
    instances are such callables, built once per actor of a pool of ``pool_size``
    (models are loaded once per actor). Each task writes its own shard, so outputs stay
    deterministic whatever the scheduling; Ray Data supplies the scheduling, the
    progress bar and retries. Tasks travel through the object store (one object each);
    the dataset itself holds only their indices.
    """
    import ray
    import ray.data

    if not tasks:
        return []
    refs = [ray.put(task) for task in tasks]
    dataset = ray.data.from_items([{"task_index": i} for i in range(len(tasks))],
                                  override_num_blocks=len(tasks))
    if isinstance(worker, type):
        dataset = dataset.map_batches(
            _ActorShim, batch_size=1, batch_format="numpy",
            fn_constructor_kwargs={"worker_cls": worker, "kwargs": worker_kwargs or {},
                                   "refs": refs},
            compute=ray.data.ActorPoolStrategy(size=pool_size or 1),
            num_cpus=num_cpus, num_gpus=num_gpus)
    else:
        dataset = dataset.map_batches(_call_task, batch_size=1, batch_format="numpy",
                                      fn_kwargs={"fn": worker, "refs": refs},
                                      num_cpus=num_cpus, num_gpus=num_gpus)
    return dataset.take_all()
