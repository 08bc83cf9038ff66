"""Starting or joining Ray from a config, the same way for every job."""
from __future__ import annotations

import logging
import os
from typing import Any

from pipeline import storage
from pipeline.config import Config

logger = logging.getLogger(__name__)

# Ray binds the machine's interface address by default; this keeps a local instance
# (head, workers, Train) on 127.0.0.1 and off the network (ENVIRONMENT.md).
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
    # through their environment, as configured in this process by pipeline.cli.setup.
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
    context.enable_progress_bars = config.ray.progress_bars
    return ray


def actor_pool_resources(num_actors: int, cpus_per_actor: float) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) of a model-actor pool on this cluster.

    One actor per GPU when the cluster has GPUs (``num_actors`` overrides the count);
    otherwise ``(cluster CPUs - 1) / cpus_per_actor`` actors, leaving one CPU for Ray
    Data's own tasks (a pool that takes every CPU starves them: ENVIRONMENT.md).
    """
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return num_actors or gpus, cpus_per_actor, 1.0
    auto = max(1, int((resources.get("CPU", 1) - 1) // cpus_per_actor))
    return num_actors or auto, cpus_per_actor, 0.0
