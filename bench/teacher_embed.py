"""Benchmark: teacher embeddings, single-process SentenceTransformer vs the Ray Data job.

    .venv/bin/python bench/teacher_embed.py [--texts 20000] [--actors 1 2]

In one run, on the same N texts (demo captions and NLI-like sentences of mixed length):
(a) baseline: one process, ``Teacher.encode`` (SentenceTransformer.encode, all cores);
(b) the teacher job (``pipeline.steps.teacher_embed``) on a local Ray instance, for each
    actor count, timed with start-up (Ray, actors, model loads) and without it (first
    shard start to last shard end). Prints texts/s, tokens/s and the ratio (b)/(a);
    writes bench/results/teacher_embed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

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


def write_text_groups(root: str, texts: list[str], rows_per_shard: int, config_hash: str
                      ) -> None:
    """Write the texts as a complete prepare_data/text_groups output (groups of 3)."""
    folder = storage.join(root, "prepare_data", "text_groups")
    groups = [texts[i:i + 3] for i in range(0, len(texts), 3)]
    rows = [{"id": f"g{i}", "texts": g} for i, g in enumerate(groups)]
    output = ShardedOutput(folder, config_hash, TEXT_GROUPS)
    output.claim()
    shards = chunk(rows, rows_per_shard)
    for i, shard in enumerate(shards):
        output.write_shard(i, pa.Table.from_pylist(shard, schema=TEXT_GROUPS), [])
    output.finish(rows_in=len(rows), num_shards=len(shards), seconds=0.0)


def baseline(texts: list[str], batch_size: int) -> dict:
    import torch

    from pipeline.models.teacher import Teacher

    torch.set_num_threads(os.cpu_count() or 1)
    teacher = Teacher(None)
    tokens = sum(teacher.token_lengths(texts))
    start = time.perf_counter()
    teacher.encode(texts, batch_size=batch_size)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "texts_per_s": len(texts) / seconds,
            "tokens_per_s": tokens / seconds, "tokens": tokens}


def ray_job(texts: list[str], actors: int, batch_size: int, rows_per_shard: int) -> dict:
    import ray

    from pipeline.ray_utils import init_ray
    from pipeline.steps.teacher_embed import run as teacher_embed

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(os.path.join(os.path.dirname(__file__), "..", "jobs", "configs",
                                          "demo.yaml"),
                             [f"output_root={tmp}", f"teacher.num_actors={actors}",
                              f"teacher.batch_size={batch_size}", "ray.progress_bars=false",
                              f"ray.num_cpus={max(4, actors + 1)}"])
        write_text_groups(tmp, texts, rows_per_shard, config.config_hash)
        start = time.perf_counter()
        init_ray(config)
        manifest = teacher_embed(config)
        total = time.perf_counter() - start
        folder = config.step_dir("teacher_embed")
        output = ShardedOutput(folder, config.config_hash, pa.schema([]))
        stats = [storage.read_json(output.stats_uri(i)) for i in range(manifest["num_shards"])]
        ray.shutdown()
    busy = max(s["finished_at"] for s in stats) - min(s["started_at"] for s in stats)
    tokens = manifest["tokens_embedded"]
    return {"actors": actors, "seconds_with_startup": total, "seconds_without_startup": busy,
            "texts_per_s_with_startup": len(texts) / total,
            "texts_per_s": len(texts) / busy, "tokens_per_s": tokens / busy,
            "shards": manifest["num_shards"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=20000)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rows-per-shard", type=int, default=500)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "teacher_embed.json"))
    args = parser.parse_args()
    texts = make_texts(args.texts)
    base = baseline(texts, args.batch_size)
    print(f"(a) SentenceTransformer.encode, 1 process: {base['texts_per_s']:.0f} texts/s, "
          f"{base['tokens_per_s']:.0f} tokens/s ({base['seconds']:.1f} s)")
    runs = []
    for actors in args.actors:
        run = ray_job(texts, actors, args.batch_size, args.rows_per_shard)
        run["ratio_vs_baseline"] = run["texts_per_s"] / base["texts_per_s"]
        run["ratio_vs_baseline_with_startup"] = (run["texts_per_s_with_startup"]
                                                 / base["texts_per_s"])
        runs.append(run)
        print(f"(b) Ray Data job, {actors} actor(s): {run['texts_per_s']:.0f} texts/s, "
              f"{run['tokens_per_s']:.0f} tokens/s without start-up "
              f"(ratio {run['ratio_vs_baseline']:.2f}); {run['texts_per_s_with_startup']:.0f} "
              f"texts/s with start-up (ratio {run['ratio_vs_baseline_with_startup']:.2f})")
    result = {"texts": args.texts, "batch_size": args.batch_size, "cpu_count": os.cpu_count(),
              "baseline": base, "ray_job": runs}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
