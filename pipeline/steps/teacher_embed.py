"""Step 2, teacher_embed: embed every text of the ``text_groups`` shards with the teacher.

A pool of Ray Data actors each loads the teacher once (:class:`TeacherShardWorker`); each
call embeds one input shard and writes the output shard of the same index (``teacher``
table: the group's texts and one unit-norm float16 vector per text) plus its rejects. Within
a call the texts of the whole shard go to ``SentenceTransformer.encode`` at once, which
sorts them by length before cutting batches of ``teacher.batch_size``: the sort window is
the shard (``data.rows_per_shard`` groups), so batches hold texts of similar length and
padding stays small. One GPU per actor when the cluster has GPUs. Output under
``<run_root>/teacher_embed``; a rerun skips finished shards.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import outputs, provenance, storage
from pipeline.config import Config
from pipeline.data.schemas import group_table, teacher_schema
from pipeline.steps import base

logger = logging.getLogger(__name__)

NAME = "teacher_embed"
READS = ("teacher",)
USES_RAY = True
INPUT_TABLE = "text_groups"  # of prepare_data


def inputs(config: Config) -> tuple[str, ...]:
    return ("prepare_data",)


def check(config: Config) -> None:
    """Nothing to refuse beyond the config's own validation."""


@dataclass(frozen=True)
class TeacherTask:
    index: int
    input_uri: str


class TeacherShardWorker:
    """Ray Data actor: holds one Teacher, embeds one shard per call."""

    def __init__(self, teacher: dict[str, Any], batch_size: int, folder: str,
                 owner: str, torch_threads: int) -> None:
        import torch

        from pipeline.models.teacher import Teacher

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, torch_threads))
        self.teacher = Teacher(**teacher)
        # First calls pay one-time costs (kernel selection, thread pools, tokenizer caches):
        # paid here, at actor start-up, not by the first shard.
        self.teacher.encode(["warm-up " * n for n in (4, 32, 128)], batch_size=batch_size)
        self.teacher.token_lengths(["warm-up"])
        self.batch_size = batch_size
        self.output = outputs.ShardedOutput(folder, owner, teacher_schema(self.teacher.dim))

    def __call__(self, task: TeacherTask) -> dict[str, Any]:
        start, started_at = time.perf_counter(), time.time()
        rows = storage.read_table(task.input_uri, columns=["id", "texts"]).to_pylist()
        sizes = np.array([len(r["texts"]) for r in rows], dtype=np.int64)  # (G,)
        flat = [t for row in rows for t in row["texts"]]
        read_s = time.perf_counter() - start
        lengths = self.teacher.token_lengths(flat)
        tokenize_s = time.perf_counter() - start - read_s
        emb = self.teacher.encode(flat, batch_size=self.batch_size)  # (N, D) float32
        encode_s = time.perf_counter() - start - read_s - tokenize_s
        finite = np.isfinite(emb).all(axis=1)                        # (N,)
        group_of = np.repeat(np.arange(len(rows)), sizes)            # (N,)
        group_ok = np.ones(len(rows), dtype=bool)                    # (G,)
        group_ok[group_of[~finite]] = False
        rejects = [nan_reject(rows[g], task, g, finite[group_of == g])
                   for g in np.flatnonzero(~group_ok)]
        keep = np.flatnonzero(group_ok)
        table = group_table([rows[g]["id"] for g in keep], [rows[g]["texts"] for g in keep],
                            emb[group_ok[group_of]], self.teacher.dim)
        stats = {"shard": task.index, "texts": len(flat), "tokens": int(sum(lengths)),
                 "truncated": int(sum(n > self.teacher.max_seq_length for n in lengths)),
                 "seconds": round(time.perf_counter() - start, 3), "read_s": round(read_s, 3),
                 "tokenize_s": round(tokenize_s, 3), "encode_s": round(encode_s, 3),
                 "started_at": started_at, "finished_at": time.time()}
        storage.write_json(self.output.stats_uri(task.index), stats)
        self.output.write_shard(task.index, table, rejects)
        return stats


def nan_reject(row: dict[str, Any], task: TeacherTask, position: int,
               finite: np.ndarray) -> dict[str, Any]:
    text = int(np.flatnonzero(~finite)[0])
    return {"id": row["id"], "source": f"{task.input_uri}#{position}",
            "field": f"teacher_emb[{text}]", "reason": "nan_embedding",
            "detail": "the teacher produced a NaN/inf vector",
            "row_json": json.dumps(row, ensure_ascii=False)}


def run(config: Config) -> dict[str, Any]:
    """Embed every shard not done yet (or reuse the finished step); returns the manifest."""
    from pipeline.models.teacher import teacher_kwargs
    from pipeline.ray_utils import actor_pool_resources, node_counts, run_shard_tasks

    start = time.perf_counter()
    folder = config.step_dir(NAME)
    owner = base.step_hash(config, NAME)
    if (done := base.finished(config, NAME)) is not None:
        return done
    input_folder = storage.join(base.input_dir(config, NAME, "prepare_data"), INPUT_TABLE)
    base.input_manifest(config, NAME, "prepare_data", input_folder)
    inputs_manifest, shards = outputs.complete_input(input_folder)
    actors, cpus, gpus = actor_pool_resources(config.teacher, "teacher",
                                              config.ray.resource_wait_s)
    kwargs = {"teacher": teacher_kwargs(config.teacher), "batch_size": config.teacher.batch_size,
              "folder": folder, "owner": owner, "torch_threads": int(cpus)}
    # The output schema needs the teacher's dimension: the first actor call tells it, so
    # the folder is claimed by a ShardedOutput that does not need the schema.
    base.claim(config, NAME)
    done_shards = outputs.completed_shards(folder) & outputs.completed_shards(
        storage.join(folder, outputs.REJECTS_DIR))
    tasks = [TeacherTask(i, uri) for i, uri in enumerate(shards) if i not in done_shards]
    pool = min(actors, len(tasks) or 1)
    logger.info("teacher_embed: %d shards (%d done already) with %d actor(s), %.1f CPU / "
                "%.0f GPU each -> %s", len(shards), len(done_shards), pool, cpus, gpus, folder)
    results = run_shard_tasks(tasks, TeacherShardWorker, num_cpus=cpus, num_gpus=gpus,
                              pool_size=pool, worker_kwargs=kwargs,
                              actors_start_s=config.ray.resource_wait_s)
    logger.info("teacher_embed: %d shards embedded in this run", len(results))
    dim = _dim_of(folder)
    output = outputs.ShardedOutput(folder, owner, teacher_schema(dim))
    shard_stats = [storage.read_json(output.stats_uri(i)) for i in range(len(shards))]
    stats = {k: sum(s[k] for s in shard_stats) for k in ("texts", "tokens", "truncated")}
    if stats["truncated"]:
        logger.warning("teacher_embed: %d of %d texts were longer than the teacher's limit "
                       "and were truncated", stats["truncated"], stats["texts"])
    return output.finish(
        rows_in=inputs_manifest["rows_out"], num_shards=len(shards),
        seconds=time.perf_counter() - start, config_hash=config.config_hash,
        extra={"table": "teacher", "dim": dim, "teacher": teacher_kwargs(config.teacher),
               "texts_embedded": stats["texts"], "tokens_embedded": stats["tokens"],
               "texts_truncated": stats["truncated"], "shards_skipped": len(done_shards),
               "nodes": node_counts(results),
               "inputs": {"text_groups": provenance.fingerprint(input_folder)},
               "identity": base.identity(config, NAME), "config": config.to_dict()})


def _dim_of(folder: str) -> int:
    """Teacher dimension as written in the first output shard."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(storage.join(folder, outputs.shard_name(0)))
    schema = pq.read_schema(path, filesystem=fs)
    return schema.field("teacher_emb").type.value_type.list_size


def summarize(manifest: dict[str, Any], folder: str) -> str:
    return (f"teacher_embed -> {folder}  ({manifest['seconds']:.1f} s)\n"
            f"groups in {manifest['rows_in']}, out {manifest['rows_out']}, rejected "
            f"{manifest['rows_rejected']} {manifest['rejects_by_reason'] or ''}; "
            f"{manifest['texts_embedded']} texts embedded (dim {manifest['dim']}), "
            f"{manifest['texts_truncated']} truncated")
