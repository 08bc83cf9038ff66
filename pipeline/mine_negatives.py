"""The mining step: embed the stage-2 pairs with the miner, search, filter, write ``mined``.

Two phases over the ``prepare_data/pairs`` shards, each one Ray Data task per shard:

1. **embed** (a pool of miner actors, one GPU each when the cluster has GPUs): for pairs
   shard i, the queries of its rows and the distinct targets first seen in it, written
   to ``embeddings/part-i.parquet`` (kind, dataset, key, row, float16 vector). A row
   whose positive is empty, whose image does not decode, or whose vector is not finite
   is refused here, with its reason.
2. **search** (stateless tasks, spread over the cluster): for pairs shard i, exact
   blockwise top-``search_k`` of its queries against the targets of the same dataset
   (``mining.scope``), the false-negative filters and the selection of
   ``pipeline.mining``, then the stage-2 training rows (``mined`` table, shard i) with
   the negatives' texts and packed images.

The target matrix travels once through the object store. Outputs under
``<run_root>/mine_negatives``: ``embeddings/``, ``part-*.parquet`` (mined), ``_rejects/``,
``scores.png`` (histograms) and ``_manifest.json`` with per-dataset statistics.
"""
from __future__ import annotations

import collections
import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import outputs, provenance, storage
from pipeline.config import Config, MiningConfig
from pipeline.data.schemas import MINED, PAIRS, embeddings_schema, vector_array, vectors_numpy
from pipeline.mining import select_negatives
from pipeline.outputs import ShardedOutput, complete_input
from pipeline.ray_utils import actor_pool_resources, run_shard_tasks

logger = logging.getLogger(__name__)

STEP = "mine_negatives"
INPUT_TABLE = "prepare_data/pairs"
HISTOGRAM_BINS = np.linspace(-1.0, 1.0, 41)


@dataclass(frozen=True)
class EmbedTask:
    index: int
    pairs_uri: str
    first_targets: list[int]   # rows of this shard whose target is first seen here


@dataclass(frozen=True)
class SearchTask:
    index: int
    pairs_uri: str
    embeddings_uri: str
    embedding_rejects_uri: str
    targets: Any               # ObjectRef of the TargetIndex
    folder: str
    config_hash: str
    mining: MiningConfig


@dataclass
class TargetIndex:
    """Every distinct target: its vector, group, content key and where its payload is."""

    emb: np.ndarray            # (C, D) float32, unit rows
    groups: np.ndarray         # (C,) dataset names (or one group for scope=global)
    keys: np.ndarray           # (C,) content keys
    location: np.ndarray       # (C, 2) int64: pairs shard, row
    row_of: dict[tuple[str, str], int]  # (dataset, key) -> target row


# ---------------------------------------------------------------------------------------
# Phase 1: embed


def miner_path(config: Config) -> str:
    if config.mining.miner == "stage1":
        return storage.join(config.run_root, "stage1", "model")
    return config.mining.miner


class EmbedWorker:
    """Ray Data actor: holds the miner, embeds one pairs shard per call."""

    def __init__(self, path: str, trust_remote_code: bool, prompt_mode: str,
                 batch_size: int, folder: str, config_hash: str, torch_threads: int) -> None:
        import torch

        from pipeline.models import Embedder

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, torch_threads))
        self.embedder = Embedder.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.embedder.eval()
        self.prompt_mode, self.batch_size = prompt_mode, batch_size
        self.output = ShardedOutput(storage.join(folder, "embeddings"), config_hash,
                                    embeddings_schema(self.embedder.embedding_dim()))

    def __call__(self, task: EmbedTask) -> dict[str, Any]:
        start = time.perf_counter()
        rows = storage.read_table(task.pairs_uri).to_pylist()
        rejects = {i: why for i, row in enumerate(rows) if (why := check_pair(row))}
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
        kept = [items[j] for j in keep]
        table = pa.Table.from_pydict({
            "kind": [k for k, _ in kept],
            "dataset": [rows[i]["dataset"] for _, i in kept],
            "key": [rows[i]["id"] if k == "query" else rows[i]["pos_key"] for k, i in kept],
            "row": pa.array([i for _, i in kept], pa.int32()),
            "emb": vector_array(emb[keep].reshape(len(keep), self.embedder.embedding_dim())),
        }, schema=self.output.schema)
        reject_rows = [_reject(rows[i], task.pairs_uri, i, *why) for i, why in
                       sorted(rejects.items())]
        self.output.write_shard(task.index, table, reject_rows)
        return {"shard": task.index, "embedded": len(keep), "rejected": len(reject_rows),
                "seconds": time.perf_counter() - start}


def check_pair(row: dict[str, Any]) -> tuple[str, str, str] | None:
    """(reason, field, detail) when a pair cannot be mined, else None."""
    from PIL import Image

    if not (row.get("pos_text") or "").strip() and row.get("pos_image") is None:
        return ("missing_positive", "pos_text", "the pair has no positive text or image")
    for field in ("qry_image", "pos_image"):
        data = row.get(field)
        if data is None:
            continue
        try:
            Image.open(io.BytesIO(data)).load()
        except Exception as err:  # noqa: BLE001 - any decode failure refuses the row
            return ("corrupt_image", field, f"packed image does not decode: {err}")
    return None


def _reject(row: dict[str, Any], uri: str, position: int, reason: str, field: str,
            detail: str) -> dict[str, Any]:
    payload = {k: v for k, v in row.items() if not isinstance(v, bytes | list)}
    return {"id": row["id"], "source": f"{uri}#{position}", "field": field,
            "reason": reason, "detail": detail,
            "row_json": json.dumps(payload, ensure_ascii=False, default=repr)}


# ---------------------------------------------------------------------------------------
# Phase 2: search, filter, write


def load_targets(embeddings_folder: str, scope: str) -> TargetIndex:
    """The target rows of every embeddings shard, in shard order."""
    emb, groups, keys, location = [], [], [], []
    for uri in outputs.shard_uris(embeddings_folder):
        table = storage.read_table(uri)
        mask = np.asarray(table.column("kind").to_pylist()) == "target"
        if not mask.any():
            continue
        shard = outputs.shard_index(uri)
        vectors = vectors_numpy(table.column("emb"))[mask]
        emb.append(vectors)
        groups += [d for d, m in zip(table.column("dataset").to_pylist(), mask, strict=True) if m]
        keys += [k for k, m in zip(table.column("key").to_pylist(), mask, strict=True) if m]
        rows = np.asarray(table.column("row").to_pylist())[mask]
        location += [(shard, r) for r in rows]
    matrix = np.concatenate(emb) if emb else np.zeros((0, 1), np.float32)
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)  # fp16 -> unit
    row_of = {(g, k): i for i, (g, k) in enumerate(zip(groups, keys, strict=True))}
    group_arr = np.asarray(groups if scope == "dataset" else ["all"] * len(groups), dtype=object)
    return TargetIndex(matrix, group_arr, np.asarray(keys, dtype=object),
                       np.asarray(location, dtype=np.int64).reshape(-1, 2), row_of)


def search_shard(task: SearchTask) -> dict[str, Any]:
    """Mine shard ``task.index``: its queries against the targets; write mined rows."""
    import ray

    from pipeline.mining import search_within_groups

    start = time.perf_counter()
    targets: TargetIndex = ray.get(task.targets)
    mining = task.mining
    pairs = storage.read_table(task.pairs_uri).to_pylist()
    embedded = storage.read_table(task.embeddings_uri)
    queries = [i for i, k in enumerate(embedded.column("kind").to_pylist()) if k == "query"]
    q_rows = np.asarray(embedded.column("row").to_pylist(), dtype=np.int64)[queries]
    q_emb = vectors_numpy(embedded.column("emb"))[queries]
    q_emb /= np.maximum(np.linalg.norm(q_emb, axis=1, keepdims=True), 1e-12)  # (Q, D)
    datasets = [pairs[r]["dataset"] for r in q_rows]
    pos_ids = np.asarray([targets.row_of.get((d, pairs[r]["pos_key"]), -1)
                          for d, r in zip(datasets, q_rows, strict=True)], dtype=np.int64)
    # Rows refused while embedding, then rows whose positive's target was refused.
    rejects = storage.read_table(task.embedding_rejects_uri).to_pylist()
    rejects += [_reject(pairs[r], task.pairs_uri, int(r), "missing_positive", "pos_key",
                        "the positive's target was refused in the embedding phase")
                for r, p in zip(q_rows, pos_ids, strict=True) if p < 0]
    ok = pos_ids >= 0
    q_rows, q_emb, pos_ids = q_rows[ok], q_emb[ok], pos_ids[ok]
    q_groups = np.asarray([pairs[r]["dataset"] if mining.scope == "dataset" else "all"
                           for r in q_rows], dtype=object)
    k = min(mining.search_k, max(1, len(targets.keys)))
    result = search_within_groups(
        q_emb, q_groups, targets.emb, targets.groups, k, backend=mining.backend,
        block_size=mining.block_size, query_block_size=mining.query_block_size,
        build=mining.index, nlist=mining.ivf_nlist if mining.index == "ivf" else None,
        nprobe=mining.ivf_nprobe, num_threads=max(1, int(mining.cpus_per_actor)))
    pos_scores = (q_emb * targets.emb[pos_ids]).sum(axis=1)  # (Q,)
    selection = select_negatives(
        result.scores, result.ids, pos_scores, pos_ids, targets.keys,
        targets.keys[pos_ids], num_negatives=mining.num_negatives,
        fn_margin=mining.fn_margin, fn_ratio=mining.fn_ratio, max_score=mining.max_score,
        unique_negatives=mining.unique_negatives, selection=mining.selection,
        range_min=mining.range_min, range_max=mining.range_max or None,
        seed=mining.seed + task.index)
    payloads = _negative_payloads(selection.neg_ids, targets, task.pairs_uri, pairs)
    rows = [_mined_row(pairs[r], selection, j, pos_scores[j], payloads, targets.keys)
            for j, r in enumerate(q_rows)]
    stats = _shard_stats(datasets=[pairs[r]["dataset"] for r in q_rows],
                         selection=selection, pos_scores=pos_scores)
    output = ShardedOutput(task.folder, task.config_hash, MINED)
    storage.write_json(output.stats_uri(task.index), stats)
    output.write_shard(task.index, rows, rejects)
    return {"shard": task.index, "rows": len(rows), "seconds": time.perf_counter() - start,
            "search": json.dumps(result.stats, default=str)}


def _negative_payloads(neg_ids: np.ndarray, targets: TargetIndex, own_uri: str,
                       own_rows: list[dict[str, Any]]) -> dict[int, tuple[str, bytes | None]]:
    """(text, image) of every chosen negative, read from the pairs shards holding them."""
    needed = np.unique(neg_ids[neg_ids >= 0])
    payloads: dict[int, tuple[str, bytes | None]] = {}
    folder = own_uri.rsplit("/", 1)[0]
    for shard in np.unique(targets.location[needed, 0]):
        in_shard = needed[targets.location[needed, 0] == shard]
        uri = storage.join(folder, outputs.shard_name(int(shard)))
        rows = own_rows if uri == own_uri else storage.read_table(
            uri, columns=["pos_text", "pos_image"]).to_pylist()
        for t in in_shard:
            row = rows[int(targets.location[t, 1])]
            payloads[int(t)] = (row["pos_text"], row["pos_image"])
    return payloads


def _mined_row(pair: dict[str, Any], selection: Any, j: int, pos_score: float,
               payloads: dict[int, tuple[str, bytes | None]], keys: np.ndarray
               ) -> dict[str, Any]:
    chosen = [int(t) for t in selection.neg_ids[j] if t >= 0]
    counts = selection.counts
    row = {k: pair[k] for k in PAIRS.names if k not in ("neg_text", "neg_image")}
    row.update({
        "given_neg_text": pair["neg_text"], "given_neg_image": pair["neg_image"],
        "neg_text": [payloads[t][0] for t in chosen],
        "neg_image": [payloads[t][1] for t in chosen],
        "neg_key": [keys[t] for t in chosen],
        "neg_score": [float(s) for s in selection.neg_scores[j][:len(chosen)]],
        "pos_score": float(pos_score),
        "n_false_neg_dropped": int(counts["dropped_margin"][j] + counts["dropped_ratio"][j]
                                   + counts["dropped_max_score"][j]),
        "n_duplicate_dropped": int(counts["dropped_self"][j] + counts["dropped_duplicate"][j]
                                   + counts["dropped_repeat"][j]),
        "short": bool(counts["short"][j]),
    })
    return row


def _shard_stats(*, datasets: list[str], selection: Any, pos_scores: np.ndarray
                 ) -> dict[str, Any]:
    """Per-dataset sums of the filter counts and score histograms (to merge across shards)."""
    stats: dict[str, Any] = {}
    names = np.asarray(datasets, dtype=object)
    for dataset in sorted(set(datasets)):
        rows = names == dataset
        counts = {k: v[rows] for k, v in selection.counts.items()}
        neg = selection.neg_scores[rows]
        stats[dataset] = {
            **{k: int(np.sum(v)) for k, v in counts.items()},
            "queries": int(rows.sum()),
            "pos_hist": np.histogram(pos_scores[rows], HISTOGRAM_BINS)[0].tolist(),
            "neg_hist": np.histogram(neg[np.isfinite(neg)], HISTOGRAM_BINS)[0].tolist(),
        }
    return stats


def merge_stats(shards: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for shard in shards:
        for dataset, stats in shard.items():
            into = merged.setdefault(dataset, collections.defaultdict(int))
            for key, value in stats.items():
                if isinstance(value, list):
                    into[key] = (np.asarray(into.get(key) or np.zeros(len(value), int))
                                 + value).tolist()
                else:
                    into[key] += value
    return {d: dict(v) for d, v in sorted(merged.items())}


# ---------------------------------------------------------------------------------------
# The step


def first_target_rows(pair_shards: list[str]) -> list[list[int]]:
    """Per shard, the rows whose (dataset, target key) is seen for the first time."""
    seen: set[tuple[str, str]] = set()
    firsts = []
    for uri in pair_shards:
        table = storage.read_table(uri, columns=["dataset", "pos_key"])
        rows = []
        for i, key in enumerate(zip(table.column("dataset").to_pylist(),
                                    table.column("pos_key").to_pylist(), strict=True)):
            if key not in seen:
                seen.add(key)
                rows.append(i)
        firsts.append(rows)
    return firsts


def mine_negatives(config: Config) -> dict[str, Any]:
    """Run the mining step; return its manifest (reused as is when already complete)."""
    import ray

    start = time.perf_counter()
    validate_mining(config.mining)
    folder = config.step_dir(STEP)
    if outputs.is_complete(folder):
        logger.info("mine_negatives: complete already at %s", folder)
        return outputs.require_complete(folder)
    input_folder = storage.join(config.run_root, *INPUT_TABLE.split("/"))
    inputs, shards = complete_input(input_folder)
    path = miner_path(config)
    if not storage.exists(path):
        raise FileNotFoundError(f"miner model not found: {path} (mining.miner="
                                f"{config.mining.miner!r}; run stage 1 first or set a folder)")
    output = ShardedOutput(folder, config.config_hash, MINED)
    output.claim()
    embed_folder = storage.join(folder, "embeddings")
    ShardedOutput(embed_folder, config.config_hash, pa.schema([])).claim()
    done = _done(embed_folder, len(shards))
    firsts = first_target_rows(shards)
    embed_tasks = [EmbedTask(i, uri, firsts[i]) for i, uri in enumerate(shards) if i not in done]
    actors, cpus, gpus = actor_pool_resources(config.mining.num_actors,
                                              config.mining.cpus_per_actor)
    logger.info("mine_negatives: embedding %d shards (%d done) with %d actor(s) of %s",
                len(embed_tasks), len(done), min(actors, len(embed_tasks) or 1), path)
    run_shard_tasks(embed_tasks, EmbedWorker, num_cpus=cpus, num_gpus=gpus,
                    pool_size=min(actors, len(embed_tasks) or 1), worker_kwargs={
                        "path": path, "trust_remote_code": config.mining.miner_trust_remote_code,
                        "prompt_mode": config.mining.prompt_mode,
                        "batch_size": config.mining.embed_batch_size, "folder": folder,
                        "config_hash": config.config_hash, "torch_threads": int(cpus)})
    targets = load_targets(embed_folder, config.mining.scope)
    logger.info("mine_negatives: %d distinct targets, dim %d", *targets.emb.shape)
    targets_ref = ray.put(targets)
    done = _done(folder, len(shards))
    embedded = ShardedOutput(embed_folder, config.config_hash, pa.schema([]))
    search_tasks = [SearchTask(i, uri, embedded.shard_uri(i), embedded.reject_uri(i),
                               targets_ref, folder, config.config_hash, config.mining)
                    for i, uri in enumerate(shards) if i not in done]
    # Search on the GPU when the cluster has one and the backend can use it.
    search_gpus = gpus if config.mining.backend != "faiss" else 0.0
    results = run_shard_tasks(search_tasks, search_shard, num_cpus=cpus, num_gpus=search_gpus)
    logger.info("mine_negatives: %d shards searched in this run", len(results))
    stats = merge_stats([storage.read_json(output.stats_uri(i)) for i in range(len(shards))])
    histogram_png(stats, storage.join(folder, "scores.png"))
    recall = _ivf_recall(config.mining, targets) if config.mining.index == "ivf" else None
    return output.finish(
        rows_in=inputs["rows_out"], num_shards=len(shards), seconds=time.perf_counter() - start,
        extra={"table": "mined", "miner": path, "targets": int(targets.emb.shape[0]),
               "shards_skipped": len(done), "per_dataset": _per_dataset(stats),
               "totals": _totals(stats), "ivf_recall": recall,
               "inputs": {"pairs": provenance.fingerprint(input_folder)},
               "config": config.to_dict()})


def validate_mining(mining: MiningConfig) -> None:
    """Settings that cannot work, refused before any heavy work."""
    from pipeline.mining import FAISS_GPU_MAX_K

    if mining.backend == "faiss_gpu" and mining.search_k > FAISS_GPU_MAX_K:
        raise ValueError(f"mining.search_k={mining.search_k} exceeds FAISS GPU's limit of "
                         f"{FAISS_GPU_MAX_K}; lower it or use mining.backend=torch")
    if mining.search_k < mining.num_negatives:
        raise ValueError(f"mining.search_k={mining.search_k} is below mining.num_negatives="
                         f"{mining.num_negatives}: too few candidates to choose from")
    if mining.selection == "range" and mining.range_max and mining.range_max <= mining.range_min:
        raise ValueError(f"mining.range_max={mining.range_max} must exceed mining.range_min="
                         f"{mining.range_min}")


def _done(folder: str, num_shards: int) -> set[int]:
    return ShardedOutput(folder, "", MINED).done_shards(num_shards)


def _per_dataset(stats: dict[str, Any]) -> dict[str, Any]:
    return {d: {**s, "negatives_kept": s["n_selected"], "candidates_seen": s["n_candidates"]}
            for d, s in stats.items()}


def _totals(stats: dict[str, Any]) -> dict[str, int]:
    keys = [k for k in next(iter(stats.values()), {}) if not k.endswith("_hist")]
    return {k: int(sum(s[k] for s in stats.values())) for k in keys}


def _ivf_recall(mining: MiningConfig, targets: TargetIndex) -> float:
    """Recall@k of IVF vs exact search on a sample of targets used as queries."""
    from pipeline.mining import estimate_recall, search_topk

    k = min(mining.search_k, len(targets.keys))
    approx = search_topk(targets.emb, targets.emb, k, backend=mining.backend, build="ivf",
                         nlist=mining.ivf_nlist, nprobe=mining.ivf_nprobe)
    return float(estimate_recall(targets.emb, targets.emb, approx.ids,
                                 sample_size=mining.recall_sample, seed=mining.seed))


def histogram_png(stats: dict[str, Any], uri: str) -> None:
    """One panel per dataset: positive vs chosen-negative similarity histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats) or ["(none)"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    centers = (HISTOGRAM_BINS[:-1] + HISTOGRAM_BINS[1:]) / 2
    width = HISTOGRAM_BINS[1] - HISTOGRAM_BINS[0]
    for ax, name in zip(axes[0], names, strict=True):
        for key, label in (("pos_hist", "positive"), ("neg_hist", "hard negatives")):
            ax.bar(centers, stats.get(name, {}).get(key, [0] * len(centers)), width=width,
                   alpha=0.6, label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("cosine similarity to the query")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(uri, buffer.getvalue())


def format_summary(manifest: dict[str, Any], folder: str) -> str:
    lines = [f"mine_negatives -> {folder}  ({manifest['seconds']:.1f} s, "
             f"{manifest['targets']} distinct targets)",
             f"{'dataset':<14} {'queries':>7} {'cands':>6} {'self/dup':>8} {'margin':>7} "
             f"{'ratio':>6} {'max':>5} {'kept':>6} {'short':>6}"]
    for name, s in manifest["per_dataset"].items():
        lines.append(f"{name:<14} {s['queries']:>7} {s['n_candidates']:>6} "
                     f"{s['dropped_self'] + s['dropped_duplicate'] + s['dropped_repeat']:>8} "
                     f"{s['dropped_margin']:>7} {s['dropped_ratio']:>6} "
                     f"{s['dropped_max_score']:>5} {s['n_selected']:>6} {s['short']:>6}")
    lines.append(f"pairs in {manifest['rows_in']}, mined {manifest['rows_out']}, rejected "
                 f"{manifest['rows_rejected']} {manifest['rejects_by_reason'] or ''} "
                 f"(rows in {folder}/_rejects)")
    return "\n".join(lines)
