"""Embed the distinct eval items of every model with one Ray Data actor pool of Embedders.

Items are cut into consecutive tasks of ``eval.items_per_task``, model after model; each
task is one Ray Data call on an actor that holds one Embedder at a time (one GPU per
actor when the cluster has GPUs) and loads the next model when a task of another model
arrives, so every model is loaded about once per actor. A task writes
``<evaluate>/embeddings/<label>/part-<i>.parquet``: one row per item (``item`` index,
``error`` reason or '', ``detail``, float32 ``emb``). A rerun skips the shards already
written for the same items.

An item whose image is missing or does not decode, or whose vector is not finite, gets
an error (``missing_image``, ``corrupt_image``, ``nan_embedding``) and a zero vector;
the rows that need it are rejected at scoring time, never silently scored.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import outputs, storage
from pipeline.config import Config
from pipeline.data.images import ImageDecodeError, PackOptions, pack_image
from pipeline.data.schemas import vector_array, vectors_numpy
from pipeline.eval.sets import Item
from pipeline.outputs import ShardedOutput
from pipeline.ray_utils import actor_pool_resources, run_shard_tasks

logger = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"


@dataclass(frozen=True)
class ModelRef:
    """A model to evaluate: where it is and (optionally) its backbone family."""

    path: str
    family: str | None = None


@dataclass
class Embedded:
    """Every item's vector for one model, in item order."""

    emb: np.ndarray            # (N, D) float32, unit rows (zeros where error != '')
    error: np.ndarray          # (N,) object: '' or a reject reason
    detail: np.ndarray         # (N,) object: what went wrong


@dataclass(frozen=True)
class EvalEmbedTask:
    index: int                                  # shard index in the model's folder
    label: str
    model: ModelRef
    first_item: int
    items: list[Item]
    image_rows: dict[str, tuple[str, int]]      # eval_images key -> (shard URI, row)


def item_vectors_schema(dim: int) -> pa.Schema:
    """One eval item's vector (or why there is none), in item order."""
    return pa.schema([
        pa.field("item", pa.int64(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        pa.field("emb", pa.list_(pa.float32(), dim), nullable=False),
    ])


# ---------------------------------------------------------------------------------------
# Inside a Ray Data actor


def load_images(task: EvalEmbedTask,
                options: PackOptions) -> tuple[list[Any], list[tuple[str, str]]]:
    """Per item: a PIL image or None, and ('', '') or (reason, detail)."""
    from pipeline.models import to_pil

    shards: dict[str, pa.ChunkedArray] = {}
    images: list[Any] = []
    errors: list[tuple[str, str]] = []
    for item in task.items:
        image, error = None, ("", "")
        if item.image is not None:
            kind, ref = item.image
            try:
                if kind == "key":
                    if ref not in task.image_rows:
                        raise FileNotFoundError(f"eval_images has no key {ref}")
                    uri, row = task.image_rows[ref]
                    if uri not in shards:
                        shards[uri] = storage.read_table(uri, columns=["image"]).column("image")
                    data = shards[uri][row].as_py()
                else:
                    data = pack_image(storage.read_bytes(ref), options).data
                image = to_pil(data)
            except FileNotFoundError as err:
                error = ("missing_image", f"image not found: {ref} ({err})")
            except (ImageDecodeError, OSError, ValueError, TypeError) as err:
                error = (getattr(err, "reason", "corrupt_image"), f"{ref}: {err}")
        images.append(image)
        errors.append(error)
    return images, errors


class EvalEmbedWorker:
    """Ray Data actor: one Embedder at a time; embeds and writes one task per call."""

    def __init__(self, trust_remote_code: bool, batch_size: int, options: PackOptions,
                 folder: str, owner_hash: str, torch_threads: int) -> None:
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, torch_threads))
        self.trust_remote_code, self.batch_size = trust_remote_code, batch_size
        self.options, self.folder, self.owner_hash = options, folder, owner_hash
        self.model: ModelRef | None = None
        self.embedder: Any = None

    def _load(self, model: ModelRef) -> Any:
        if model != self.model:
            import torch

            from pipeline.models import Embedder

            self.embedder = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.embedder = Embedder.from_pretrained(
                model.path, family=model.family, trust_remote_code=self.trust_remote_code)
            self.embedder.eval()
            self.model = model
        return self.embedder

    def __call__(self, task: EvalEmbedTask) -> dict[str, Any]:
        start = time.perf_counter()
        embedder = self._load(task.model)
        images, errors = load_images(task, self.options)
        emb = np.zeros((len(task.items), embedder.embedding_dim()), dtype=np.float32)  # (n, D)
        by_mode: dict[str, list[int]] = {}
        for i, item in enumerate(task.items):
            if not errors[i][0]:
                by_mode.setdefault(item.mode, []).append(i)
        for mode, rows in by_mode.items():
            emb[rows] = embedder.encode(texts=[task.items[i].text for i in rows],
                                        images=[images[i] for i in rows],
                                        batch_size=self.batch_size, mode=mode).numpy()
        for i in np.flatnonzero(~np.isfinite(emb).all(axis=1)):
            errors[i] = ("nan_embedding", f"model {task.label} produced a NaN/inf vector")
            emb[i] = 0.0
        dim = emb.shape[1]
        table = pa.Table.from_pydict({
            "item": pa.array(np.arange(task.first_item, task.first_item + len(task.items))),
            "error": [e for e, _ in errors], "detail": [d for _, d in errors],
            "emb": vector_array(emb, pa.float32()),
        }, schema=item_vectors_schema(dim))
        output = ShardedOutput(label_folder(self.folder, task.label), self.owner_hash,
                               table.schema)
        output.write_shard(task.index, table, [])
        return {"label": task.label, "shard": task.index, "items": len(task.items),
                "errors": sum(1 for e, _ in errors if e), "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------
# On the driver


def label_folder(folder: str, label: str) -> str:
    return storage.join(folder, EMBEDDINGS_DIR, label)


def _shard_done(output: ShardedOutput, index: int, first: int, count: int,
                done: set[int]) -> bool:
    """A written shard counts only if it holds exactly the items this task would embed."""
    if index not in done:
        return False
    items = storage.read_table(output.shard_uri(index), columns=["item"]).column("item")
    return len(items) == count and (count == 0 or (items[0].as_py() == first
                                                   and items[-1].as_py() == first + count - 1))


def plan_tasks(models: dict[str, ModelRef], items: list[Item],
               image_rows: dict[str, tuple[str, int]], folder: str, owner_hash: str,
               items_per_task: int) -> tuple[list[EvalEmbedTask], int]:
    """Tasks still to run (model after model) and the number of shards already done."""
    ranges = [(s, min(s + items_per_task, len(items))) for s in range(0, len(items),
                                                                    items_per_task)]
    tasks, skipped = [], 0
    for label, model in models.items():
        output = ShardedOutput(label_folder(folder, label), owner_hash, pa.schema([]))
        output.claim()
        done = output.done_shards(len(ranges))
        for index, (start, stop) in enumerate(ranges):
            if _shard_done(output, index, start, stop - start, done):
                skipped += 1
                continue
            chunk = items[start:stop]
            keys = {it.image[1] for it in chunk if it.image is not None and it.image[0] == "key"}
            tasks.append(EvalEmbedTask(index, label, model, start, chunk,
                                   {k: image_rows[k] for k in keys if k in image_rows}))
    return tasks, skipped


def load_embedded(folder: str, num_items: int) -> Embedded:
    """Read a model's embedding shards back in item order; every item exactly once."""
    tables = [storage.read_table(uri) for uri in outputs.shard_uris(folder)]
    table = pa.concat_tables(tables) if tables else None
    items = np.asarray(table.column("item").to_pylist() if table else [], dtype=np.int64)
    if len(items) != num_items or not np.array_equal(np.sort(items), np.arange(num_items)):
        raise RuntimeError(f"{folder}: embedding shards hold {len(items)} items, expected "
                           f"each of {num_items} exactly once; delete the folder and rerun")
    dim = table.schema.field("emb").type.list_size
    emb = np.empty((num_items, dim), dtype=np.float32)          # (N, D)
    emb[items] = vectors_numpy(table.column("emb"))
    error = np.empty(num_items, dtype=object)
    detail = np.empty(num_items, dtype=object)
    error[items] = table.column("error").to_pylist()
    detail[items] = table.column("detail").to_pylist()
    return Embedded(emb, error, detail)


def embed_items(config: Config, models: dict[str, ModelRef], items: list[Item],
                image_rows: dict[str, tuple[str, int]], folder: str, owner_hash: str
                ) -> dict[str, Embedded]:
    """Embed ``items`` with every model; return each model's vectors in item order."""
    from pipeline.data.prepare import pack_options

    tasks, skipped = plan_tasks(models, items, image_rows, folder, owner_hash,
                                config.eval.items_per_task)
    actors, cpus, gpus = actor_pool_resources(config.eval, "eval", config.ray.resource_wait_s)
    pool = max(1, min(actors, len(tasks)))
    logger.info("evaluate: embedding %d distinct items x %d model(s): %d tasks (%d done "
                "already) on %d actor(s)", len(items), len(models), len(tasks), skipped, pool)
    start = time.perf_counter()
    results = run_shard_tasks(tasks, EvalEmbedWorker, num_cpus=cpus, num_gpus=gpus,
                              pool_size=pool, worker_kwargs={
                                  "trust_remote_code": config.model.trust_remote_code,
                                  "batch_size": config.eval.batch_size,
                                  "options": pack_options(config), "folder": folder,
                                  "owner_hash": owner_hash, "torch_threads": int(cpus)},
                              actors_start_s=config.ray.resource_wait_s)
    errors = sum(int(r["errors"]) for r in results)
    if errors:
        logger.warning("evaluate: %d item(s) could not be embedded (rows needing them are "
                       "rejected)", errors)
    logger.info("evaluate: embedded in %.1f s", time.perf_counter() - start)
    return {label: load_embedded(label_folder(folder, label), len(items)) for label in models}
