"""Approximate search for very large corpora (faiss IndexIVFFlat).

IVF partitions the candidates into ``nlist`` k-means cells (trained on a seeded sample)
and scans only the ``nprobe`` cells nearest each query: ``nprobe = nlist`` scans every
cell (exact up to ties), ``nprobe = 1`` is fastest and least accurate. Always measure
what it costs (``recall.estimate_recall``) and write the number next to the mined
negatives. Called by ``search.search_topk(build="ivf")``; imports only ``common.py``.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import faiss
import numpy as np

from pipeline.mining.common import FAISS_GPU_MAX_K, block_ranges, faiss_threads

logger = logging.getLogger(__name__)

_ADD_BLOCK_ROWS = 1 << 16  # candidates added to the index per call


def search_ivf(queries: np.ndarray, candidates: np.ndarray, k: int, *, gpu: bool,
               nlist: int | None, nprobe: int, train_size: int | None, seed: int,
               query_block_size: int,
               num_threads: int | None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Approximate top-k with an IVF index: (Q, k) scores, (Q, k) ids (-1 / -inf missing).

    ``train_size`` None = ``min(N, 256 * nlist)`` (faiss's own cap on k-means points).
    """
    n_candidates = candidates.shape[0]
    _validate_ivf(n_candidates, nlist, nprobe, gpu)
    train_size = min(n_candidates, 256 * nlist) if train_size is None else train_size
    if not nlist <= train_size <= n_candidates:
        raise ValueError(f"train_size must be in [nlist={nlist}, N={n_candidates}], "
                         f"got {train_size}")
    with faiss_threads(num_threads):
        start = time.perf_counter()
        index = build_ivf_index(candidates, nlist, train_size=train_size, seed=seed)
        build_s = time.perf_counter() - start
        if gpu:
            gpu_res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(gpu_res, 0, index)
        _set_nprobe(index, nprobe, gpu)
        scores = np.empty((queries.shape[0], k), dtype=np.float32)  # (Q, k)
        ids = np.empty((queries.shape[0], k), dtype=np.int64)  # (Q, k)
        for q0, q1 in block_ranges(queries.shape[0], query_block_size):
            scores[q0:q1], ids[q0:q1] = index.search(queries[q0:q1], k)  # (qb, k)
    missing = ids < 0  # (Q, k)
    scores[missing] = -np.inf
    n_missing = int(missing.sum())
    if n_missing:
        logger.warning("IVF search (nlist=%d, nprobe=%d) returned fewer than k=%d results for "
                       "%d queries (%d slots padded with -1)", nlist, nprobe, k,
                       int(missing.any(axis=1).sum()), n_missing)
    stats = {"nlist": nlist, "nprobe": nprobe, "train_size": train_size,
             "build_seconds": build_s, "n_missing": n_missing}
    return scores, ids, stats


def build_ivf_index(candidates: np.ndarray, nlist: int, *, train_size: int,
                    seed: int) -> faiss.IndexIVFFlat:
    """CPU ``IndexIVFFlat`` (inner product) trained on ``train_size`` seeded sample rows."""
    dim = candidates.shape[1]
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(candidates.shape[0], size=train_size, replace=False))
    index.train(candidates[sample])  # (train_size, d)
    for c0, c1 in block_ranges(candidates.shape[0], _ADD_BLOCK_ROWS):
        index.add(candidates[c0:c1])
    return index


def _set_nprobe(index: faiss.Index, nprobe: int, gpu: bool) -> None:
    """Set nprobe through faiss's parameter space (raises on an index without it)."""
    space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", nprobe)


def _validate_ivf(n_candidates: int, nlist: int | None, nprobe: int, gpu: bool) -> None:
    """IVF argument checks (errors, never clamps)."""
    if nlist is None or nlist < 1:
        raise ValueError(f"build='ivf' needs nlist >= 1, got {nlist}")
    if nlist > n_candidates:
        raise ValueError(f"nlist={nlist} exceeds the number of candidates N={n_candidates}")
    if not 1 <= nprobe <= nlist:
        raise ValueError(f"nprobe must be in [1, nlist={nlist}], got {nprobe}")
    if gpu and nprobe > FAISS_GPU_MAX_K:
        raise ValueError(f"faiss GPU supports nprobe <= {FAISS_GPU_MAX_K}, got {nprobe}")
