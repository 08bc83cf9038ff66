"""Step 4, mine_negatives: embed the stage-2 pairs with the miner, search, filter, write
``mined``. Runs standalone as an offline job.

Two phases over the ``prepare_data/pairs`` shards, each one Ray Data task per shard:

1. **embed** (a pool of miner actors, :class:`MinerShardWorker`, one GPU each when the
   cluster has GPUs): for pairs shard i, the queries of its rows and the distinct targets
   first seen in it, written to ``embeddings/part-i.parquet`` (kind, dataset, key, row,
   float16 vector), sorted by (kind, dataset) in row groups of
   :data:`EMBEDDINGS_ROW_GROUP_ROWS` rows, so that a reader of one dataset's targets skips
   the rest. A row whose positive is empty, whose image does not decode, or whose vector is
   not finite is refused here, with its reason.
2. **search** (stateless tasks, :func:`search_shard`, spread over the cluster): for pairs
   shard i, exact blockwise top-``search_k`` of its queries against the targets of the same
   dataset (``mining.scope``), the false-negative filters and the selection of
   :mod:`pipeline.mining`, then the stage-2 training rows (``mined`` table, shard i) with
   the negatives by reference: their keys, scores and the pairs rows holding their payloads
   (:mod:`pipeline.data.mined`; ``read_with_negatives`` shows their texts and images).

Target vectors never reach the driver: it reads only the small columns of the embeddings
shards (:func:`pipeline.data.mined.load_target_index`) and hands each search task the index
of its groups' targets (keys, pairs rows, where each vector is). The task streams those
vectors from the shards one block at a time (``mining.block_size`` rows; float16 -> unit
float32) into an exact running top-k, for every search pass, so its memory is one block plus
its queries' results, whatever the number of targets (also with ``scope=global``).
``mining.index=ivf`` is the exception: IVF needs the whole matrix of the task's groups, and
the recall estimate the whole matrix, each read inside its own task. Each task reports its
peak RSS; the manifest keeps the largest (``search_task_peak_rss_mb``).

Outputs under ``<run_root>/mine_negatives``: ``embeddings/``, ``part-*.parquet`` (mined),
``_rejects/``, ``scores.png`` (histograms) and ``_manifest.json`` with per-dataset
statistics.
"""
from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline import outputs, provenance, storage
from pipeline.config import Config, ConfigError, MiningConfig
from pipeline.data import mined
from pipeline.data.schemas import MINED, embeddings_schema, vector_array
from pipeline.steps import base

if TYPE_CHECKING:
    from pipeline.mining import MinedNegatives

logger = logging.getLogger(__name__)

NAME = "mine_negatives"
READS = ("mining",)
USES_RAY = True
INPUT_TABLE = "pairs"  # of prepare_data
TABLE_VERSION = 2  # mined negatives by reference (pairs shard + row), not their bytes
PAIR_COLUMNS = ["id", "dataset", "qry_text", "pos_text", "pos_key", "neg_text", "source"]  # what a search task reads
EMBEDDINGS_DIR = "embeddings"
EMBEDDINGS_ROW_GROUP_ROWS = 2048  # a search task reads only the row groups of its targets


def inputs(config: Config) -> tuple[str, ...]:
    return ("prepare_data", "stage1") if config.mining.miner == "stage1" else ("prepare_data",)


def check(config: Config) -> None:
    """Settings the search cannot run with (FAISS GPU's k limit)."""
    from pipeline.mining import FAISS_GPU_MAX_K

    mining = config.mining
    if mining.backend == "faiss_gpu" and mining.search_k > FAISS_GPU_MAX_K:
        raise ConfigError(f"mining.search_k={mining.search_k} exceeds FAISS GPU's limit of "
                          f"{FAISS_GPU_MAX_K}; lower it or use mining.backend=torch")


def check_sources(config: Config) -> None:
    """A miner folder other than stage 1's exists."""
    if config.mining.miner != "stage1" and not storage.exists(config.mining.miner):
        raise FileNotFoundError(f"mining.miner: {config.mining.miner} does not exist")


def miner_path(config: Config) -> str:
    if config.mining.miner == "stage1":
        return storage.join(base.input_dir(config, NAME, "stage1"), "model")
    return config.mining.miner


# -- phase 1: embed -----------------------------------------------------------------------------
@dataclass(frozen=True)
class MinerEmbedTask:
    index: int
    pairs_uri: str
    first_targets: list[int]   # rows of this shard whose target is first seen here


class MinerShardWorker:
    """Ray Data actor: holds the miner, embeds one pairs shard per call."""

    def __init__(self, path: str, trust_remote_code: bool, prompt_mode: str,
                 batch_size: int, folder: str, owner: str, torch_threads: int) -> None:
        import torch

        from pipeline.models import Embedder

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, torch_threads))
        self.embedder = Embedder.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.embedder.eval()
        self.prompt_mode, self.batch_size = prompt_mode, batch_size
        self.output = outputs.ShardedOutput(storage.join(folder, EMBEDDINGS_DIR), owner,
                                            embeddings_schema(self.embedder.embedding_dim()))

    def __call__(self, task: MinerEmbedTask) -> dict[str, Any]:
        start = time.perf_counter()
        rows = storage.read_table(task.pairs_uri).to_pylist()
        rejects = {i: why for i, row in enumerate(rows) if (why := mined.check_pair(row))}
        items = [("query", i) for i in range(len(rows)) if i not in rejects]
        items += [("target", i) for i in task.first_targets if i not in rejects]
        texts = [rows[i]["qry_text" if k == "query" else "pos_text"] for k, i in items]
        images = [rows[i]["qry_image" if k == "query" else "pos_image"] for k, i in items]
        emb = self.embedder.encode(texts=texts, images=images, batch_size=self.batch_size,
                                   mode=self.prompt_mode).numpy()  # (M, D)
        for (kind, i), ok in zip(items, np.isfinite(emb).all(axis=1), strict=True):
            if not ok:
                rejects.setdefault(i, ("nan_embedding", f"{kind}_emb",
                                       f"the miner produced a NaN/inf {kind} vector"))
        keep = [j for j, (_, i) in enumerate(items) if i not in rejects]
        table = embeddings_table(rows, [items[j] for j in keep], emb[keep], self.output.schema)
        reject_rows = [mined.reject_row(rows[i], task.pairs_uri, i, *why) for i, why in
                       sorted(rejects.items())]
        self.output.write_shard(task.index, table, reject_rows,
                                row_group_size=EMBEDDINGS_ROW_GROUP_ROWS)
        return {"shard": task.index, "embedded": len(keep), "rejected": len(reject_rows),
                "seconds": time.perf_counter() - start}


def embeddings_table(rows: list[dict[str, Any]], items: list[tuple[str, int]],
                     emb: np.ndarray, schema: pa.Schema) -> pa.Table:
    """The embeddings shard of one pairs shard: ``items`` ((kind, row in ``rows``)) with their
    vectors ``emb`` (M, D), sorted by (kind, dataset), in pairs row order within."""
    order = sorted(range(len(items)), key=lambda j: (items[j][0], rows[items[j][1]]["dataset"]))
    ordered = [items[j] for j in order]
    dim = schema.field("emb").type.list_size
    return pa.Table.from_pydict({
        "kind": [k for k, _ in ordered],
        "dataset": [rows[i]["dataset"] for _, i in ordered],
        "key": [rows[i]["id"] if k == "query" else rows[i]["pos_key"] for k, i in ordered],
        "row": pa.array([i for _, i in ordered], pa.int32()),
        "emb": vector_array(emb.reshape(len(items), dim)[order]),  # (M, D)
    }, schema=schema)


# -- phase 2: search, filter, write --------------------------------------------------------------
@dataclass(frozen=True)
class SearchTask:
    index: int
    pairs_uri: str
    embeddings_folder: str     # this shard's queries and the targets' vectors are there
    embedding_rejects_uri: str
    targets: Any               # ObjectRef of the mined.TargetIndex of this shard's groups
    folder: str
    owner: str
    mining: MiningConfig


def search_shard(task: SearchTask) -> dict[str, Any]:
    """Mine shard ``task.index``: its queries against the targets; write mined rows."""
    import ray

    return mine_shard(task, ray.get(task.targets))


def mine_shard(task: SearchTask, targets: mined.TargetIndex) -> dict[str, Any]:
    """:func:`search_shard` once its index is at hand (no Ray): read the shard's queries,
    search them against the streamed target vectors, write the mined rows and statistics."""
    start = time.perf_counter()
    mining = task.mining
    pairs = storage.read_table(task.pairs_uri, columns=PAIR_COLUMNS).to_pylist()
    q_rows, q_emb = mined.read_queries(storage.join(task.embeddings_folder,
                                                    outputs.shard_name(task.index)))
    datasets = [pairs[r]["dataset"] for r in q_rows]
    pos_ids = targets.ids_of(datasets, [pairs[r]["pos_key"] for r in q_rows])  # (Q,)
    # Rows refused while embedding, then rows whose positive's target was refused.
    rejects = storage.read_table(task.embedding_rejects_uri).to_pylist()
    rejects += [mined.reject_row(pairs[r], task.pairs_uri, int(r), "missing_positive",
                                 "pos_key", "the positive's target was refused in the "
                                 "embedding phase")
                for r, p in zip(q_rows, pos_ids, strict=True) if p < 0]
    ok = pos_ids >= 0
    q_rows, q_emb, pos_ids = q_rows[ok], q_emb[ok], pos_ids[ok]
    q_groups = np.asarray([pairs[r]["dataset"] if mining.scope == "dataset" else "all"
                           for r in q_rows], dtype=object)
    k = min(mining.search_k, max(1, len(targets)))
    result = search_targets(task, targets, q_emb, q_groups, pos_ids, k)
    selection, pos_scores = result.selection, result.pos_scores
    rows = [mined.mined_row(pairs[r], (task.index, r), selection, j, pos_scores[j], targets)
            for j, r in enumerate(q_rows)]
    stats = mined.shard_stats(datasets=[pairs[r]["dataset"] for r in q_rows],
                              selection=selection, pos_scores=pos_scores,
                              searched_again=result.searched_k > k)
    output = outputs.ShardedOutput(task.folder, task.owner, MINED)
    storage.write_json(output.stats_uri(task.index), stats)
    output.write_shard(task.index, rows, rejects)
    return {"shard": task.index, "rows": len(rows), "seconds": time.perf_counter() - start,
            "search": json.dumps(result.search_stats, default=str),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def search_targets(task: SearchTask, targets: mined.TargetIndex, q_emb: np.ndarray,
                   q_groups: np.ndarray, pos_ids: np.ndarray, k: int) -> MinedNegatives:
    """``mine_within_groups`` of the queries against ``targets``: streamed from the
    embeddings shards block by block (flat), or, for IVF, over the groups' whole matrix."""
    from pipeline.mining import mine_within_groups

    codes = targets.key_codes()  # (C,)
    kwargs = mining_kwargs(task.mining, k, task.index)
    if task.mining.index == "ivf":
        matrix = mined.read_target_matrix(targets, task.embeddings_folder, q_emb.shape[1])
        pos_scores = (q_emb * matrix[pos_ids]).sum(axis=1)  # (Q,)
        return mine_within_groups(q_emb, q_groups, matrix, targets.groups, pos_scores, pos_ids,
                                  codes, codes[pos_ids], **kwargs)
    source = mined.target_blocks(targets, task.embeddings_folder, task.mining.block_size)
    return mine_within_groups(q_emb, q_groups, None, targets.groups, None, pos_ids, codes,
                              codes[pos_ids], candidates=source, **kwargs)


def mining_kwargs(mining: MiningConfig, k: int, shard: int) -> dict[str, Any]:
    """``search_k``, ``search_kwargs`` and ``select_kwargs`` of ``mine_within_groups``."""
    search = {"backend": mining.backend, "block_size": mining.block_size,
              "query_block_size": mining.query_block_size, "build": mining.index,
              "nlist": mining.ivf_nlist if mining.index == "ivf" else None,
              "nprobe": mining.ivf_nprobe, "num_threads": max(1, int(mining.cpus_per_actor))}
    select = {"num_negatives": mining.num_negatives, "fn_margin": mining.fn_margin,
              "fn_ratio": mining.fn_ratio, "max_score": mining.max_score,
              "unique_negatives": mining.unique_negatives, "selection": mining.selection,
              "range_min": mining.range_min, "range_max": mining.range_max or None,
              "seed": mining.seed + shard}
    return {"search_k": k, "search_kwargs": search, "select_kwargs": select}


# -- the step -----------------------------------------------------------------------------------
def run(config: Config) -> dict[str, Any]:
    """Mine every shard not done yet (or reuse the finished step); returns the manifest."""
    from pipeline.ray_utils import actor_pool_resources, node_counts, run_shard_tasks

    start = time.perf_counter()
    folder = config.step_dir(NAME)
    owner = base.step_hash(config, NAME)
    check(config)
    if (done := base.finished(config, NAME)) is not None:
        return done
    input_folder = storage.join(base.input_dir(config, NAME, "prepare_data"), INPUT_TABLE)
    base.input_manifest(config, NAME, "prepare_data", input_folder)
    inputs_manifest, shards = outputs.complete_input(input_folder)
    if config.mining.miner == "stage1":
        base.input_manifest(config, NAME, "stage1")
    path = miner_path(config)
    if not storage.exists(path):
        raise FileNotFoundError(f"miner model not found: {path} (mining.miner="
                                f"{config.mining.miner!r}; run stage 1 first or set a folder)")
    output = outputs.ShardedOutput(folder, owner, MINED)
    output.claim(base.job_record(config, NAME))
    embed_folder = storage.join(folder, EMBEDDINGS_DIR)
    outputs.ShardedOutput(embed_folder, owner, pa.schema([])).claim(base.job_record(config, NAME))
    done_shards = output_done(embed_folder, len(shards))
    firsts = mined.first_target_rows(shards)
    embed_tasks = [MinerEmbedTask(i, uri, firsts[i]) for i, uri in enumerate(shards)
                   if i not in done_shards]
    actors, cpus, gpus = actor_pool_resources(config.mining, "mining",
                                              config.ray.resource_wait_s)
    logger.info("mine_negatives: embedding %d shards (%d done) with %d actor(s) of %s",
                len(embed_tasks), len(done_shards), min(actors, len(embed_tasks) or 1), path)
    embedded_on = run_shard_tasks(
        embed_tasks, MinerShardWorker, num_cpus=cpus, num_gpus=gpus,
        pool_size=min(actors, len(embed_tasks) or 1), worker_kwargs={
            "path": path, "trust_remote_code": config.mining.miner_trust_remote_code,
            "prompt_mode": config.mining.prompt_mode, "batch_size": config.mining.embed_batch_size,
            "folder": folder, "owner": owner, "torch_threads": int(cpus)},
        actors_start_s=config.ray.resource_wait_s)
    targets, query_datasets = mined.load_target_index(embed_folder, config.mining.scope)
    logger.info("mine_negatives: %d distinct targets (the driver holds their index only)",
                len(targets))
    done_shards = output_done(folder, len(shards))
    results = search_all(config, shards, done_shards, targets, query_datasets, owner,
                         cpus=cpus, gpus=gpus)
    logger.info("mine_negatives: %d shards searched in this run", len(results))
    stats = mined.merge_stats([storage.read_json(output.stats_uri(i))
                               for i in range(len(shards))])
    mined.histogram_png(stats, storage.join(folder, "scores.png"))
    recall = (recall_in_task(config.mining, targets, embed_folder, cpus=cpus, gpus=gpus)
              if config.mining.index == "ivf" else None)
    return output.finish(
        rows_in=inputs_manifest["rows_out"], num_shards=len(shards),
        seconds=time.perf_counter() - start, config_hash=config.config_hash,
        extra={"table": "mined", "pairs_table": storage.absolute_uri(input_folder),
               "miner": path, "targets": len(targets),
               "shards_skipped": len(done_shards), "per_dataset": mined.per_dataset(stats),
               "nodes": {"embed": node_counts(embedded_on), "search": node_counts(results)},
               "totals": mined.totals(stats), "ivf_recall": recall,
               "search_task_peak_rss_mb": max((float(r["peak_rss_mb"]) for r in results),
                                              default=None),
               "inputs": {"pairs": provenance.fingerprint(input_folder)},
               "identity": base.identity(config, NAME), "config": config.to_dict()})


def output_done(folder: str, num_shards: int) -> set[int]:
    """Shards of ``folder`` whose data and rejects files are complete."""
    return outputs.ShardedOutput(folder, "", MINED).done_shards(num_shards)


def search_all(config: Config, shards: list[str], done: set[int], targets: mined.TargetIndex,
               query_datasets: dict[int, list[str]], owner: str, *, cpus: float,
               gpus: float) -> list[dict[str, Any]]:
    """One search task per shard not done yet; each gets the index of its groups' targets
    (one object per distinct set of groups), never their vectors."""
    import ray

    from pipeline.ray_utils import run_shard_tasks

    folder = config.step_dir(NAME)
    embed_folder = storage.join(folder, EMBEDDINGS_DIR)
    embedded = outputs.ShardedOutput(embed_folder, owner, pa.schema([]))
    refs: dict[tuple[str, ...], Any] = {}
    tasks = []
    for i, uri in enumerate(shards):
        if i in done:
            continue
        groups = (tuple(query_datasets.get(i, [])) if config.mining.scope == "dataset"
                  else ("all",))
        if groups not in refs:
            refs[groups] = ray.put(targets.select(list(groups)))
        tasks.append(SearchTask(i, uri, embed_folder, embedded.reject_uri(i), refs[groups],
                                folder, owner, config.mining))
    # Search on the GPU when the cluster has one and the backend can use it.
    search_gpus = gpus if config.mining.backend != "faiss" else 0.0
    return run_shard_tasks(tasks, search_shard, num_cpus=cpus, num_gpus=search_gpus)


@dataclass(frozen=True)
class RecallTask:
    targets: mined.TargetIndex   # every target (index only)
    embeddings_folder: str
    mining: MiningConfig


def recall_shard(task: RecallTask) -> dict[str, Any]:
    """Ray task: IVF recall over the whole target matrix, read here (never on the driver)."""
    matrix = mined.read_target_matrix(task.targets, task.embeddings_folder)  # (C, D)
    return {"ivf_recall": ivf_recall(task.mining, matrix),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def recall_in_task(mining: MiningConfig, targets: mined.TargetIndex, embed_folder: str, *,
                   cpus: float, gpus: float) -> float:
    from pipeline.ray_utils import run_shard_tasks

    gpus = gpus if mining.backend != "faiss" else 0.0
    [row] = run_shard_tasks([RecallTask(targets, embed_folder, mining)], recall_shard,
                            num_cpus=cpus, num_gpus=gpus)
    return float(row["ivf_recall"])


def ivf_recall(mining: MiningConfig, matrix: np.ndarray) -> float:
    """Recall@k of IVF vs exact search, with a seeded sample of ``recall_sample`` targets
    (rows of ``matrix`` (C, D)) as queries."""
    from pipeline.mining import measure_recall, search_topk

    k = min(mining.search_k, matrix.shape[0])
    rng = np.random.default_rng(mining.seed)
    sample = np.sort(rng.choice(matrix.shape[0], size=min(mining.recall_sample,
                                                          matrix.shape[0]), replace=False))
    approx = search_topk(matrix[sample], matrix, k, backend=mining.backend, build="ivf",
                         nlist=mining.ivf_nlist, nprobe=mining.ivf_nprobe)  # (S, k)
    exact = search_topk(matrix[sample], matrix, k, backend=mining.backend)  # (S, k)
    recall = measure_recall(exact.ids, approx.ids)
    logger.info("IVF recall@%d on %d sampled targets: %.4f", k, sample.size, recall)
    return recall


def summarize(manifest: dict[str, Any], folder: str) -> str:
    lines = [f"mine_negatives -> {folder}  ({manifest['seconds']:.1f} s, "
             f"{manifest['targets']} distinct targets)",
             f"{'dataset':<14} {'queries':>7} {'cands':>6} {'self/dup':>8} {'margin':>7} "
             f"{'ratio':>6} {'max':>5} {'kept':>6} {'short':>6} {'deeper':>6}"]
    for name, s in manifest["per_dataset"].items():
        lines.append(f"{name:<14} {s['queries']:>7} {s['n_candidates']:>6} "
                     f"{s['dropped_self'] + s['dropped_duplicate'] + s['dropped_repeat']:>8} "
                     f"{s['dropped_margin']:>7} {s['dropped_ratio']:>6} "
                     f"{s['dropped_max_score']:>5} {s['n_selected']:>6} {s['short']:>6} "
                     f"{s.get('searched_again', 0):>6}")
    lines.append(f"pairs in {manifest['rows_in']}, mined {manifest['rows_out']}, rejected "
                 f"{manifest['rows_rejected']} {manifest['rejects_by_reason'] or ''} "
                 f"(rows in {folder}/_rejects)")
    return "\n".join(lines)
