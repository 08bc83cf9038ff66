"""Benchmark: teacher embeddings, single-process SentenceTransformer vs the Ray Data job.

    .venv/bin/python bench/teacher_embed.py [--texts 20000] [--actors 2] [--repeats 3]

In one run, on the same N texts (demo captions and NLI-like sentences of mixed length):
(a) baseline: one process, ``Teacher.encode`` (SentenceTransformer.encode, all cores), with
    the same token-length pass the job makes for its statistics inside the timer (equal work);
(b) the teacher job (``pipeline.steps.teacher_embed``) on a local Ray instance started once
    (as ``run_all`` does), for each actor count, timed with start-up (its actor pool and
    model loads) and without it (first shard start to last shard end).
(a) and (b) alternate ``--repeats`` times (which goes first alternates too: the machine is
shared and noisy); the ratio (b)/(a) is the median of the per-repetition ratios, with its min
and max. Writes bench/results/teacher_embed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from pipeline import storage  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.schemas import TEXT_GROUPS  # noqa: E402
from pipeline.outputs import ShardedOutput, chunk  # noqa: E402

WORDS = ("a the of and in on with red green blue yellow purple orange circle square "
         "triangle star left right top bottom center small large man woman dog cat "
         "plays sits runs near under above street park water table people children "
         "while because although several many few bright dark old young holding").split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Mixed lengths: short captions to long NLI-like sentences (lognormal word counts)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=2.6, sigma=0.6, size=n), 3, 120).astype(int)
    return [" ".join(rng.choice(WORDS, size=k)) + "." for k in lengths]


def write_text_groups(config: Any, texts: list[str], rows_per_shard: int) -> None:
    """Write the texts as a complete prepare_data/text_groups output (groups of 3), owned
    by the config's prepare_data step (so the teacher step takes it as its fresh input)."""
    from pipeline.steps import base

    owner = base.step_hash(config, "prepare_data")
    folder = storage.join(config.step_dir("prepare_data"), "text_groups")
    groups = [texts[i:i + 3] for i in range(0, len(texts), 3)]
    rows = [{"id": f"g{i}", "texts": g} for i, g in enumerate(groups)]
    output = ShardedOutput(folder, owner, TEXT_GROUPS)
    output.claim()
    shards = chunk(rows, rows_per_shard)
    for i, shard in enumerate(shards):
        output.write_shard(i, pa.Table.from_pylist(shard, schema=TEXT_GROUPS), [])
    output.finish(rows_in=len(rows), num_shards=len(shards), seconds=0.0,
                  config_hash=config.config_hash)


def baseline(texts: list[str], batch_size: int) -> dict:
    import torch

    from pipeline.models.teacher import Teacher

    torch.set_num_threads(os.cpu_count() or 1)
    teacher = Teacher(None)
    start = time.perf_counter()
    tokens = sum(teacher.token_lengths(texts))  # the job counts them too (its statistics)
    teacher.encode(texts, batch_size=batch_size)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "texts_per_s": len(texts) / seconds,
            "tokens_per_s": tokens / seconds, "tokens": tokens}


CPUS_PER_ACTOR = [1.0]


def bench_config(tmp: str, actors: int, batch_size: int) -> Any:
    return load_config(os.path.join(os.path.dirname(__file__), "..", "jobs", "configs",
                                    "demo.yaml"),
                       [f"output_root={tmp}", f"teacher.num_actors={actors}",
                        f"teacher.batch_size={batch_size}", "ray.progress_bars=false",
                        f"teacher.cpus_per_actor={CPUS_PER_ACTOR[0]}",
                        f"ray.num_cpus={max(4, int(actors * CPUS_PER_ACTOR[0]) + 1)}"])


def ray_job(texts: list[str], actors: int, batch_size: int, rows_per_shard: int) -> dict:
    """One teacher job on the running Ray instance (its actor pool starts and stops with it:
    "with start-up" counts the pool and the model loads, not Ray's own start)."""
    from pipeline.steps.teacher_embed import run as teacher_embed

    with tempfile.TemporaryDirectory() as tmp:
        config = bench_config(tmp, actors, batch_size)
        write_text_groups(config, texts, rows_per_shard)
        start = time.perf_counter()
        manifest = teacher_embed(config)
        total = time.perf_counter() - start
        folder = config.step_dir("teacher_embed")
        output = ShardedOutput(folder, config.config_hash, pa.schema([]))
        stats = [storage.read_json(output.stats_uri(i)) for i in range(manifest["num_shards"])]
    first = min(s["started_at"] for s in stats)
    busy = max(s["finished_at"] for s in stats) - first
    tokens = manifest["tokens_embedded"]
    return {"actors": actors, "seconds_with_startup": total, "seconds_without_startup": busy,
            "texts_per_s_with_startup": len(texts) / total,
            "texts_per_s": len(texts) / busy, "tokens_per_s": tokens / busy,
            "shards": manifest["num_shards"],
            "shard_parts_s": [{k: s.get(k) for k in ("read_s", "tokenize_s", "encode_s")}
                              for s in sorted(stats, key=lambda s: s["started_at"])],
            "shard_spans_s": [[round(s["started_at"] - first, 2), round(s["finished_at"] - first, 2)]
                              for s in sorted(stats, key=lambda s: s["started_at"])]}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "repeats": len(values)}


def compare(texts: list[str], actors: int, args: argparse.Namespace) -> dict:
    """Baseline and job alternated ``args.repeats`` times; ratios per repetition."""
    import ray

    from pipeline.ray_utils import init_ray

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        init_ray(bench_config(tmp, actors, args.batch_size))  # once: as run_all does
    ray_start_s = time.perf_counter() - start
    bases, jobs = [], []
    for rep in range(args.repeats):
        for side in (("base", "job") if rep % 2 == 0 else ("job", "base")):
            if side == "base":
                bases.append(baseline(texts, args.batch_size))
            else:
                jobs.append(ray_job(texts, actors, args.batch_size, args.rows_per_shard))
    ray.shutdown()
    ratios = [j["texts_per_s"] / b["texts_per_s"] for b, j in zip(bases, jobs, strict=True)]
    with_startup = [j["texts_per_s_with_startup"] / b["texts_per_s"]
                    for b, j in zip(bases, jobs, strict=True)]
    return {"actors": actors, "baseline_texts_per_s": spread([b["texts_per_s"] for b in bases]),
            "job_texts_per_s": spread([j["texts_per_s"] for j in jobs]),
            "job_tokens_per_s": spread([j["tokens_per_s"] for j in jobs]),
            "ratio_vs_baseline": spread(ratios),
            "ratio_vs_baseline_with_startup": spread(with_startup),
            "shards": jobs[0]["shards"], "ray_start_s": round(ray_start_s, 2),
            "baseline_runs": bases, "job_runs": jobs}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=20000)
    parser.add_argument("--actors", type=int, nargs="+", default=[2])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rows-per-shard", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0,
                        help="teacher.cpus_per_actor (also each actor's torch threads)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "teacher_embed.json"))
    args = parser.parse_args(argv)
    CPUS_PER_ACTOR[0] = args.cpus_per_actor
    texts = make_texts(args.texts)
    runs = []
    for actors in args.actors:
        run = compare(texts, actors, args)
        runs.append(run)
        ratio, startup = run["ratio_vs_baseline"], run["ratio_vs_baseline_with_startup"]
        print(f"{actors} actor(s): job {run['job_texts_per_s']['median']:.0f} texts/s vs "
              f"SentenceTransformer.encode {run['baseline_texts_per_s']['median']:.0f} texts/s:"
              f" ratio {ratio['median']:.2f} [{ratio['min']:.2f}, {ratio['max']:.2f}] without "
              f"start-up, {startup['median']:.2f} with it")
    from bench.machine import describe

    result = {"texts": args.texts, "batch_size": args.batch_size, "repeats": args.repeats,
              "machine": describe(), "runs": runs}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
