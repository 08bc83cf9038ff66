"""The teacher step: embed every text of the ``text_groups`` shards with the teacher.

A pool of Ray Data actors each loads the teacher once; each call embeds one input
shard and writes the output shard of the same index (``teacher`` table: the group's
texts and one unit-norm float16 vector per text) plus its rejects. Within a call the
texts of the whole shard go to ``SentenceTransformer.encode`` at once, which sorts them
by length before cutting batches of ``teacher.batch_size``: the sort window is the shard
(``data.rows_per_shard`` groups), so batches hold texts of similar length and padding
stays small. One GPU per actor when the cluster has GPUs. Output under
``<run_root>/teacher_embed``; a rerun skips finished shards.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import outputs, provenance, storage
from pipeline.config import Config, TeacherConfig
from pipeline.data.schemas import teacher_schema, vector_array
from pipeline.outputs import ShardedOutput, complete_input
from pipeline.ray_utils import actor_pool_resources, run_shard_tasks

logger = logging.getLogger(__name__)

STEP = "teacher_embed"
INPUT_TABLE = "prepare_data/text_groups"


@dataclass(frozen=True)
class TeacherTask:
    index: int
    input_uri: str


def teacher_kwargs(teacher: TeacherConfig) -> dict[str, Any]:
    """Constructor arguments of ``pipeline.models.Teacher`` from the config."""
    return {"source": teacher.model, "prefix": teacher.instruction_prefix,
            "max_seq_length": teacher.max_seq_length or None,
            "trust_remote_code": teacher.trust_remote_code}


def group_table(ids: list[str], texts: list[list[str]], emb: np.ndarray,
                dim: int) -> pa.Table:
    """``teacher`` rows from groups and their flat (sum of group sizes, D) vectors."""
    sizes = np.array([len(t) for t in texts], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    vectors = vector_array(emb.reshape(-1, dim))                                # (N, D)
    per_group = pa.ListArray.from_arrays(pa.array(offsets), vectors)
    return pa.Table.from_arrays([pa.array(ids, pa.string()),
                                 pa.array(texts, pa.list_(pa.string())), per_group],
                                schema=teacher_schema(dim))


class TeacherShardWorker:
    """Ray Data actor: holds one Teacher, embeds one shard per call."""

    def __init__(self, teacher: dict[str, Any], batch_size: int, folder: str,
                 config_hash: str, torch_threads: int) -> None:
        import torch

        from pipeline.models.teacher import Teacher

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, torch_threads))
        self.teacher = Teacher(**teacher)
        self.batch_size = batch_size
        self.output = ShardedOutput(folder, config_hash, teacher_schema(self.teacher.dim))

    def __call__(self, task: TeacherTask) -> dict[str, Any]:
        start, started_at = time.perf_counter(), time.time()
        rows = storage.read_table(task.input_uri, columns=["id", "texts"]).to_pylist()
        sizes = np.array([len(r["texts"]) for r in rows], dtype=np.int64)  # (G,)
        flat = [t for row in rows for t in row["texts"]]
        lengths = self.teacher.token_lengths(flat)
        emb = self.teacher.encode(flat, batch_size=self.batch_size)  # (N, D) float32
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
                 "seconds": round(time.perf_counter() - start, 3),
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


def teacher_embed(config: Config) -> dict[str, Any]:
    """Run the teacher step; return its manifest (reused as is when already complete)."""
    start = time.perf_counter()
    folder = config.step_dir(STEP)
    if outputs.is_complete(folder):
        logger.info("teacher_embed: complete already at %s", folder)
        return outputs.require_complete(folder)
    input_folder = storage.join(config.run_root, *INPUT_TABLE.split("/"))
    inputs, shards = complete_input(input_folder)
    actors, cpus, gpus = actor_pool_resources(config.teacher.num_actors,
                                              config.teacher.cpus_per_actor)
    kwargs = {"teacher": teacher_kwargs(config.teacher), "batch_size": config.teacher.batch_size,
              "folder": folder, "config_hash": config.config_hash,
              "torch_threads": int(cpus)}
    # The output schema needs the teacher's dimension: the first actor call tells it, so
    # the folder is claimed by a throwaway ShardedOutput that does not need the schema.
    ShardedOutput(folder, config.config_hash, pa.schema([])).claim()
    done = outputs.completed_shards(folder) & outputs.completed_shards(
        storage.join(folder, outputs.REJECTS_DIR))
    tasks = [TeacherTask(i, uri) for i, uri in enumerate(shards) if i not in done]
    logger.info("teacher_embed: %d shards (%d done already) with %d actor(s), %.1f CPU / "
                "%.0f GPU each -> %s", len(shards), len(done), min(actors, len(tasks) or 1),
                cpus, gpus, folder)
    results = run_shard_tasks(tasks, TeacherShardWorker, num_cpus=cpus, num_gpus=gpus,
                              pool_size=min(actors, len(tasks) or 1), worker_kwargs=kwargs)
    logger.info("teacher_embed: %d shards embedded in this run", len(results))
    dim = _dim_of(folder)
    output = ShardedOutput(folder, config.config_hash, teacher_schema(dim))
    shard_stats = [storage.read_json(output.stats_uri(i)) for i in range(len(shards))]
    stats = {k: sum(s[k] for s in shard_stats) for k in ("texts", "tokens", "truncated")}
    if stats["truncated"]:
        logger.warning("teacher_embed: %d of %d texts were longer than the teacher's limit "
                       "and were truncated", stats["truncated"], stats["texts"])
    manifest = output.finish(
        rows_in=inputs["rows_out"], num_shards=len(shards), seconds=time.perf_counter() - start,
        extra={"table": "teacher", "dim": dim, "teacher": teacher_kwargs(config.teacher),
               "texts_embedded": stats["texts"], "tokens_embedded": stats["tokens"],
               "texts_truncated": stats["truncated"], "shards_skipped": len(done),
               "inputs": {"text_groups": provenance.fingerprint(input_folder)},
               "config": config.to_dict()})
    return manifest


def _dim_of(folder: str) -> int:
    """Teacher dimension as written in the first output shard."""
    fs, path = storage.resolve(storage.join(folder, outputs.shard_name(0)))
    schema = pq.read_schema(path, filesystem=fs)
    return schema.field("teacher_emb").type.value_type.list_size


def format_summary(manifest: dict[str, Any], folder: str) -> str:
    return (f"teacher_embed -> {folder}  ({manifest['seconds']:.1f} s)\n"
            f"groups in {manifest['rows_in']}, out {manifest['rows_out']}, rejected "
            f"{manifest['rows_rejected']} {manifest['rejects_by_reason'] or ''}; "
            f"{manifest['texts_embedded']} texts embedded (dim {manifest['dim']}), "
            f"{manifest['texts_truncated']} truncated")
