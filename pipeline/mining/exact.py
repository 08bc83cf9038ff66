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

The candidates are either one in-memory matrix or a stream of blocks
(:mod:`pipeline.mining.blocks`): a streamed pass, first or deeper, reads the candidates of its
queries' groups again block by block, and the first one also gathers the positives' scores,
so no pass holds more than one block of vectors.
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np

from pipeline.mining.blocks import BlockSource, search_blocks
from pipeline.mining.common import FAISS_GPU_MAX_K
from pipeline.mining.filters import (
    COUNT_KEYS,
    NegativeSelection,
    select_negatives,
    summarize_counts,
)
from pipeline.mining.search import SearchResult, resolve_backend, search_within_groups

logger = logging.getLogger(__name__)


class MinedNegatives(NamedTuple):
    """``selection`` as :func:`select_negatives` returns it, for every query;
    ``searched_k`` (Q,) the k of the search its negatives come from (> the first k: the row
    was searched again); ``search_stats`` the first pass's stats plus the deeper passes;
    ``pos_scores`` (Q,) the positives' scores the filters used (given, or gathered from the
    streamed candidates)."""

    selection: NegativeSelection
    searched_k: np.ndarray
    search_stats: dict[str, Any]
    pos_scores: np.ndarray | None = None


def survivors_needed(group_size: np.ndarray, *, num_negatives: int, selection: str = "top",
                     range_min: int = 0, range_max: int | None = None) -> np.ndarray:
    """(Q,) survivors each query needs before its selection can no longer change."""
    if selection == "top":
        end = range_min + num_negatives
        return np.full(group_size.shape, end if range_max is None else min(end, range_max))
    return group_size.copy() if range_max is None else np.full(group_size.shape, range_max)


def mine_within_groups(q_emb: np.ndarray, q_groups: np.ndarray, cand_emb: np.ndarray | None,
                       c_groups: np.ndarray, pos_scores: np.ndarray | None,
                       pos_ids: np.ndarray, cand_keys: np.ndarray, pos_keys: np.ndarray, *,
                       search_k: int, search_kwargs: dict[str, Any] | None = None,
                       select_kwargs: dict[str, Any] | None = None,
                       candidates: BlockSource | None = None) -> MinedNegatives:
    """Hard negatives of every query among its group's candidates, exact after the filters.

    Args:
        q_emb: (Q, D) L2-normalised queries; ``q_groups`` (Q,) their groups.
        cand_emb: (N, D) L2-normalised candidates in memory, or None with ``candidates``.
        c_groups: (N,) the candidates' groups (their ids index it), in both modes.
        pos_scores, pos_ids, cand_keys, pos_keys: as :func:`select_negatives` takes them;
            ``pos_scores`` may be None with ``candidates`` (gathered in the first pass).
        search_k: candidates retrieved per query in the first pass.
        search_kwargs: of :func:`search_within_groups` (backend, block sizes, build...).
        select_kwargs: of :func:`select_negatives` (num_negatives, filters, selection...).
        candidates: instead of ``cand_emb``, a :data:`BlockSource`: every pass streams the
            candidates of the groups it needs block by block (:func:`search_blocks`), so
            only one block of vectors is in memory; exact flat search only.
    """
    pos_ids = np.asarray(pos_ids)
    _check_sources(cand_emb, candidates, pos_scores, pos_ids)
    search_kwargs, select_kwargs = dict(search_kwargs or {}), dict(select_kwargs or {})
    q_groups = np.asarray(q_groups, dtype=object)
    c_groups = np.asarray(c_groups, dtype=object)
    group_size = _group_sizes(q_groups, c_groups)  # (Q,)
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
        result, gathered = _search_pass(
            q_emb[rows], q_groups[rows], k, cand_emb, c_groups, candidates,
            pos_ids[rows] if pos_scores is None else None,
            _pass_kwargs(search_kwargs, k, first=not passes))
        pos_scores = _checked_positives(gathered) if pos_scores is None else pos_scores
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
    return MinedNegatives(merged, searched_k, stats, np.asarray(pos_scores))


def _check_sources(cand_emb: np.ndarray | None, candidates: BlockSource | None,
                   pos_scores: np.ndarray | None, pos_ids: np.ndarray) -> None:
    """Exactly one candidate source; positives to gather only from a streamed one."""
    if (cand_emb is None) == (candidates is None):
        raise ValueError("give the candidates either in memory (cand_emb) or as a stream "
                         "(candidates=), not both or neither")
    if pos_scores is None and candidates is None:
        raise ValueError("pos_scores=None needs candidates= (they are gathered while "
                         "streaming); give them with cand_emb")
    if pos_scores is None and (np.asarray(pos_ids) < 0).any():
        raise ValueError("pos_scores=None needs every query's positive among the candidates "
                         "(pos_ids >= 0)")


def _search_pass(q_emb: np.ndarray, q_groups: np.ndarray, k: int, cand_emb: np.ndarray | None,
                 c_groups: np.ndarray, candidates: BlockSource | None,
                 score_ids: np.ndarray | None,
                 kwargs: dict[str, Any]) -> tuple[SearchResult, np.ndarray | None]:
    """One search pass, in memory or streamed (only the groups of these queries)."""
    if candidates is None:
        return search_within_groups(q_emb, q_groups, cand_emb, c_groups, k, **kwargs), None
    return search_blocks(q_emb, q_groups, candidates(np.unique(q_groups)), k,
                         score_ids=score_ids, **kwargs)


def _checked_positives(gathered: np.ndarray | None) -> np.ndarray:
    """The positives' scores gathered in the first streamed pass; each must have been seen."""
    missing = np.flatnonzero(np.isnan(gathered))
    if missing.size:
        raise ValueError(f"{missing.size} positives were not among the streamed candidates "
                         f"of their group (queries {missing[:10].tolist()})")
    return gathered


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
