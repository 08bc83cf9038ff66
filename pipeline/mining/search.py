"""Exact (blockwise) and approximate (IVF) inner-product top-k search.

Arrays in, arrays out: no Ray, no files, no configs. Embeddings are expected to be
L2-normalised, so inner product = cosine similarity.

Exact search is ``scores = queries @ candidates.T`` followed by a per-row top-k, done in
tiles of at most ``(query_block_size, block_size)`` with a running top-k merge, so the full
``(Q, N)`` similarity matrix never exists. Backends:

- ``"faiss"``: faiss-cpu brute force (``faiss.knn``) per tile, merged in a C++ heap
  (``faiss.ResultHeap``), with ``num_threads`` OpenMP threads.
- ``"faiss_gpu"``: ``GpuIndexFlatIP`` per candidate block (fp32, exact); k <= 2048.
- ``"torch"``: matmul + ``torch.topk`` per tile on ``device`` (CUDA when available) in
  ``dtype``; the candidates are moved to the device once (N * d * itemsize bytes). A
  low-precision (bf16/fp16) pass keeps ``rescore_factor * k`` candidates and re-scores
  them in fp32: returned scores are fp32 dot products, but a true top-k item that bf16
  ranked below ``rescore_factor * k`` is missed (measure with ``recall.measure_recall``).
- ``"auto"``: ``faiss_gpu`` when faiss has GPU support and sees a GPU, else ``faiss``.

``build="ivf"`` swaps the exact search for a faiss ``IndexIVFFlat`` (``ivf.search_ivf``);
measure what it costs with ``recall.estimate_recall``.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Literal, NamedTuple

import faiss
import numpy as np
import torch

from pipeline.mining.common import FAISS_GPU_MAX_K, block_ranges, faiss_threads
from pipeline.mining.ivf import search_ivf

logger = logging.getLogger(__name__)

Backend = Literal["auto", "faiss", "faiss_gpu", "torch"]
Build = Literal["flat", "ivf"]
BACKENDS: tuple[str, ...] = ("auto", "faiss", "faiss_gpu", "torch")
BUILDS: tuple[str, ...] = ("flat", "ivf")
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_RESCORE_CHUNK_ELEMENTS = 1 << 26  # fp32 elements gathered per re-score chunk (256 MiB)


class SearchResult(NamedTuple):
    """Top-k result: ``scores`` (Q, k) float32 descending, ``ids`` (Q, k) int64.

    Missing results (a group with fewer than k candidates, an IVF probe that found too
    few) have id -1 and score -inf. ``stats`` says what ran and what was clamped.
    """

    scores: np.ndarray
    ids: np.ndarray
    stats: dict[str, Any]


# -- public API ---------------------------------------------------------------------------
def search_topk(
    queries: np.ndarray,
    candidates: np.ndarray,
    k: int,
    *,
    backend: Backend = "auto",
    block_size: int = 65536,
    query_block_size: int = 4096,
    dtype: str = "float32",
    device: str | None = None,
    rescore_factor: int = 2,
    num_threads: int | None = None,
    build: Build = "flat",
    nlist: int | None = None,
    nprobe: int = 1,
    train_size: int | None = None,
    seed: int = 0,
) -> SearchResult:
    """Top-``k`` candidates by inner product for every query.

    Args:
        queries: (Q, d) query embeddings.
        candidates: (N, d) candidate embeddings; ids are row numbers in this array.
        k: results per query. ``k > N`` is clamped to ``N`` with a WARNING and
            ``stats["k_clamped"] = True``: the result then has ``N`` columns.
        backend: "auto" | "faiss" | "faiss_gpu" | "torch" (see module docstring).
            "faiss_gpu" raises if faiss has no GPU support or sees no GPU.
        block_size: candidate rows per tile (exact search).
        query_block_size: query rows per tile.
        dtype: matmul dtype of the torch backend ("float32" | "bfloat16" | "float16");
            the faiss backends only do "float32" (others raise).
        device: torch device; None = "cuda" if available else "cpu".
        rescore_factor: low-precision torch search keeps ``rescore_factor * k`` candidates
            per query and re-scores them in fp32 before cutting to ``k``.
        num_threads: OpenMP threads for faiss (restored afterwards); None = faiss default.
        build: "flat" (exact) or "ivf" (approximate, faiss backends only).
        nlist, nprobe, train_size, seed: IVF parameters (``ivf.search_ivf``).

    Returns:
        SearchResult(scores (Q, k') float32 descending, ids (Q, k') int64, stats) with
        ``k' = min(k, N)``.
    """
    queries, candidates = _as_float32_pair(queries, candidates)
    _validate_common(k, block_size, query_block_size, rescore_factor, build, dtype, backend)
    n_candidates = candidates.shape[0]
    if n_candidates == 0:
        raise ValueError("search_topk: no candidates (N = 0)")
    k_out = min(k, n_candidates)
    if k_out < k:
        logger.warning("k=%d > number of candidates N=%d: returning %d columns",
                       k, n_candidates, k_out)
    resolved = resolve_backend(backend)
    result = _search_resolved(queries, candidates, k_out, backend=resolved, block_size=block_size,
                              query_block_size=query_block_size, dtype=dtype, device=device,
                              rescore_factor=rescore_factor, num_threads=num_threads,
                              build=build, nlist=nlist, nprobe=nprobe,
                              train_size=train_size, seed=seed)
    result.stats.update(backend_requested=backend, k_requested=k, k_clamped=k_out < k)
    return result


def search_within_groups(
    queries: np.ndarray,
    q_groups: np.ndarray,
    candidates: np.ndarray,
    c_groups: np.ndarray,
    k: int,
    **search_kwargs: Any,
) -> SearchResult:
    """Top-``k`` per query among the candidates of the query's own group (e.g. dataset).

    Each group's queries are searched against that group's candidates only; returned ids
    are row numbers in the GLOBAL ``candidates`` array. The result always has ``k``
    columns: a group with fewer than ``k`` candidates (or none) is padded with id -1 and
    score -inf, logged at WARNING and listed in ``stats["groups_short"]``.
    ``search_kwargs`` are those of ``search_topk`` (with ``build="ivf"``, ``nlist`` applies
    to every group and must not exceed the smallest searched group), plus
    ``warn_short_groups`` (default True: the WARNING above).
    """
    queries, candidates = _as_float32_pair(queries, candidates)
    q_groups = _as_group_labels(q_groups, queries.shape[0], "q_groups")
    c_groups = _as_group_labels(c_groups, candidates.shape[0], "c_groups")
    backend = search_kwargs.pop("backend", "auto")
    warn_short_groups = search_kwargs.pop("warn_short_groups", True)
    _validate_common(k, search_kwargs.get("block_size", 1), search_kwargs.get("query_block_size", 1),
                     search_kwargs.get("rescore_factor", 1), search_kwargs.get("build", "flat"),
                     search_kwargs.get("dtype", "float32"), backend)
    resolved = resolve_backend(backend)
    start = time.perf_counter()
    scores = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)  # (Q, k)
    ids = np.full((queries.shape[0], k), -1, dtype=np.int64)  # (Q, k)
    per_group: dict[Any, dict[str, int]] = {}
    for group in np.unique(q_groups):
        q_rows = np.flatnonzero(q_groups == group)  # (Qg,)
        c_rows = np.flatnonzero(c_groups == group)  # (Ng,)
        k_group = min(k, c_rows.size)
        per_group[_plain(group)] = {"n_queries": int(q_rows.size),
                                    "n_candidates": int(c_rows.size), "k": k_group}
        if k_group == 0:
            continue
        res = _search_resolved(queries[q_rows], candidates[c_rows], k_group, backend=resolved,
                               **search_kwargs)
        found = res.ids >= 0  # (Qg, k_group)
        ids[q_rows, :k_group] = np.where(found, c_rows[np.maximum(res.ids, 0)], -1)
        scores[q_rows, :k_group] = res.scores
    short = [g for g, s in per_group.items() if s["k"] < k]
    if short and warn_short_groups:
        logger.warning("%d of %d groups have fewer than k=%d candidates (padded with -1): %s",
                       len(short), len(per_group), k, short[:20])
    stats = {"backend": resolved, "backend_requested": backend, "k_requested": k,
             "groups": per_group, "groups_short": short,
             "queries_short": int(sum(per_group[g]["n_queries"] for g in short)),
             "n_queries": int(queries.shape[0]), "n_candidates": int(candidates.shape[0]),
             "seconds": time.perf_counter() - start}
    return SearchResult(scores, ids, stats)


def faiss_gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_backend(backend: str) -> str:
    """Concrete backend for ``backend``; "auto" is resolved (and logged) here."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        chosen = "faiss_gpu" if faiss_gpu_available() else "faiss"
        logger.info("search backend auto -> %s (faiss GPUs: %d)", chosen, faiss.get_num_gpus())
        return chosen
    if backend == "faiss_gpu" and not faiss_gpu_available():
        raise RuntimeError(
            "backend='faiss_gpu' requested but faiss has no GPU support or sees no GPU "
            f"(faiss {faiss.__version__}, get_num_gpus()={faiss.get_num_gpus()}); "
            "install faiss-gpu on a GPU machine or choose backend='faiss' / 'torch'")
    return backend


# -- dispatch -----------------------------------------------------------------------------
def _search_resolved(queries: np.ndarray, candidates: np.ndarray, k: int, *, backend: str,
                     block_size: int = 65536, query_block_size: int = 4096,
                     dtype: str = "float32", device: str | None = None,
                     rescore_factor: int = 2, num_threads: int | None = None,
                     build: str = "flat", nlist: int | None = None, nprobe: int = 1,
                     train_size: int | None = None, seed: int = 0) -> SearchResult:
    """Search with a concrete backend and ``1 <= k <= N``."""
    start = time.perf_counter()
    stats: dict[str, Any] = {"backend": backend, "build": build, "k": k,
                             "n_queries": int(queries.shape[0]),
                             "n_candidates": int(candidates.shape[0])}
    if backend == "faiss_gpu" and k > FAISS_GPU_MAX_K:
        raise ValueError(f"backend='faiss_gpu' supports k <= {FAISS_GPU_MAX_K}, got k={k}")
    if build == "ivf":
        scores, ids, ivf_stats = search_ivf(
            queries, candidates, k, gpu=backend == "faiss_gpu", nlist=nlist, nprobe=nprobe,
            train_size=train_size, seed=seed, query_block_size=query_block_size,
            num_threads=num_threads)
        stats.update(ivf_stats)
    elif backend == "torch":
        torch_device = _torch_device(device)
        scores, ids = _torch_topk(queries, candidates, k, block_size=block_size,
                                  query_block_size=query_block_size, dtype=TORCH_DTYPES[dtype],
                                  device=torch_device, rescore_factor=rescore_factor)
        stats.update(device=str(torch_device), dtype=dtype)
    else:
        with faiss_threads(num_threads):
            scores, ids = _faiss_flat_topk(queries, candidates, k, block_size=block_size,
                                           query_block_size=query_block_size,
                                           gpu=backend == "faiss_gpu")
            stats.update(num_threads=faiss.omp_get_max_threads(), dtype="float32")
    stats["seconds"] = time.perf_counter() - start
    logger.debug("searched %d x %d (k=%d) with %s/%s in %.2fs", queries.shape[0],
                 candidates.shape[0], k, backend, build, stats["seconds"])
    return SearchResult(scores, ids, stats)


# -- faiss flat ---------------------------------------------------------------------------
def _faiss_flat_topk(queries: np.ndarray, candidates: np.ndarray, k: int, *,
                     block_size: int, query_block_size: int,
                     gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k: candidate blocks outer (each moved to the GPU once), query blocks inner,
    merged into one faiss heap of (Q, k)."""
    heap = faiss.ResultHeap(queries.shape[0], k, keep_max=True)  # D, I: (Q, k)
    gpu_res = faiss.StandardGpuResources() if gpu else None
    for c0, c1 in block_ranges(candidates.shape[0], block_size):
        search_block = _block_searcher(candidates[c0:c1], gpu_res)
        k_block = min(k, c1 - c0)
        for q0, q1 in block_ranges(queries.shape[0], query_block_size):
            block_scores, block_ids = search_block(queries[q0:q1], k_block)  # (qb, k_block)
            heap.add_result_subset(np.arange(q0, q1, dtype=np.int64), block_scores,
                                   block_ids + c0)
    heap.finalize()
    return heap.D, heap.I


def _block_searcher(block: np.ndarray, gpu_res: Any) -> Any:
    """A function (queries (qb, d), k) -> (scores, ids) (qb, k) over one candidate block."""
    if gpu_res is None:
        return lambda q, k: faiss.knn(q, block, k, metric=faiss.METRIC_INNER_PRODUCT)
    index = faiss.GpuIndexFlatIP(gpu_res, block.shape[1])
    index.add(block)
    return index.search


# -- torch --------------------------------------------------------------------------------
def _torch_topk(queries: np.ndarray, candidates: np.ndarray, k: int, *, block_size: int,
                query_block_size: int, dtype: torch.dtype, device: torch.device,
                rescore_factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k with torch matmul + topk per tile, running merge per query block."""
    low_precision = dtype != torch.float32
    k_fetch = min(candidates.shape[0], k * rescore_factor) if low_precision else k
    starts = [c0 for c0, _ in block_ranges(candidates.shape[0], block_size)]
    cand_blocks = [torch.from_numpy(candidates[c0:c1]).to(device, dtype)  # (nb, d)
                   for c0, c1 in block_ranges(candidates.shape[0], block_size)]
    out_scores = np.empty((queries.shape[0], k), dtype=np.float32)  # (Q, k)
    out_ids = np.empty((queries.shape[0], k), dtype=np.int64)  # (Q, k)
    with torch.inference_mode():
        for q0, q1 in block_ranges(queries.shape[0], query_block_size):
            q_block = torch.from_numpy(queries[q0:q1]).to(device, dtype)  # (qb, d)
            best_scores, best_ids = _torch_block_scan(q_block, cand_blocks, starts, k_fetch)
            if low_precision:
                best_scores, best_ids = _rescore_fp32(queries[q0:q1], candidates, best_ids, k,
                                                      device)
            out_scores[q0:q1] = best_scores.float().cpu().numpy()
            out_ids[q0:q1] = best_ids.cpu().numpy()
    return out_scores, out_ids


def _torch_block_scan(q_block: torch.Tensor, cand_blocks: list[torch.Tensor], starts: list[int],
                      k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k of one query block over all candidate blocks: (qb, k) scores, ids."""
    best_scores = q_block.new_empty((q_block.shape[0], 0))  # (qb, 0)
    best_ids = torch.empty((q_block.shape[0], 0), dtype=torch.int64, device=q_block.device)
    for c0, c_block in zip(starts, cand_blocks, strict=True):
        tile = q_block @ c_block.T  # (qb, nb)
        tile_scores, tile_ids = torch.topk(tile, min(k, tile.shape[1]), dim=1)  # (qb, kb)
        merged_scores = torch.cat([best_scores, tile_scores], dim=1)  # (qb, k + kb)
        merged_ids = torch.cat([best_ids, tile_ids + c0], dim=1)  # (qb, k + kb)
        best_scores, pos = torch.topk(merged_scores, min(k, merged_scores.shape[1]), dim=1)
        best_ids = torch.gather(merged_ids, 1, pos)  # (qb, k)
    return best_scores, best_ids


def _rescore_fp32(q_block: np.ndarray, candidates: np.ndarray, cand_ids: torch.Tensor, k: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact fp32 scores of the preselected ``cand_ids`` (qb, kf); keep the best ``k``."""
    ids_cpu = cand_ids.cpu()  # (qb, kf)
    rows = max(1, _RESCORE_CHUNK_ELEMENTS // (ids_cpu.shape[1] * candidates.shape[1]))
    cand_all = torch.from_numpy(candidates)  # (N, d) fp32, no copy
    scores = []
    for r0 in range(0, ids_cpu.shape[0], rows):
        gathered = cand_all[ids_cpu[r0:r0 + rows]].to(device)  # (r, kf, d)
        q = torch.from_numpy(q_block[r0:r0 + rows]).to(device)  # (r, d)
        scores.append(torch.einsum("rkd,rd->rk", gathered, q))  # (r, kf)
    exact = torch.cat(scores)  # (qb, kf)
    best_scores, pos = torch.topk(exact, k, dim=1)  # (qb, k)
    return best_scores, torch.gather(cand_ids.to(device), 1, pos)


def _torch_device(device: str | None) -> torch.device:
    """Requested torch device; None = CUDA when available. An unavailable CUDA raises."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        logger.info("torch search device: %s", device)
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"torch search on {device!r} requested but CUDA is not available")
    return resolved


# -- helpers ------------------------------------------------------------------------------
def _as_float32_pair(queries: np.ndarray,
                     candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C-contiguous float32 (Q, d) and (N, d) arrays with the same d."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, d)
    candidates = np.ascontiguousarray(candidates, dtype=np.float32)  # (N, d)
    if queries.ndim != 2 or candidates.ndim != 2:
        raise ValueError(f"queries and candidates must be 2-D, got {queries.shape} and "
                         f"{candidates.shape}")
    if queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"dimension mismatch: queries d={queries.shape[1]}, "
                         f"candidates d={candidates.shape[1]}")
    return queries, candidates


def _as_group_labels(groups: np.ndarray, n: int, name: str) -> np.ndarray:
    """A 1-D label array of length ``n``."""
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {groups.shape}")
    return groups


def _validate_common(k: int, block_size: int, query_block_size: int, rescore_factor: int,
                     build: str, dtype: str, backend: str) -> None:
    """Argument checks shared by the public entry points (errors before any work)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if block_size < 1 or query_block_size < 1:
        raise ValueError(f"block sizes must be >= 1, got block_size={block_size}, "
                         f"query_block_size={query_block_size}")
    if rescore_factor < 1:
        raise ValueError(f"rescore_factor must be >= 1, got {rescore_factor}")
    if build not in BUILDS:
        raise ValueError(f"unknown build {build!r}; expected one of {BUILDS}")
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {tuple(TORCH_DTYPES)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if dtype != "float32" and backend != "torch":
        raise ValueError(f"dtype={dtype!r} is only supported by backend='torch' "
                         f"(faiss searches in float32), got backend={backend!r}")
    if build == "ivf" and backend == "torch":
        raise ValueError("build='ivf' needs a faiss backend ('faiss', 'faiss_gpu' or 'auto')")
    if backend == "faiss_gpu" and k > FAISS_GPU_MAX_K:
        raise ValueError(f"backend='faiss_gpu' supports k <= {FAISS_GPU_MAX_K} "
                         f"(FAISS GPU limit), got k={k}")


def _plain(value: Any) -> Any:
    """A numpy scalar as a plain Python value (for stats/manifests)."""
    return value.item() if isinstance(value, np.generic) else value
