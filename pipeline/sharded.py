"""One output folder of a job: deterministic shards, rejects, manifest (DESIGN section 3).

Layout of a folder::

    _job.json                 config hash of the run that owns the folder (written first)
    part-00000.parquet ...    output rows, shard i written atomically after its rejects
    _rejects/part-00000.parquet
    _manifest.json            written last; a folder without it is incomplete

A shard counts as done when its data file has a readable footer (its rejects file is
written before it). A rerun of the same config skips done shards; a different config
refuses to write into the folder instead of mixing outputs.
"""
from __future__ import annotations

import collections
import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.schemas import REJECTS

logger = logging.getLogger(__name__)

JOB_FILE = "_job.json"
STATS_DIR = "_stats"


class OutputConflictError(storage.StorageError):
    """The folder belongs to a run with another config."""


class ShardedOutput:
    """Writer/reader of one job output folder."""

    def __init__(self, folder: str, config_hash: str, schema: pa.Schema) -> None:
        self.folder = folder.rstrip("/")
        self.config_hash = config_hash
        self.schema = schema

    # -- paths ----------------------------------------------------------------------------
    def shard_uri(self, index: int) -> str:
        return storage.join(self.folder, storage.shard_name(index))

    def reject_uri(self, index: int) -> str:
        return storage.join(self.folder, storage.REJECTS_DIR, storage.shard_name(index))

    def stats_uri(self, index: int) -> str:
        """Per-shard statistics (JSON), kept so that a resumed run can sum them."""
        name = storage.shard_name(index).replace(storage.SHARD_SUFFIX, ".json")
        return storage.join(self.folder, STATS_DIR, name)

    # -- lifecycle -----------------------------------------------------------------------
    def claim(self) -> None:
        """Mark the folder as this config's; refuse a folder of another config."""
        job_uri = storage.join(self.folder, JOB_FILE)
        if storage.exists(job_uri):
            owner = storage.read_json(job_uri).get("config_hash")
            if owner != self.config_hash:
                raise OutputConflictError(
                    f"{self.folder} holds outputs of another config (config_hash {owner:.12}, "
                    f"this run {self.config_hash:.12}); choose another output_root or delete it")
            return
        storage.write_json(job_uri, {"config_hash": self.config_hash})

    def done_shards(self, num_shards: int) -> set[int]:
        """Shards below ``num_shards`` whose data and rejects files are complete."""
        data = storage.completed_shards(self.folder)
        rejects = storage.completed_shards(storage.join(self.folder, storage.REJECTS_DIR))
        return {i for i in data & rejects if i < num_shards}

    def write_shard(self, index: int, rows: list[dict[str, Any]] | pa.Table,
                    rejects: list[dict[str, Any]]) -> None:
        """Write the rejects, then the rows (atomically each): the data file marks done."""
        storage.write_table(pa.Table.from_pylist(rejects, schema=REJECTS), self.reject_uri(index))
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, self.schema)
        if not table.schema.equals(self.schema):
            raise ValueError(f"shard {index} of {self.folder}: schema {table.schema} differs "
                             f"from {self.schema}")
        storage.write_table(table, self.shard_uri(index))

    def shard_counts(self, index: int) -> tuple[int, collections.Counter]:
        """(rows out, rejects per reason) of a written shard, read from its files."""
        rows_out = _num_rows(self.shard_uri(index))
        reasons = storage.read_table(self.reject_uri(index), columns=["reason"])
        return rows_out, collections.Counter(reasons.column("reason").to_pylist())

    def finish(self, *, rows_in: int, num_shards: int, seconds: float,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Count every shard from its files and write the manifest (last)."""
        rows_out, reasons = 0, collections.Counter()
        for index in range(num_shards):
            out, why = self.shard_counts(index)
            rows_out += out
            reasons.update(why)
        manifest = {
            "rows_in": rows_in, "rows_out": rows_out, "rows_rejected": sum(reasons.values()),
            "rejects_by_reason": dict(sorted(reasons.items())), "num_shards": num_shards,
            "config_hash": self.config_hash, "seconds": round(seconds, 3),
            "schema": self.schema.to_string(show_schema_metadata=False),
            **(extra or {}),
        }
        return storage.write_manifest(self.folder, manifest)


def complete_input(folder: str) -> tuple[dict[str, Any], list[str]]:
    """(manifest, shard URIs) of a finished job output that a later step reads.

    Refuses an incomplete folder (no manifest) and one whose shard files do not match
    the count its manifest recorded."""
    manifest = storage.require_complete(folder)
    shards = storage.shard_uris(folder)
    if "num_shards" in manifest and len(shards) != manifest["num_shards"]:
        raise storage.StorageError(f"{folder}: manifest lists {manifest['num_shards']} shards "
                                   f"but {len(shards)} are present")
    return manifest, shards


def _num_rows(uri: str) -> int:
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def chunk(items: list, size: int) -> list[list]:
    """Consecutive chunks of ``size`` items (the last may be shorter); [] -> one empty."""
    return [items[i:i + size] for i in range(0, len(items), size)] or [[]]


# ---------------------------------------------------------------------------------------
# Running shard tasks on Ray Data


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
