"""Ray from a config, the same way for every job: starting or joining it (also as the driver
of a submitted job), the resources of actor pools (GPUs from config, waiting for the
autoscaler when asked), and running one Ray Data task per output shard."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from collections import Counter
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
# Set by Ray in a submitted job's driver: the job's config, with its runtime env.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class ResourceWaitError(RuntimeError):
    """The resources a pool or training run asked for did not appear in time; names them."""


class RayStartError(RuntimeError):
    """A new local Ray instance did not start within ``ray.start_timeout_s``."""


# Ray 2.60 waits for a new local node in two places that the environment can lengthen:
# - ray/_private/node.py, Node.__init__: "The current node timed out during startup" ends a
#   loop of 30 s (a constant) around services.get_node, whose C++ side
#   (GlobalStateAccessor::GetNode) itself retries for RAY_raylet_start_wait_time_s ("Try
#   increase the RAY_raylet_start_wait_time_s config"). The driver reads it once, when `ray`
#   is first imported, so init_ray sets it before importing Ray;
# - node.py, Node.start_gcs_server (the GCS port file, 30 s) and Node._init_gcs_client (its
#   connection tries, ~20): RAY_gcs_server_port_wait_time_s, read at each start.
# DataContext config key of ``ray.max_task_retries`` (read by run_shard_tasks); Ray Data's
# own default is -1: retry a task whose worker died, or whose argument does not deserialise,
# for ever.
TASK_RETRIES_KEY = "unime.max_task_retries"
DEFAULT_TASK_RETRIES = 2
START_WAIT_ENV = ("RAY_raylet_start_wait_time_s", "RAY_gcs_server_port_wait_time_s")


def job_env_vars() -> dict[str, str]:
    """Environment variables of the runtime env of the Ray job this driver runs in (set by
    ``ray job submit --runtime-env ...``); empty outside a job."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return {}
    runtime_env = json.loads(raw).get("runtime_env") or {}
    return dict(runtime_env.get("env_vars") or {})


def in_ray_job() -> bool:
    """True when this process is the driver of a submitted Ray job."""
    return JOB_CONFIG_ENV in os.environ


def worker_env_vars() -> dict[str, str]:
    """What ``ray.init`` passes to the workers: the offline-hub settings and the storage
    settings of this process, minus the keys the job's runtime env sets already (Ray refuses
    to merge a job's runtime env with a ``ray.init`` one that names the same variables)."""
    wanted = {**{k: os.environ[k] for k in WORKER_ENV_KEYS if k in os.environ},
              **storage.worker_env()}
    from_job = job_env_vars()
    return {k: v for k, v in wanted.items() if k not in from_job}


def init_ray(config: Config) -> Any:
    """Join ``ray.address`` / ``RAY_ADDRESS`` (a submitted job's driver joins its cluster
    this way), or start a small local instance. Then refuse a local ``output_root`` that the
    cluster's other nodes cannot see (:func:`check_output_root`).

    Returns the ``ray`` module. Safe to call twice (a running instance is reused).
    """
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray_address(config):
        set_start_wait(config.ray.start_timeout_s)
    import ray

    if not ray.is_initialized():
        _start_or_join(config)
    check_output_root(config, alive_nodes())
    return ray


def ray_address(config: Config) -> str:
    """The cluster to join: ``ray.address``, else ``RAY_ADDRESS``; '' = start a local one."""
    return config.ray.address or os.environ.get("RAY_ADDRESS", "")


def set_start_wait(timeout_s: float) -> None:
    """Let a new local instance take ``timeout_s`` (``ray.start_timeout_s``) to start: the
    variables of :data:`START_WAIT_ENV`, which replace any value the environment gave."""
    seconds = str(math.ceil(timeout_s))
    for key in START_WAIT_ENV:
        if os.environ.get(key, seconds) != seconds:
            logger.info("ray.start_timeout_s replaces %s=%s with %s", key, os.environ[key],
                        seconds)
        os.environ[key] = seconds
    if "ray" in sys.modules:
        logger.warning("ray.start_timeout_s=%g: Ray was imported before init_ray, so its wait "
                       "for the node to register keeps the %s it had then", timeout_s,
                       START_WAIT_ENV[0])


def _start_or_join(config: Config) -> None:
    import ray
    import ray.data

    runtime_env = {"env_vars": worker_env_vars()}
    address = ray_address(config)
    if address:
        logger.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        _start_local(config, runtime_env)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress_bars(config.ray.progress_bars)
    context.set_config(TASK_RETRIES_KEY, config.ray.max_task_retries)


def _start_local(config: Config, runtime_env: dict[str, Any]) -> None:
    """A new local instance; a start that times out raises :class:`RayStartError`."""
    import ray

    logger.info("starting local Ray: %d logical CPUs, %d MiB object store (start-up may take "
                "%g s: ray.start_timeout_s)", config.ray.num_cpus,
                config.ray.object_store_memory_mb, config.ray.start_timeout_s)
    try:
        ray.init(num_cpus=config.ray.num_cpus,
                 object_store_memory=config.ray.object_store_memory_mb * 1024 * 1024,
                 include_dashboard=False, runtime_env=runtime_env, log_to_driver=True)
    except Exception as err:
        if not (isinstance(err, TimeoutError) or "timed out" in str(err).lower()):
            raise
        raise RayStartError(start_error_message(config.ray.start_timeout_s, err)) from err


def start_error_message(timeout_s: float, err: BaseException) -> str:
    """One line: the knob to raise, what else helps, and Ray's own first line."""
    ray_says = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return (f"Ray did not start within ray.start_timeout_s={timeout_s:g} s (machine load?); "
            "raise ray.start_timeout_s, lower ray.num_cpus, or start Ray once (ray start "
            f"--head) and join it with ray.address=auto. Ray said: {ray_says}")


def alive_nodes() -> list[dict[str, Any]]:
    """``ray.nodes()`` entries of the nodes that are up."""
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def check_output_root(config: Config, nodes: list[dict[str, Any]]) -> None:
    """A local ``output_root`` works on one node (or a filesystem all nodes mount,
    ``storage.shared_filesystem``); on several nodes the workers would write shards and
    checkpoints onto disks the driver never reads."""
    from pipeline.config import ConfigError

    if storage.is_s3(config.run_root) or config.storage.shared_filesystem:
        return
    if len(nodes) > 1:
        raise ConfigError(
            f"output_root={config.run_root!r} is a local path but the Ray cluster has "
            f"{len(nodes)} nodes: the workers cannot see the driver's disk. Use "
            "output_root=s3://BUCKET/runs/<name>, or storage.shared_filesystem=true if every "
            "node mounts that path")
    if in_ray_job() or config.ray.address or os.environ.get("RAY_ADDRESS"):
        logger.warning("output_root=%s is local: fine on this one-node cluster, but nodes the "
                       "autoscaler adds later will not see it (use s3://, or "
                       "storage.shared_filesystem=true for a shared mount)", config.run_root)


def progress_bars(setting: str | bool) -> bool:
    """``ray.progress_bars``: auto = only when stderr is a terminal (a log file or CI would
    get a line per bar update: tens of MB for the demo)."""
    if setting == "auto":
        return sys.stderr.isatty()
    return bool(setting)


# -- resources ----------------------------------------------------------------------------------
def cluster_gpus(accelerator_type: str = "") -> float:
    """GPUs of the alive nodes (of one kind: nodes with the ``accelerator_type:<kind>``
    resource, which Ray sets from the GPU model and cluster configs can declare)."""
    marker = f"accelerator_type:{accelerator_type}"
    return sum(node["Resources"].get("GPU", 0.0) for node in alive_nodes()
               if not accelerator_type or marker in node["Resources"])


def uses_gpu(use_gpu: str | bool, key: str) -> bool:
    """``<section>.use_gpu``: true/false as said; auto = the cluster has GPUs right now
    (an autoscaling cluster with GPU nodes at zero has none: say true there)."""
    if use_gpu != "auto":
        return bool(use_gpu)
    present = cluster_gpus() > 0
    if not present:
        logger.info("%s=auto: no GPU in the Ray cluster now, so CPU (on an autoscaling "
                    "cluster whose GPU nodes start at zero, set %s=true)", key, key)
    return present


def wait_for_gpus(count: int, gpus_each: float, *, key: str, timeout_s: float,
                  accelerator_type: str = "", poll_s: float = 2.0) -> None:
    """Block until the cluster has ``count x gpus_each`` GPUs (of ``accelerator_type``),
    asking the autoscaler for them (``ray.autoscaler.sdk.request_resources``); raise
    :class:`ResourceWaitError` naming the resource after ``timeout_s``."""
    needed = count * gpus_each
    if cluster_gpus(accelerator_type) >= needed:
        return
    from ray.autoscaler.sdk import request_resources

    bundle = {"GPU": gpus_each}
    resource = f"{needed:g} GPU" + (f" on accelerator_type:{accelerator_type} nodes"
                                    if accelerator_type else "")
    if accelerator_type:
        bundle[f"accelerator_type:{accelerator_type}"] = 0.001
    logger.warning("%s=true: waiting for %s (the cluster has %g now); asked the autoscaler "
                   "for them, giving up after %.0f s (ray.resource_wait_s)", key, resource,
                   cluster_gpus(accelerator_type), timeout_s)
    request_resources(bundles=[bundle] * count)
    start = last_log = time.monotonic()
    try:
        while (have := cluster_gpus(accelerator_type)) < needed:
            now = time.monotonic()
            if now - start >= timeout_s:
                raise ResourceWaitError(
                    f"{key}=true: waited {timeout_s:.0f} s for {resource}, the cluster has "
                    f"{have:g}. Check the autoscaler (`ray status`, monitor.log) and the GPU "
                    "worker types' max_workers and cloud quota, raise ray.resource_wait_s, or "
                    f"set {key}=false to run on CPUs")
            if now - last_log >= 60:
                logger.info("%s: still waiting for %s (%g now, %.0f s)", key, resource, have,
                            now - start)
                last_log = now
            time.sleep(poll_s)
    finally:
        request_resources(bundles=[])  # the pool or trainer holds what it needs from here on
    logger.info("%s: %s available after %.0f s", key, resource, time.monotonic() - start)


def actor_pool_resources(pool: Any, key: str, timeout_s: float) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) of a model-actor pool section (``teacher``,
    ``mining``, ``eval``: ``num_actors``, ``cpus_per_actor``, ``use_gpu``,
    ``gpus_per_actor``).

    With GPUs: ``num_actors`` actors (0 = one per ``gpus_per_actor`` GPUs the cluster has,
    at least one), after waiting for the autoscaler to add them if it must. Without:
    ``num_actors`` or ``(cluster CPUs - 1) / cpus_per_actor``, leaving one CPU for Ray
    Data's own tasks (a pool that takes every CPU starves them: the job waits forever); a
    larger ``num_actors`` is cut to that, with a warning (every actor of a pool must start:
    :func:`run_shard_tasks`).
    """
    import ray

    if uses_gpu(pool.use_gpu, f"{key}.use_gpu"):
        wait_for_gpus(pool.num_actors or 1, pool.gpus_per_actor, key=f"{key}.use_gpu",
                      timeout_s=timeout_s)
        actors = pool.num_actors or max(1, int(cluster_gpus() // pool.gpus_per_actor))
        return actors, pool.cpus_per_actor, pool.gpus_per_actor
    cpus = ray.cluster_resources().get("CPU", 1)
    fits = max(1, int((cpus - 1) // pool.cpus_per_actor))
    if pool.num_actors > fits:
        logger.warning("%s.num_actors=%d: the cluster's %g CPUs hold %d actor(s) of %g CPUs "
                       "beside one CPU for Ray Data's tasks; using %d", key, pool.num_actors,
                       cpus, fits, pool.cpus_per_actor, fits)
    return min(pool.num_actors or fits, fits), pool.cpus_per_actor, 0.0


def node_counts(results: list[dict[str, Any]]) -> dict[str, int]:
    """How many shard tasks ran on each node (``node_id`` of :func:`run_shard_tasks`'s
    rows), for the manifests: where the work ran."""
    return dict(sorted(Counter(str(row["node_id"]) for row in results).items()))


# -- shard tasks on Ray Data --------------------------------------------------------------------
def _call_task(batch: dict[str, Any], fn: Any, refs: list[Any]) -> dict[str, list]:
    """Ray Data batch of one task index -> one result row (columns of length 1). A failure
    leaves as a ``UserCodeException`` that holds the task's error as ``cause`` (when it
    survives pickling): Ray Data's own wrapper keeps it only as ``__cause__``, which is lost
    on the way to the driver, where ``pipeline.cli`` prints the error's one line."""
    import ray
    from ray.exceptions import UserCodeException

    (index,) = batch["task_index"]
    try:
        row = {**fn(ray.get(refs[int(index)])),
               "node_id": ray.get_runtime_context().get_node_id()}
    except Exception as err:
        wrapped = UserCodeException(f"shard task {int(index)} failed: "
                                    f"{type(err).__name__}: {err}")
        if _round_trips(err):
            wrapped.cause = err  # in __dict__, so pickled with it
        raise wrapped from err
    return {k: [v] for k, v in row.items()}


def _round_trips(err: BaseException) -> bool:
    """Whether ``err`` pickles and unpickles as Ray moves errors (ray.exceptions: cloudpickle;
    a RayTaskError keeps only the text of a cause that does not pickle, and an error the
    driver cannot unpickle would replace the task's whole error)."""
    from ray import cloudpickle

    try:
        cloudpickle.loads(cloudpickle.dumps(err))
    except Exception:
        return False
    return True


class _ActorShim:
    """Builds the worker class once per actor, then feeds it one task per call."""

    def __init__(self, worker_cls: type, kwargs: dict[str, Any], refs: list[Any]) -> None:
        self.worker = worker_cls(**kwargs)
        self.refs = refs

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        return _call_task(batch, self.worker, self.refs)


def run_shard_tasks(tasks: list[Any], worker: Any, *, num_cpus: float = 1.0,
                    num_gpus: float = 0.0, pool_size: int | None = None,
                    worker_kwargs: dict[str, Any] | None = None,
                    actors_start_s: float = 600.0) -> list[dict[str, Any]]:
    """Run one Ray Data task per shard task and return their result rows.

    ``worker`` is a function ``task -> dict`` (stateless Ray tasks) or a class whose
    instances are such callables, built once per actor of a pool of ``pool_size``
    (models are loaded once per actor). Each task writes its own shard, so outputs stay
    deterministic whatever the scheduling; Ray Data supplies the scheduling, the
    progress bar and a bounded number of retries after system failures (``ray.max_task_retries``;
    an error of the task's code is not retried). Tasks travel through the object store (one
    object each);
    the dataset itself holds only their indices. Each result row also names the node it ran
    on (``node_id``). Every actor of a pool starts before the first task is handed out (so
    the shards spread over the whole pool; ``actors_start_s`` later, a pool that cannot start
    fails instead of hanging).
    """
    import ray
    import ray.data

    if not tasks:
        return []
    refs = [ray.put(task) for task in tasks]
    context = ray.data.DataContext.get_current()
    before = context.wait_for_min_actors_s, context.raise_original_map_exception
    # _call_task wraps a failure itself, keeping the error (Ray Data's wrapper would not)
    context.wait_for_min_actors_s, context.raise_original_map_exception = actors_start_s, True
    try:
        return _map_tasks(tasks, worker, refs, num_cpus=num_cpus, num_gpus=num_gpus,
                          pool_size=pool_size, worker_kwargs=worker_kwargs)
    finally:
        context.wait_for_min_actors_s, context.raise_original_map_exception = before


def _map_tasks(tasks: list[Any], worker: Any, refs: list[Any], *, num_cpus: float,
               num_gpus: float, pool_size: int | None,
               worker_kwargs: dict[str, Any] | None) -> list[dict[str, Any]]:
    import ray.data

    dataset = ray.data.from_items([{"task_index": i} for i in range(len(tasks))],
                                  override_num_blocks=len(tasks))
    retries = ray.data.DataContext.get_current().get_config(TASK_RETRIES_KEY,
                                                            DEFAULT_TASK_RETRIES)
    # Ray 2.60 takes retry limits only as remote args (deprecated for 2.64, with no named
    # replacement yet): revisit on upgrading Ray.
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
    if isinstance(worker, type):
        dataset = dataset.map_batches(
            _ActorShim, batch_size=1, batch_format="numpy",
            fn_constructor_kwargs={"worker_cls": worker, "kwargs": worker_kwargs or {},
                                   "refs": refs},
            compute=ray.data.ActorPoolStrategy(size=pool_size or 1),
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=retries,
            max_task_retries=retries)
    else:
        dataset = dataset.map_batches(_call_task, batch_size=1, batch_format="numpy",
                                      fn_kwargs={"fn": worker, "refs": refs},
                                      num_cpus=num_cpus, num_gpus=num_gpus,
                                      max_retries=retries)
    return dataset.take_all()
