"""Benchmark: the data path at several sizes, on a simulated multi-node cluster.

    .venv/bin/python bench/scale.py [--quick] [--sizes 10000 40000 160000 640000]
                                    [--workers 2 4] [--dim 128]

For each N (pairs): a synthetic pairs table (4 datasets, distinct small PNG images on half of the
queries and half of the targets, some repeated targets, a given negative on a quarter of
the rows) in shards of one dataset each, and synthetic float16 miner embeddings (queries
near their positive) written as the mining step's embed phase would; then, on a
``ray.cluster_utils.Cluster`` (a head and two worker nodes):

1. **mining**: the real ``mine_negatives`` step (its search phase; the embed phase is done)
   in a fresh driver process, which then reads the mined index as stage 2's driver does
   (``read_mined_index``). Recorded: the driver's peak RSS, the largest search task's peak
   RSS (the step's manifest), mined-table bytes / pairs-table bytes.
2. **stage-2 data path**, for each W: W Ray actors spread over the nodes form a gloo group
   and run one epoch's row exchange (:func:`pipeline.train.rows.exchange_epoch`) exactly as
   the training loop does; then each prepares ``--steps`` steps as the prefetch thread
   does (decode, processor and tokeniser of the tiny LLaVA-NeXT student, the stage-2
   ``make_step``) and, on the same rows, runs the tiny model's forward + backward over the
   step's chunks. Recorded per W: ``read_amplification`` = max over ranks of bytes read ÷
   (table bytes / W) (bytes = Arrow bytes of the columns a worker reads), the largest
   worker's peak RSS and rows held, ``loader_step_s`` and ``model_step_s`` (medians).

Writes ``bench/results/scale.json`` (top-level ``runs``: one object per (N, workers) with
``n``, ``workers``, ``read_amplification``, ``driver_peak_rss_mb``,
``search_task_peak_rss_mb``, ``train_worker_peak_rss_mb``, ``mined_to_pairs_bytes``,
``loader_step_s``, ``model_step_s`` and more) and ``bench/results/scale.png`` (memory and
bytes against N). ``--quick``: N = 10k and 40k only (under 10 minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import platform
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from pipeline import outputs, storage  # noqa: E402
from pipeline.data.schemas import IMAGE_PLACEHOLDER  # noqa: E402

DEMO = os.path.join(REPO, "jobs", "configs", "demo.yaml")
OUT = os.path.join(REPO, "bench", "results", "scale.json")
DATASETS = ("bench_t2i", "bench_i2t", "bench_cls", "bench_t2t")
GLOBAL_BATCH = 32        # pairs per step (all ranks)
MINED_NEGATIVES = 2      # per row, as qwen2vl_7b.yaml
CHUNK = 16               # gradient-cache chunk (items)
ROWS_PER_SHARD = 1000    # fixed, as prepare_data's rows_per_shard: more N = more shards


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def overrides(root: str, address: str) -> list[str]:
    return [f"output_root={root}", f"ray.address={address}", "ray.progress_bars=false",
            "storage.shared_filesystem=true",  # the simulated nodes share this disk
            f"mining.miner={root}/miner", "mining.num_actors=2", "mining.cpus_per_actor=1",
            "mining.num_negatives=8", "mining.search_k=32", "mining.use_gpu=false",
            f"stage2.mined_negatives={MINED_NEGATIVES}", "stage2.given_negatives=1",
            f"stage2.global_batch_pairs={GLOBAL_BATCH}", "stage2.batching=mixed",
            f"train.grad_cache_chunk_size={CHUNK}", "train.num_workers=1"]


# -- the synthetic world -------------------------------------------------------------------------
def png(dataset: int, i: int) -> bytes:
    """A distinct 24x24 noise PNG per (dataset, i) (~1.8 KB; it does not compress)."""
    from PIL import Image

    pixels = np.random.default_rng([dataset, i, 7]).integers(0, 255, (24, 24, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def pair_rows(dataset: int, start: int, count: int) -> list[dict[str, Any]]:
    """Rows ``start .. start+count`` of dataset ``dataset``; target i repeats i-1 when i % 10
    == 9 (classification-like), a quarter of the rows carry a given negative."""
    name, rows = DATASETS[dataset], []
    for i in range(start, start + count):
        target = i - 1 if i % 10 == 9 else i
        image_target, image_query = dataset in (0, 2), dataset == 1
        rows.append({
            "id": f"{name}:{i}", "dataset": name,
            "qry_text": (f"{IMAGE_PLACEHOLDER}\n" if image_query else "")
            + f"query {i} of {name} asks",
            "qry_image": png(dataset + len(DATASETS), i) if image_query else None,
            "pos_text": IMAGE_PLACEHOLDER if image_target else f"target {target} of {name}",
            "pos_image": png(dataset, target) if image_target else None,
            "pos_key": hashlib.sha256(f"{name}:{target}".encode()).hexdigest()[:32],
            "neg_text": [f"a given negative of {i}"] if i % 4 == 0 else [],
            "neg_image": [None] if i % 4 == 0 else [], "source": "bench"})
    return rows


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def target_vectors(dataset: int, targets: np.ndarray, dim: int) -> np.ndarray:
    """(T, dim) a deterministic unit vector per (dataset, target index)."""
    out = np.empty((len(targets), dim))
    for j, t in enumerate(targets):
        out[j] = np.random.default_rng([dataset, int(t)]).standard_normal(dim)
    return unit(out)


def build_world(root: str, n: int, dim: int, address: str) -> dict[str, Any]:
    """Pairs shards + manifests, embeddings shards (the embed phase done), a miner folder."""
    from pipeline.config import load_config
    from pipeline.data.schemas import PAIRS, embeddings_schema
    from pipeline.steps import base
    from pipeline.steps.mine_negatives import EMBEDDINGS_ROW_GROUP_ROWS, embeddings_table

    config = load_config(DEMO, overrides(root, address))
    per_dataset = n // len(DATASETS)
    rows_per_shard = ROWS_PER_SHARD
    pairs_dir = storage.join(config.step_dir("prepare_data"), "pairs")
    embed = outputs.ShardedOutput(storage.join(config.step_dir("mine_negatives"), "embeddings"),
                                  base.step_hash(config, "mine_negatives"),
                                  embeddings_schema(dim))
    embed.claim(base.job_record(config, "mine_negatives"))
    shard, rng = 0, np.random.default_rng(1)
    for dataset in range(len(DATASETS)):
        for start in range(0, per_dataset, rows_per_shard):
            rows = pair_rows(dataset, start, min(rows_per_shard, per_dataset - start))
            storage.write_table(pa.Table.from_pylist(rows, schema=PAIRS),
                                storage.join(pairs_dir, outputs.shard_name(shard)))
            idx = np.arange(start, start + len(rows))
            targets = np.where(idx % 10 == 9, idx - 1, idx)
            first = np.flatnonzero(idx % 10 != 9)  # targets first seen here (i-1 was before)
            pos = target_vectors(dataset, targets, dim)                         # (R, dim)
            queries = unit(pos + 0.9 * unit(rng.standard_normal(pos.shape)))   # (R, dim)
            items = [("query", i) for i in range(len(rows))] + [("target", int(i))
                                                                 for i in first]
            table = embeddings_table(rows, items, np.concatenate([queries, pos[first]]),
                                     embed.schema)  # as the embed actors write it
            embed.write_shard(shard, table, [], row_group_size=EMBEDDINGS_ROW_GROUP_ROWS)
            shard += 1
    manifest = {"rows_in": 4 * per_dataset, "rows_out": 4 * per_dataset, "rows_rejected": 0,
                "num_shards": shard, "seconds": 0.0, "config_hash": "bench"}
    outputs.write_manifest(pairs_dir, manifest)
    outputs.write_manifest(config.step_dir("prepare_data"), {**manifest, "tables": {
        "pairs": manifest}, "pairs_per_dataset": {d: per_dataset for d in DATASETS}})
    os.makedirs(f"{root}/miner", exist_ok=True)
    from pipeline.models.tiny import build_tiny_model

    build_tiny_model("llava_next", f"{root}/student", seed=0,
                     vocab_texts=[r["qry_text"] for r in pair_rows(0, 0, 50)]
                     + [f"target {i} of {d}" for i in range(50) for d in DATASETS])
    columns = ["id", "qry_text", "qry_image", "pos_text", "pos_image", "pos_key", "neg_text",
               "neg_image"]  # stage 2's PAIR_COLUMNS
    table_bytes = sum(storage.read_table(uri, columns=columns).nbytes
                      for uri in outputs.shard_uris(pairs_dir))
    return {"pairs_bytes_on_disk": folder_bytes(pairs_dir), "pair_table_bytes": table_bytes,
            "pair_shards": shard, "rows": 4 * per_dataset}


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(uri) for uri in outputs.shard_uris(folder))


# -- phase 1: mining + the stage-2 driver's reads (a fresh process) ------------------------------
def mine(root: str, address: str, out: str) -> None:
    from pipeline.config import load_config
    from pipeline.ray_utils import init_ray
    from pipeline.steps import mine_negatives
    from pipeline.train.stage2 import pairs_source, read_mined_index

    config = load_config(DEMO, overrides(root, address))
    init_ray(config)
    start = time.perf_counter()
    manifest = mine_negatives.run(config)
    seconds = time.perf_counter() - start
    _, shards = outputs.complete_input(config.step_dir("mine_negatives"))
    index = read_mined_index(shards, mined_negatives=MINED_NEGATIVES, given_negatives=1)
    _, pairs = outputs.complete_input(manifest["pairs_table"])
    source = pairs_source(pairs, index)
    np.save(f"{root}/pointers.npy", source.pointers)
    np.save(f"{root}/row_negatives.npy", index.row_negatives)
    storage.write_json(out, {
        "driver_peak_rss_mb": peak_rss_mb(), "mining_s": seconds,
        "search_task_peak_rss_mb": manifest.get("search_task_peak_rss_mb"),
        "mined_bytes": folder_bytes(config.step_dir("mine_negatives")),
        "searched_again": manifest["totals"].get("searched_again"),
        "short": manifest["totals"].get("short"), "pair_shards": list(pairs)})


# -- phase 2: the stage-2 data path on W actors -------------------------------------------------
class DataWorker:
    """One training rank's data path: the epoch exchange, then step preparation and the
    tiny model's forward + backward on the prepared chunks."""

    def __init__(self, rank: int, world_size: int, port: int) -> None:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        self.rank, self.world_size = rank, world_size
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size)

    def run(self, root: str, address: str, shards: list[str], steps: int) -> dict[str, Any]:
        import torch

        from pipeline.config import load_config
        from pipeline.models.student import StudentSource
        from pipeline.train import loop
        from pipeline.train.rows import exchange_epoch, source_from_shards
        from pipeline.train.stage2 import PAIR_COLUMNS, TARGET_COLUMNS, Stage2Spec

        config = load_config(DEMO, overrides(root, address))
        pointers = np.load(f"{root}/pointers.npy")
        source = source_from_shards(shards, PAIR_COLUMNS, pointers, TARGET_COLUMNS)
        order = loop.epoch_order(len(pointers), seed=0, epoch=0)
        per_epoch = len(pointers) // GLOBAL_BATCH
        wanted = [np.concatenate([loop.local_positions(order, s, r, world_size=self.world_size,
                                                       global_batch_rows=GLOBAL_BATCH)
                                  for s in range(per_epoch)]) for r in range(self.world_size)]
        rows = exchange_epoch(source, wanted, self.rank)
        settings = loop.LoopSettings(stage="stage2", stage_dir=root, train=config.train,
                                     optim=config.stage2.optim, global_batch_rows=GLOBAL_BATCH,
                                     row_keys=(), precision="fp32", use_gpu=False,
                                     source=source)
        spec = Stage2Spec(settings, init=StudentSource(f"{root}/student", "llava_next", False),
                          config=config, probe_rows=[],
                          row_negatives=np.load(f"{root}/row_negatives.npy"))
        module = spec.load_model(dtype=torch.float32, device="cpu")
        ctx = loop.WorkerContext(settings=settings, rank=self.rank, world_size=self.world_size,
                                 device=torch.device("cpu"))
        loader_s, model_s = [], []
        for step in range(min(steps, per_epoch)):
            start = time.perf_counter()
            local = loop.local_positions(order, step, self.rank, world_size=self.world_size,
                                         global_batch_rows=GLOBAL_BATCH)
            batch = spec.make_step(ctx, module, spec.decode_rows(rows.batch(local)),
                                   loop.global_positions(order, step, GLOBAL_BATCH))
            loader_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            for chunk in batch.chunks:  # the model's share of a step: forward + backward
                module(**chunk).sum().backward()
            model_s.append(time.perf_counter() - start)
        return {"rank": self.rank, "bytes_read": rows.bytes_read,
                "bytes_held": rows.bytes_received, "rows_held": rows.own.num_rows,
                "exchange_s": rows.seconds, "peak_rss_mb": peak_rss_mb(),
                "loader_step_s": statistics.median(loader_s),
                "model_step_s": statistics.median(model_s)}


def data_path(root: str, address: str, shards: list[str], workers: int,
              steps: int) -> list[dict[str, Any]]:
    import ray

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    actor = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(DataWorker)
    ranks = [actor.remote(r, workers, port) for r in range(workers)]
    try:
        return ray.get([w.run.remote(root, address, shards, steps) for w in ranks])
    finally:
        for w in ranks:
            ray.kill(w)


# -- driver ---------------------------------------------------------------------------------------
def in_process(fn: Any, *args: Any) -> None:
    """Run ``fn(*args)`` in a fresh process (its own peak RSS); raise if it fails."""
    process = multiprocessing.get_context("spawn").Process(target=fn, args=args)
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"{fn.__name__} failed (exit {process.exitcode})")


def start_cluster() -> Any:
    from ray.cluster_utils import Cluster

    from pipeline.ray_utils import LOCAL_ENV

    os.environ.update({**LOCAL_ENV, "RAY_AUTH_MODE": "disabled"})
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 2, "object_store_memory": 512 * 2**20})
    for _ in range(2):
        cluster.add_node(num_cpus=2, object_store_memory=512 * 2**20)
    cluster.wait_for_nodes()
    return cluster


def run_size(n: int, args: argparse.Namespace, address: str, tmp: str) -> list[dict[str, Any]]:
    import ray

    root = os.path.join(tmp, f"n{n}")
    start = time.perf_counter()
    world = {}
    in_process(_build, root, n, args.dim, address, f"{root}.world.json")
    world = storage.read_json(f"{root}.world.json")
    build_s = time.perf_counter() - start
    in_process(mine, root, address, f"{root}.mine.json")
    mined = storage.read_json(f"{root}.mine.json")
    runs = []
    ray.init(address=address, logging_level="ERROR")
    try:
        for workers in args.workers:
            ranks = data_path(root, address, mined["pair_shards"], workers, args.steps)
            share = world["pair_table_bytes"] / workers
            runs.append({
                "n": world["rows"], "workers": workers, "dim": args.dim,
                "read_amplification": max(r["bytes_read"] for r in ranks) / share,
                "driver_peak_rss_mb": mined["driver_peak_rss_mb"],
                "search_task_peak_rss_mb": mined["search_task_peak_rss_mb"],
                "train_worker_peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
                "train_worker_held_mb": max(r["bytes_held"] for r in ranks) / 2**20,
                "mined_to_pairs_bytes": mined["mined_bytes"] / world["pairs_bytes_on_disk"],
                "loader_step_s": statistics.median(r["loader_step_s"] for r in ranks),
                "model_step_s": statistics.median(r["model_step_s"] for r in ranks),
                "exchange_s": max(r["exchange_s"] for r in ranks),
                "pair_table_mb": world["pair_table_bytes"] / 2**20,
                "pair_shards": world["pair_shards"], "mining_s": mined["mining_s"],
                "searched_again": mined["searched_again"], "short": mined["short"],
                "build_s": build_s, "ranks": ranks})
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "ranks"}, default=str),
                  flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    return runs


def _build(root: str, n: int, dim: int, address: str, out: str) -> None:
    storage.write_json(out, build_world(root, n, dim, address))


def plot(runs: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, amp) = plt.subplots(1, 2, figsize=(10, 3.6))
    for workers in sorted({r["workers"] for r in runs}):
        rs = [r for r in runs if r["workers"] == workers]
        ns = [r["n"] for r in rs]
        mem.plot(ns, [r["train_worker_peak_rss_mb"] for r in rs], "o-",
                 label=f"train worker (W={workers})")
        amp.plot(ns, [r["read_amplification"] for r in rs], "o-", label=f"W={workers}")
    first = [r for r in runs if r["workers"] == runs[0]["workers"]]
    mem.plot([r["n"] for r in first], [r["driver_peak_rss_mb"] for r in first], "s--",
             label="driver")
    mem.plot([r["n"] for r in first], [r["search_task_peak_rss_mb"] or 0 for r in first],
             "^--", label="search task")
    mem.set(xscale="log", xlabel="pairs N", ylabel="peak RSS (MiB)")
    amp.axhline(1.2, color="grey", linestyle=":", label="target 1.2")
    amp.set(xscale="log", xlabel="pairs N", ylabel="bytes read per worker / (table / W)")
    mem.legend(fontsize=7)
    amp.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 10k and 40k only")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 40000, 160000, 640000])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="steps prepared per worker")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    sizes = [10000, 40000] if args.quick else args.sizes
    start = time.perf_counter()
    cluster = start_cluster()
    runs: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
            for n in sizes:
                runs += run_size(n, args, cluster.address, tmp)
    finally:
        cluster.shutdown()
    result = {"runs": runs, "sizes": sizes, "quick": args.quick, "seconds": time.perf_counter()
              - start, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "global_batch_pairs": GLOBAL_BATCH, "mined_negatives": MINED_NEGATIVES}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    storage.write_json(args.out, result)
    plot(runs, os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
