"""Benchmark: our mining search + filter vs sentence-transformers' mine_hard_negatives.

    .venv/bin/python bench/mining.py [--sizes 20000 40000 80000 160000] [--dims 384 1024]
                                     [--repeats 3]

In one run, on the same synthetic embeddings (Q queries, N corpus rows = Q positives +
N - Q other documents, unit vectors with near-duplicates and true neighbours), for each
(N, d): (a) ``sentence_transformers.util.mine_hard_negatives`` with FAISS and (b) our
``search_topk`` (faiss backend, blockwise) + ``select_negatives``, with equivalent settings
(UniME margin 0.1 = their absolute_margin=-0.1, 8 negatives from the top 64). Each side runs
``--repeats`` times, alternating which goes first (the machine is shared and noisy); the
speed-up is the median of the per-repetition ratios (a)/(b), with its min and max. Also the
agreement of the chosen negatives, and the search's rate as a share of this machine's GEMM
limit: the best of every BLAS library present (``bench/machine.py``), measured in this
process before each d. Writes bench/results/mining.json.

``datasets`` is not installed here: tests/st_standins.py supplies a minimal in-memory
``datasets.Dataset`` and a model whose ``encode`` returns the fixed vectors, so both
sides see identical embeddings.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench.machine import describe, gemm_limit  # noqa: E402
from pipeline.mining import search_topk, select_negatives  # noqa: E402
from tests.st_standins import (  # noqa: E402
    FixedEmbeddingModel,
    InMemoryDataset,
    enable_mine_hard_negatives,
)

NUM_NEGATIVES, RANGE_MAX, MARGIN = 8, 64, 0.1


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_world(n: int, q: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(Q, d) queries and (N, d) corpus: rows [0, Q) are the positives, some docs are
    near a query (hard negatives), a few copy a positive (false negatives)."""
    rng = np.random.default_rng(seed)
    queries = unit(rng.standard_normal((q, d)))                          # (Q, d)
    corpus = unit(rng.standard_normal((n, d)))                           # (N, d)
    corpus[:q] = unit(queries + 0.7 * unit(rng.standard_normal((q, d))))
    near = rng.integers(0, q, size=(n - q) // 4)
    corpus[q:q + near.size] = unit(queries[near] + 0.9 * unit(rng.standard_normal((near.size, d))))
    return queries, corpus


def st_mine(queries: np.ndarray, corpus: np.ndarray) -> tuple[float, list[list[str]]]:
    hard_negatives = enable_mine_hard_negatives()
    q, n = len(queries), len(corpus)
    q_text = [f"q{i}" for i in range(q)]
    c_text = [f"c{i}" for i in range(n)]
    model = FixedEmbeddingModel(dict(zip(q_text + c_text, np.concatenate([queries, corpus]),
                                         strict=True)))
    start = time.perf_counter()
    out = hard_negatives.mine_hard_negatives(
        InMemoryDataset({"anchor": q_text, "positive": c_text[:q]}), model,
        corpus=c_text[q:], num_negatives=NUM_NEGATIVES, range_max=RANGE_MAX,
        absolute_margin=-MARGIN, sampling_strategy="top", use_faiss=True,
        output_format="labeled-list", verbose=False, batch_size=4096)
    seconds = time.perf_counter() - start
    negatives = {a: texts[1:] for a, texts in zip(out["anchor"], out["positive"], strict=True)}
    return seconds, [negatives.get(t, []) for t in q_text]


def our_mine(queries: np.ndarray, corpus: np.ndarray) -> tuple[float, float, list[list[str]]]:
    start = time.perf_counter()
    scores, ids, _ = search_topk(queries, corpus, RANGE_MAX + 1, backend="faiss",
                                 block_size=65536, query_block_size=4096)
    search_seconds = time.perf_counter() - start
    pos_ids = np.arange(len(queries))                                    # (Q,)
    pos_scores = (queries * corpus[:len(queries)]).sum(axis=1)           # (Q,)
    keys = np.arange(len(corpus), dtype=np.int64)
    selection = select_negatives(scores, ids, pos_scores, pos_ids, keys, pos_ids,
                                 num_negatives=NUM_NEGATIVES, fn_margin=MARGIN,
                                 range_max=RANGE_MAX)
    seconds = time.perf_counter() - start
    return seconds, search_seconds, [[f"c{i}" for i in row if i >= 0]
                                     for row in selection.neg_ids]


def ratio_stats(ratios: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(ratios), 4), "min": round(min(ratios), 4),
            "max": round(max(ratios), 4), "repeats": len(ratios)}


def bench_size(queries: np.ndarray, corpus: np.ndarray, repeats: int) -> dict:
    """Both sides ``repeats`` times, alternating which runs first."""
    st_times, ours_times, search_times, ratios = [], [], [], []
    st_neg = ours_neg = None
    for rep in range(repeats):
        order = ("st", "ours") if rep % 2 == 0 else ("ours", "st")
        for side in order:
            if side == "st":
                st_seconds, st_neg = st_mine(queries, corpus)
            else:
                ours_seconds, search_seconds, ours_neg = our_mine(queries, corpus)
        st_times.append(st_seconds)
        ours_times.append(ours_seconds)
        search_times.append(search_seconds)
        ratios.append(st_seconds / ours_seconds)
    agree = float(np.mean([a == b for a, b in zip(st_neg, ours_neg, strict=True)]))
    return {"st_seconds": statistics.median(st_times),
            "ours_seconds": statistics.median(ours_times),
            "ours_search_seconds": statistics.median(search_times),
            "speedup": ratio_stats(ratios), "identical_negatives": agree}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 40000, 80000, 160000])
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 1024])
    parser.add_argument("--queries", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "mining.json"))
    args = parser.parse_args(argv)
    runs, limits = [], {}
    for d in args.dims:
        limit = limits[d] = gemm_limit(d)
        print(f"d={d}: GEMM limit {limit['gflops']:.0f} GFLOP/s ({limit['library']}; "
              + ", ".join(f"{k} {v:.0f}" for k, v in limit["rates"].items()) + ")")
        for n in args.sizes:
            queries, corpus = make_world(n, args.queries, d)
            run = {"n": n, "d": d, "queries": len(queries),
                   **bench_size(queries, corpus, args.repeats)}
            search_gflops = 2.0 * len(queries) * n * d / run["ours_search_seconds"] / 1e9
            run.update(search_gflops=round(search_gflops, 1),
                       fraction_of_gemm_limit=round(search_gflops / limit["gflops"], 4))
            runs.append(run)
            ratio = run["speedup"]
            print(f"  N={n:>7}: mine_hard_negatives {run['st_seconds']:6.2f} s | ours "
                  f"{run['ours_seconds']:6.2f} s (search {run['ours_search_seconds']:.2f} s) | "
                  f"speed-up {ratio['median']:.2f}x [{ratio['min']:.2f}, {ratio['max']:.2f}] | "
                  f"identical negatives {run['identical_negatives']:.1%} | search at "
                  f"{run['fraction_of_gemm_limit']:.0%} of the GEMM limit")
    result = {"machine": describe(), "num_negatives": NUM_NEGATIVES, "range_max": RANGE_MAX,
              "margin": MARGIN, "repeats": args.repeats, "gemm_limit": limits, "runs": runs}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
