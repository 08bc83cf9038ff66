"""Recall of an approximate (IVF) search against the exact one.

Imports ``search.py`` (for the exact reference) and is imported by nothing in
``pipeline.mining`` but the package ``__init__``, so it closes no import cycle.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipeline.mining.search import search_topk

logger = logging.getLogger(__name__)


def measure_recall(exact_ids: np.ndarray, approx_ids: np.ndarray) -> float:
    """Recall@k of ``approx_ids`` against ``exact_ids``, both (Q, k) int64.

    Per query: |approx ∩ exact| / |exact|, ignoring -1 padding; averaged over queries
    that have at least one exact id. Exact results that tie at the k-th score can make
    this slightly below 1 even for an exact search.
    """
    exact_ids = np.asarray(exact_ids)
    approx_ids = np.asarray(approx_ids)
    if exact_ids.ndim != 2 or exact_ids.shape[0] != approx_ids.shape[0]:
        raise ValueError(f"need (Q, k) arrays with the same Q, got {exact_ids.shape} and "
                         f"{approx_ids.shape}")
    hits = np.zeros(exact_ids.shape[0], dtype=np.int64)  # (Q,)
    rows = max(1, (1 << 24) // max(1, exact_ids.shape[1] * approx_ids.shape[1]))
    for r0 in range(0, exact_ids.shape[0], rows):
        exact = exact_ids[r0:r0 + rows, :, None]  # (r, k, 1)
        approx = approx_ids[r0:r0 + rows, None, :]  # (r, 1, ka)
        found = (exact == approx).any(axis=2) & (exact[:, :, 0] >= 0)  # (r, k)
        hits[r0:r0 + rows] = found.sum(axis=1)  # (r,)
    n_exact = (exact_ids >= 0).sum(axis=1)  # (Q,)
    has_exact = n_exact > 0
    if not has_exact.any():
        raise ValueError("measure_recall: exact_ids holds no valid id")
    return float(np.mean(hits[has_exact] / n_exact[has_exact]))


def estimate_recall(queries: np.ndarray, candidates: np.ndarray, approx_ids: np.ndarray, *,
                    sample_size: int = 1000, seed: int = 0, backend: str = "auto",
                    **search_kwargs: Any) -> float:
    """Recall@k of ``approx_ids`` (Q, k) on a seeded sample of queries, against an exact
    flat search of those queries (``search_kwargs`` go to ``search_topk``)."""
    rng = np.random.default_rng(seed)
    n_queries = queries.shape[0]
    sample = np.sort(rng.choice(n_queries, size=min(sample_size, n_queries), replace=False))
    exact = search_topk(queries[sample], candidates, approx_ids.shape[1], backend=backend,
                        build="flat", **search_kwargs)
    recall = measure_recall(exact.ids, approx_ids[sample])
    logger.info("recall@%d on %d sampled queries: %.4f", approx_ids.shape[1], sample.size,
                recall)
    return recall
