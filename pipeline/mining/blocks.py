"""Exact grouped top-k over candidates that arrive block by block (a stream), so that only one
block of candidate vectors is ever in memory.

Arrays in, arrays out: no Ray, no files. Whoever holds the vectors (e.g. Parquet shards read
one piece at a time, :mod:`pipeline.data.mined`) hands them over as :class:`CandidateBlock`
(unit rows, their global ids, their groups). Each block is searched like the in-memory
candidates (:func:`search.search_within_groups`, any exact backend) and its top-k is merged
into a running (Q, k) top-k. The merge is exact: a query's global top-k lies in the union of
its per-block top-k's. Ties are broken by the lower global id, as a stable float64 argsort
of the whole group would.

On the way, :func:`search_blocks` gathers the scores of chosen (query, id) pairs (e.g. each
query's positive), so they too need no resident matrix.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np

from pipeline.mining.search import SearchResult, resolve_backend, search_within_groups

logger = logging.getLogger(__name__)


class CandidateBlock(NamedTuple):
    """A piece of the candidates: ``emb`` (n, D) unit rows, ``ids`` (n,) int64 global ids
    (distinct across the blocks of one pass), ``groups`` (n,) their group labels."""

    emb: np.ndarray
    ids: np.ndarray
    groups: np.ndarray


# groups needed (unique labels) -> a fresh pass over the candidates of those groups
BlockSource = Callable[[np.ndarray], Iterable[CandidateBlock]]


def search_blocks(queries: np.ndarray, q_groups: np.ndarray, blocks: Iterable[CandidateBlock],
                  k: int, *, score_ids: np.ndarray | None = None,
                  **search_kwargs: Any) -> tuple[SearchResult, np.ndarray | None]:
    """Top-``k`` per query among the streamed candidates of the query's own group.

    Args:
        queries: (Q, D) unit rows; ``q_groups`` (Q,) their groups.
        blocks: one pass over the candidates (empty blocks, blocks without a query's group
            and blocks of 1 row are fine).
        k: results per query; a group with fewer candidates is padded (id -1, score -inf),
            logged at WARNING unless ``warn_short_groups=False``, listed in ``groups_short``.
        score_ids: (Q,) a global id per query (-1: none) whose score to gather.
        search_kwargs: of :func:`search.search_within_groups` (backend, block sizes, dtype,
            threads...); ``build`` must be "flat" (IVF needs the whole matrix).

    Returns:
        (SearchResult with global ids, (Q,) float32 scores of ``score_ids``: nan where the id
        was not streamed; None without ``score_ids``).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if search_kwargs.get("build", "flat") != "flat":
        raise ValueError("search_blocks is exact (build='flat'); IVF needs the whole matrix")
    start = time.perf_counter()
    warn = search_kwargs.pop("warn_short_groups", True)
    requested = search_kwargs.pop("backend", "auto")
    search_kwargs["backend"] = resolve_backend(requested)  # resolved (and logged) once
    queries = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, D)
    q_groups = np.asarray(q_groups, dtype=object)  # (Q,)
    scores = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)  # (Q, k)
    ids = np.full((queries.shape[0], k), -1, dtype=np.int64)  # (Q, k)
    gathered = None if score_ids is None else np.full(queries.shape[0], np.nan, np.float32)
    sizes: dict[Any, int] = {}
    n_blocks = 0
    for block in blocks:
        n_blocks += 1
        for group, count in zip(*np.unique(np.asarray(block.groups, dtype=object),
                                           return_counts=True), strict=True):
            sizes[group] = sizes.get(group, 0) + int(count)
        if gathered is not None:
            _gather(queries, np.asarray(score_ids), block, gathered)
        _search_block(queries, q_groups, block, k, scores, ids, search_kwargs)
    stats = _stats(q_groups, sizes, k, warn, n_blocks, search_kwargs["backend"], requested)
    stats["seconds"] = time.perf_counter() - start
    return SearchResult(scores, ids, stats), gathered


def merge_topk(scores: np.ndarray, ids: np.ndarray, new_scores: np.ndarray,
               new_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of two (R, *) top lists: by score descending, ties by lower id,
    padding (id -1) last."""
    all_scores = np.concatenate([scores, new_scores], axis=1)  # (R, k + kb)
    all_ids = np.concatenate([ids, new_ids], axis=1)  # (R, k + kb)
    order = np.lexsort((all_ids, -all_scores, all_ids < 0), axis=1)[:, :k]  # (R, k)
    return (np.take_along_axis(all_scores, order, axis=1),  # (R, k)
            np.take_along_axis(all_ids, order, axis=1))  # (R, k)


def _search_block(queries: np.ndarray, q_groups: np.ndarray, block: CandidateBlock, k: int,
                  scores: np.ndarray, ids: np.ndarray, search_kwargs: dict[str, Any]) -> None:
    """Merge one block's top-k into ``scores``/``ids`` (Q, k), in place."""
    block_groups = np.asarray(block.groups, dtype=object)  # (n,)
    rows = np.flatnonzero(np.isin(q_groups, np.unique(block_groups)))  # (R,) queries served
    if not rows.size or not block_groups.size:
        return
    k_block = min(k, block_groups.size)
    found = search_within_groups(queries[rows], q_groups[rows], block.emb, block_groups,
                                 k_block, warn_short_groups=False, **search_kwargs)
    local = found.ids  # (R, k_block) rows of the block, -1 padding
    block_ids = np.asarray(block.ids, dtype=np.int64)  # (n,)
    global_ids = np.where(local >= 0, block_ids[np.maximum(local, 0)], -1)  # (R, k_block)
    scores[rows], ids[rows] = merge_topk(scores[rows], ids[rows], found.scores, global_ids, k)


def _gather(queries: np.ndarray, score_ids: np.ndarray, block: CandidateBlock,
            gathered: np.ndarray) -> None:
    """Scores of the (query, ``score_ids``) pairs whose id is in ``block``, in place."""
    block_ids = np.asarray(block.ids, dtype=np.int64)  # (n,)
    hit = np.flatnonzero(np.isin(score_ids, block_ids) & (score_ids >= 0))  # (h,)
    if not hit.size:
        return
    sorter = np.argsort(block_ids)  # (n,)
    rows = sorter[np.searchsorted(block_ids, score_ids[hit], sorter=sorter)]  # (h,)
    block_emb = np.asarray(block.emb, dtype=np.float32)
    gathered[hit] = (queries[hit] * block_emb[rows]).sum(axis=1)  # (h,)


def _stats(q_groups: np.ndarray, sizes: dict[Any, int], k: int, warn: bool, n_blocks: int,
           backend: str, requested: str) -> dict[str, Any]:
    """Stats in the shape of :func:`search.search_within_groups`'s, plus ``n_blocks``."""
    names, counts = np.unique(q_groups, return_counts=True)
    per_group = {_plain(g): {"n_queries": int(n), "n_candidates": sizes.get(g, 0),
                             "k": min(k, sizes.get(g, 0))}
                 for g, n in zip(names, counts, strict=True)}
    short = [g for g, s in per_group.items() if s["k"] < k]
    if short and warn:
        logger.warning("%d of %d groups have fewer than k=%d candidates (padded with -1): %s",
                       len(short), len(per_group), k, short[:20])
    return {"backend": backend, "backend_requested": requested, "k_requested": k,
            "groups": per_group, "groups_short": short,
            "queries_short": int(sum(per_group[g]["n_queries"] for g in short)),
            "n_queries": int(q_groups.size), "n_candidates": int(sum(sizes.values())),
            "n_blocks": n_blocks, "streamed": True}


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
