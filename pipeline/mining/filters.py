"""False-negative filtering and hard-negative selection (numpy, vectorised).

Input: for every query its ``M`` retrieved candidates sorted by score (descending), its
positive's score and global candidate id, and content keys (hashes) of the candidates
and of each positive. Filters, in this order, each counted only on candidates that an
earlier filter did not already drop:

1. ``self``: the candidate IS the positive (same id).
2. ``duplicate``: the candidate has the positive's content key (exact duplicate under
   another id), whatever its score.
3. ``margin`` (UniME, beta): drop ``sim > pos_sim + fn_margin``.
4. ``ratio`` (positive-aware, NV-Retriever): drop ``sim > fn_ratio * pos_sim`` (for
   ``pos_sim >= 0``; for ``pos_sim < 0`` the threshold is mirrored to
   ``(2 - fn_ratio) * pos_sim`` = ``pos_sim - |pos_sim| * (1 - fn_ratio)`` so it stays
   below the positive, as in sentence-transformers' ``relative_margin``).
5. ``max_score``: drop ``sim > max_score``.
6. ``repeat`` (``unique_negatives``): drop a candidate whose content key equals that of a
   higher-ranked surviving candidate (one negative per content, e.g. a class label that
   is the target of many rows).

All thresholds are strict ``>`` and computed in float64: a candidate exactly at
``pos_sim + fn_margin`` (or at the ratio threshold, or at ``max_score``) is KEPT. Margin
and ratio are ONE rule with the stage-2 loss: both call
:func:`pipeline.losses.exceeds_fn_margin` and :func:`pipeline.losses.exceeds_fn_ratio`
(tests/test_false_negative_rule.py holds them to a float64 reference). NaN is never over
a threshold there, but :func:`select_negatives` rejects NaN scores before any filter.
Padding slots (id -1, from a group with fewer candidates) are not candidates at all.

Selection over the survivors, ranked by score: the window is survivor ranks
``[range_min, range_max)``; ``"top"`` takes its first ``num_negatives``, ``"range"`` samples
``num_negatives`` of it uniformly without replacement (seeded) and returns them by score.
This is sentence-transformers' ``mine_hard_negatives`` range_min / range_max /
sampling_strategy semantics. Fewer than ``num_negatives`` available -> padding (id -1,
score nan) and ``short = True``; the caller decides whether to repeat (UniME) or drop.
"""
from __future__ import annotations

import logging
from typing import Any, Literal, NamedTuple

import numpy as np

from pipeline.losses import exceeds_fn_margin, exceeds_fn_ratio

logger = logging.getLogger(__name__)

Selection = Literal["top", "range"]
COUNT_KEYS: tuple[str, ...] = (
    "n_candidates", "dropped_self", "dropped_duplicate", "dropped_margin", "dropped_ratio",
    "dropped_max_score", "dropped_repeat", "kept_available", "n_selected", "short",
)


class NegativeSelection(NamedTuple):
    """``neg_ids`` (Q, n) int64 (-1 padding), ``neg_scores`` (Q, n) float32 (nan padding),
    ``counts``: per-query (Q,) arrays keyed by ``COUNT_KEYS``."""

    neg_ids: np.ndarray
    neg_scores: np.ndarray
    counts: dict[str, np.ndarray]


def select_negatives(
    cand_scores: np.ndarray,
    cand_ids: np.ndarray,
    pos_scores: np.ndarray,
    pos_ids: np.ndarray,
    cand_keys: np.ndarray,
    pos_keys: np.ndarray,
    *,
    num_negatives: int = 8,
    fn_margin: float | None = 0.1,
    fn_ratio: float | None = None,
    max_score: float | None = None,
    unique_negatives: bool = True,
    selection: Selection = "top",
    range_min: int = 0,
    range_max: int | None = None,
    seed: int = 0,
    log_summary: bool = True,
) -> NegativeSelection:
    """Hard negatives per query after false-negative filtering (see module docstring).

    Args:
        cand_scores: (Q, M) candidate scores, each row sorted descending (-inf padding).
        cand_ids: (Q, M) global candidate ids (row numbers of ``cand_keys``), -1 = padding.
        pos_scores: (Q,) score of each query's positive.
        pos_ids: (Q,) global candidate id of each query's positive (-1 if not a candidate).
        cand_keys: (N,) content keys of all candidates (str or int64 codes).
        pos_keys: (Q,) content key of each query's positive (same kind as ``cand_keys``).
        num_negatives: negatives per query (k).
        fn_margin: drop ``sim > pos + fn_margin`` (UniME beta); None = off.
        fn_ratio: drop ``sim > fn_ratio * pos`` (e.g. 0.95); None = off.
        max_score: drop ``sim > max_score``; None = off.
        unique_negatives: drop repeats of a content key already kept higher in the row.
        selection: "top" or "range" (uniform sample from the survivor rank window).
        range_min, range_max: survivor rank window ``[range_min, range_max)``; None = all.
        seed: RNG seed of "range" selection.
        log_summary: log the filter totals (and a WARNING for short rows); off for callers
            that search short rows again and log the final result themselves.

    Returns:
        NegativeSelection(neg_ids (Q, num_negatives), neg_scores (Q, num_negatives), counts).
    """
    cand_scores, cand_ids, pos_scores, pos_ids = _validate(
        cand_scores, cand_ids, pos_scores, pos_ids, cand_keys, pos_keys, num_negatives,
        fn_ratio, selection, range_min, range_max)
    alive = cand_ids >= 0  # (Q, M)
    counts: dict[str, np.ndarray] = {"n_candidates": alive.sum(axis=1)}
    for name, drop in _filter_masks(cand_scores, cand_ids, pos_scores, pos_ids,
                                    np.asarray(cand_keys), np.asarray(pos_keys),
                                    fn_margin, fn_ratio, max_score):
        dropped = alive & drop  # (Q, M)
        counts[f"dropped_{name}"] = dropped.sum(axis=1)
        alive &= ~dropped
    repeat = np.zeros_like(alive)  # (Q, M)
    if unique_negatives:
        repeat = _repeat_mask(np.asarray(cand_keys), cand_ids, alive)  # (Q, M)
    counts["dropped_repeat"] = repeat.sum(axis=1)
    alive &= ~repeat
    counts["kept_available"] = alive.sum(axis=1)
    chosen = _choose(alive, num_negatives, selection, range_min, range_max, seed)  # (Q, M)
    neg_ids, neg_scores = _compact(chosen, cand_ids, cand_scores, num_negatives)
    counts["n_selected"] = chosen.sum(axis=1)
    counts["short"] = counts["n_selected"] < num_negatives
    if log_summary:
        _log_summary(counts, num_negatives)
    return NegativeSelection(neg_ids, neg_scores, counts)


def summarize_counts(counts: dict[str, np.ndarray]) -> dict[str, Any]:
    """Totals of the per-query counts, for logs and manifests (plain Python numbers).

    ``queries_with_<filter>`` is the number of queries that lost at least one candidate
    to that filter (the UniME paper reports 22.9% for the margin at beta = 0.1).
    """
    summary: dict[str, Any] = {"n_queries": int(counts["short"].shape[0])}
    for key in COUNT_KEYS:
        summary[f"total_{key}"] = int(counts[key].sum())
    for key in COUNT_KEYS:
        if key.startswith("dropped_"):
            summary[f"queries_with_{key}"] = int((counts[key] > 0).sum())
    return summary


# -- steps --------------------------------------------------------------------------------
def _filter_masks(cand_scores: np.ndarray, cand_ids: np.ndarray, pos_scores: np.ndarray,
                  pos_ids: np.ndarray, cand_keys: np.ndarray, pos_keys: np.ndarray,
                  fn_margin: float | None, fn_ratio: float | None,
                  max_score: float | None) -> list[tuple[str, np.ndarray]]:
    """(name, drop mask (Q, M)) per filter, in application order; disabled filters are
    all-False (so their counts are 0, not missing). Margin and ratio are the rule shared
    with the stage-2 loss (:func:`pipeline.losses.exceeds_fn_margin` / ``exceeds_fn_ratio``)."""
    scores = cand_scores.astype(np.float64)  # (Q, M)
    pos = pos_scores.astype(np.float64)[:, None]  # (Q, 1)
    never = np.zeros(scores.shape, dtype=bool)  # (Q, M)
    key_of_cand = cand_keys[np.maximum(cand_ids, 0)]  # (Q, M)
    masks = [
        ("self", cand_ids == pos_ids[:, None]),
        ("duplicate", key_of_cand == pos_keys[:, None]),
        ("margin", never if fn_margin is None else exceeds_fn_margin(scores, pos, fn_margin)),
        ("ratio", never if fn_ratio is None else exceeds_fn_ratio(scores, pos, fn_ratio)),
        ("max_score", never if max_score is None else scores > max_score),
    ]
    return masks


def _repeat_mask(cand_keys: np.ndarray, cand_ids: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """(Q, M) True for a surviving candidate whose key a higher-ranked survivor already has."""
    _, key_codes = np.unique(cand_keys, return_inverse=True)  # (N,) int codes
    codes = key_codes.reshape(-1)[np.maximum(cand_ids, 0)]  # (Q, M)
    columns = np.broadcast_to(np.arange(alive.shape[1]), alive.shape)  # (Q, M)
    order = np.lexsort((columns, ~alive, codes), axis=-1)  # (Q, M) by key, alive, rank
    sorted_codes = np.take_along_axis(codes, order, axis=1)  # (Q, M)
    sorted_alive = np.take_along_axis(alive, order, axis=1)  # (Q, M)
    repeat_sorted = np.zeros(alive.shape, dtype=bool)  # (Q, M)
    # Survivors come first within a key group, so a survivor right after one with the same
    # key repeats it.
    repeat_sorted[:, 1:] = sorted_alive[:, 1:] & (sorted_codes[:, 1:] == sorted_codes[:, :-1])
    repeat = np.zeros(alive.shape, dtype=bool)  # (Q, M)
    np.put_along_axis(repeat, order, repeat_sorted, axis=1)
    return repeat


def _choose(alive: np.ndarray, num_negatives: int, selection: str, range_min: int,
            range_max: int | None, seed: int) -> np.ndarray:
    """Mask (Q, M) of the chosen survivors."""
    rank = np.cumsum(alive, axis=1) - 1  # (Q, M) rank among survivors
    window = alive & (rank >= range_min)  # (Q, M)
    if range_max is not None:
        window &= rank < range_max
    if selection == "top":
        return window & (rank < range_min + num_negatives)
    keys = np.random.default_rng(seed).random(alive.shape)  # (Q, M) in [0, 1)
    keys[~window] = 2.0
    if alive.shape[1] <= num_negatives:
        return window
    picked = np.argpartition(keys, num_negatives - 1, axis=1)[:, :num_negatives]  # (Q, n)
    chosen = np.zeros(alive.shape, dtype=bool)  # (Q, M)
    np.put_along_axis(chosen, picked, np.take_along_axis(window, picked, axis=1), axis=1)
    return chosen


def _compact(chosen: np.ndarray, cand_ids: np.ndarray, cand_scores: np.ndarray,
             num_negatives: int) -> tuple[np.ndarray, np.ndarray]:
    """Chosen entries moved left (score order kept), padded with -1 / nan."""
    n_queries = chosen.shape[0]
    neg_ids = np.full((n_queries, num_negatives), -1, dtype=np.int64)  # (Q, n)
    neg_scores = np.full((n_queries, num_negatives), np.nan, dtype=np.float32)  # (Q, n)
    slot = np.cumsum(chosen, axis=1) - 1  # (Q, M)
    rows, cols = np.nonzero(chosen)
    neg_ids[rows, slot[rows, cols]] = cand_ids[rows, cols]
    neg_scores[rows, slot[rows, cols]] = cand_scores[rows, cols]
    return neg_ids, neg_scores


def _log_summary(counts: dict[str, np.ndarray], num_negatives: int) -> None:
    """INFO line with filter totals; WARNING when some queries got fewer than k."""
    summary = summarize_counts(counts)
    logger.info("negative selection: %s", summary)
    n_short = int(counts["short"].sum())
    if n_short:
        logger.warning("%d of %d queries have fewer than num_negatives=%d negatives after "
                       "filtering (padded with -1)", n_short, summary["n_queries"],
                       num_negatives)


# -- validation ---------------------------------------------------------------------------
def _validate(cand_scores: np.ndarray, cand_ids: np.ndarray, pos_scores: np.ndarray,
              pos_ids: np.ndarray, cand_keys: np.ndarray, pos_keys: np.ndarray,
              num_negatives: int, fn_ratio: float | None, selection: str, range_min: int,
              range_max: int | None) -> tuple[np.ndarray, ...]:
    """Shape, dtype, ordering and parameter checks; returns normalised arrays."""
    cand_scores = np.asarray(cand_scores, dtype=np.float32)  # (Q, M)
    cand_ids = np.asarray(cand_ids, dtype=np.int64)  # (Q, M)
    pos_scores = np.asarray(pos_scores, dtype=np.float32)  # (Q,)
    pos_ids = np.asarray(pos_ids, dtype=np.int64)  # (Q,)
    n_queries = cand_scores.shape[0] if cand_scores.ndim == 2 else -1
    if cand_scores.ndim != 2 or cand_ids.shape != cand_scores.shape:
        raise ValueError(f"cand_scores and cand_ids must be (Q, M) of the same shape, got "
                         f"{cand_scores.shape} and {cand_ids.shape}")
    for name, arr in (("pos_scores", pos_scores), ("pos_ids", pos_ids),
                      ("pos_keys", np.asarray(pos_keys))):
        if arr.shape != (n_queries,):
            raise ValueError(f"{name} must have shape ({n_queries},), got {arr.shape}")
    _validate_keys(np.asarray(cand_keys), np.asarray(pos_keys), cand_ids)
    if not np.all(np.isfinite(pos_scores)):
        raise ValueError("pos_scores must be finite")
    if not np.all(cand_scores[:, 1:] <= cand_scores[:, :-1]):
        raise ValueError("each row of cand_scores must be sorted in descending order (no nan)")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    if fn_ratio is not None and not fn_ratio > 0:
        raise ValueError(f"fn_ratio must be > 0, got {fn_ratio}")
    if selection not in ("top", "range"):
        raise ValueError(f"selection must be 'top' or 'range', got {selection!r}")
    if range_min < 0 or (range_max is not None and range_max <= range_min):
        raise ValueError(f"need 0 <= range_min < range_max, got {range_min}, {range_max}")
    return cand_scores, cand_ids, pos_scores, pos_ids


def _validate_keys(cand_keys: np.ndarray, pos_keys: np.ndarray, cand_ids: np.ndarray) -> None:
    """Keys are 1-D, of one kind (text or integer), and cover every candidate id."""
    if cand_keys.ndim != 1:
        raise ValueError(f"cand_keys must be 1-D (N,), got {cand_keys.shape}")
    kinds = {_key_kind(cand_keys), _key_kind(pos_keys)}
    if len(kinds) != 1:
        raise ValueError(f"cand_keys and pos_keys must both be text or both integer codes, "
                         f"got dtypes {cand_keys.dtype} and {pos_keys.dtype}")
    if cand_ids.size and cand_ids.max() >= cand_keys.shape[0]:
        raise ValueError(f"cand_ids reference candidate {cand_ids.max()} but cand_keys has "
                         f"only {cand_keys.shape[0]} entries")


def _key_kind(keys: np.ndarray) -> str:
    """'int' for integer codes, 'text' for str/bytes/object keys."""
    if keys.dtype.kind in "iu":
        return "int"
    if keys.dtype.kind in "USO":
        return "text"
    raise ValueError(f"content keys must be strings or integer codes, got dtype {keys.dtype}")
