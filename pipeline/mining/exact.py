"""Search, filter, and search deeper where the filters left a row short, so that the mined
negatives equal those of an exhaustive search after the same filters.

Every filter judges a retrieved candidate by itself and the query's positive (self,
duplicate, margin, ratio, max score), or by the survivors ranked above it (repeat). So the
survivors among a query's top ``k`` are exactly the first survivors of its whole ranking,
and a row whose selection window is covered by them is final. A row that is not covered (a
weak positive: its top ``k`` all scored above ``pos + fn_margin``) is searched again with
twice the ``k``, up to the size of its group, until it is covered or the group is exhausted.

"Covered" means the survivors reach the end of the selection window: ``range_min +
num_negatives`` for ``top`` (capped by ``range_max``), ``range_max`` for ``range``; ``range``
without ``range_max`` samples from every survivor, so it searches each group whole.
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np

from pipeline.mining.common import FAISS_GPU_MAX_K
from pipeline.mining.filters import (
    COUNT_KEYS,
    NegativeSelection,
    select_negatives,
    summarize_counts,
)
from pipeline.mining.search import resolve_backend, search_within_groups

logger = logging.getLogger(__name__)


class MinedNegatives(NamedTuple):
    """``selection`` as :func:`select_negatives` returns it, for every query;
    ``searched_k`` (Q,) the k of the search its negatives come from (> the first k: the row
    was searched again); ``search_stats`` the first pass's stats plus the deeper passes."""

    selection: NegativeSelection
    searched_k: np.ndarray
    search_stats: dict[str, Any]


def survivors_needed(group_size: np.ndarray, *, num_negatives: int, selection: str = "top",
                     range_min: int = 0, range_max: int | None = None) -> np.ndarray:
    """(Q,) survivors each query needs before its selection can no longer change."""
    if selection == "top":
        end = range_min + num_negatives
        return np.full(group_size.shape, end if range_max is None else min(end, range_max))
    return group_size.copy() if range_max is None else np.full(group_size.shape, range_max)


def mine_within_groups(q_emb: np.ndarray, q_groups: np.ndarray, cand_emb: np.ndarray,
                       c_groups: np.ndarray, pos_scores: np.ndarray, pos_ids: np.ndarray,
                       cand_keys: np.ndarray, pos_keys: np.ndarray, *, search_k: int,
                       search_kwargs: dict[str, Any] | None = None,
                       select_kwargs: dict[str, Any] | None = None) -> MinedNegatives:
    """Hard negatives of every query among its group's candidates, exact after the filters.

    Args:
        q_emb: (Q, D) L2-normalised queries; ``q_groups`` (Q,) their groups.
        cand_emb: (N, D) L2-normalised candidates; ``c_groups`` (N,) their groups.
        pos_scores, pos_ids, cand_keys, pos_keys: as :func:`select_negatives` takes them.
        search_k: candidates retrieved per query in the first pass.
        search_kwargs: of :func:`search_within_groups` (backend, block sizes, build...).
        select_kwargs: of :func:`select_negatives` (num_negatives, filters, selection...).
    """
    search_kwargs, select_kwargs = dict(search_kwargs or {}), dict(select_kwargs or {})
    q_groups = np.asarray(q_groups, dtype=object)
    group_size = _group_sizes(q_groups, np.asarray(c_groups, dtype=object))  # (Q,)
    needed = survivors_needed(group_size, num_negatives=select_kwargs.get("num_negatives", 8),
                              selection=select_kwargs.get("selection", "top"),
                              range_min=select_kwargs.get("range_min", 0),
                              range_max=select_kwargs.get("range_max"))  # (Q,)
    rows, k = np.arange(q_emb.shape[0]), max(1, search_k)
    searched_k = np.zeros(q_emb.shape[0], dtype=np.int64)  # (Q,)
    merged: NegativeSelection | None = None
    stats: dict[str, Any] = {}
    passes: list[dict[str, int]] = []
    while True:
        result = search_within_groups(q_emb[rows], q_groups[rows], cand_emb, c_groups, k,
                                      **_pass_kwargs(search_kwargs, k, first=not passes))
        part = select_negatives(result.scores, result.ids, pos_scores[rows], pos_ids[rows],
                                cand_keys, np.asarray(pos_keys)[rows], log_summary=False,
                                **select_kwargs)
        merged = part if merged is None else _merge(merged, part, rows)
        stats = stats or result.stats
        passes.append({"k": int(k), "queries": int(rows.size)})
        searched_k[rows] = k
        deeper = (part.counts["kept_available"] < needed[rows]) & (k < group_size[rows])
        rows = rows[deeper]
        if not rows.size:
            break
        k = int(min(2 * k, group_size[rows].max()))
    _log(merged, passes, select_kwargs.get("num_negatives", 8))
    stats = {**stats, "passes": passes,
             "queries_searched_again": int((searched_k > passes[0]["k"]).sum())}
    return MinedNegatives(merged, searched_k, stats)


def _group_sizes(q_groups: np.ndarray, c_groups: np.ndarray) -> np.ndarray:
    """(Q,) candidates in each query's group."""
    names, counts = np.unique(c_groups, return_counts=True)
    size_of = dict(zip(names.tolist(), counts.tolist(), strict=True))
    return np.asarray([size_of.get(g, 0) for g in q_groups.tolist()], dtype=np.int64)


def _pass_kwargs(search_kwargs: dict[str, Any], k: int, *, first: bool) -> dict[str, Any]:
    """The search settings of one pass: FAISS on the GPU selects at most 2048 per query, so a
    deeper pass runs the torch backend there (same exact scores); groups smaller than a
    deeper pass's k are expected, so only the first pass warns about them."""
    kwargs = {**search_kwargs, "warn_short_groups": first}
    if k > FAISS_GPU_MAX_K and resolve_backend(kwargs.get("backend", "auto")) == "faiss_gpu":
        kwargs["backend"] = "torch"
    return kwargs


def _merge(into: NegativeSelection, part: NegativeSelection, rows: np.ndarray
           ) -> NegativeSelection:
    """``into`` with the rows ``rows`` replaced by ``part`` (a deeper pass over them)."""
    neg_ids, neg_scores = into.neg_ids.copy(), into.neg_scores.copy()
    neg_ids[rows], neg_scores[rows] = part.neg_ids, part.neg_scores
    counts = {key: into.counts[key].copy() for key in COUNT_KEYS}
    for key in COUNT_KEYS:
        counts[key][rows] = part.counts[key]
    return NegativeSelection(neg_ids, neg_scores, counts)


def _log(selection: NegativeSelection, passes: list[dict[str, int]],
         num_negatives: int) -> None:
    summary = summarize_counts(selection.counts)
    logger.info("negative selection: %s; search passes (k, queries): %s", summary,
                [(p["k"], p["queries"]) for p in passes])
    n_short = int(selection.counts["short"].sum())
    if n_short:
        logger.warning("%d of %d queries have fewer than num_negatives=%d negatives after "
                       "filtering their whole group (padded with -1)", n_short,
                       summary["n_queries"], num_negatives)
