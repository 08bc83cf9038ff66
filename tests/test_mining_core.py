"""Hard-negative mining core: blockwise search vs float64 brute force, grouped search,
IVF recall, the false-negative filters on hand-made cases, equivalence with
sentence-transformers' ``mine_hard_negatives``, and an import graph without cycles."""
from __future__ import annotations

import ast
import graphlib
import importlib
import logging
import pkgutil
import sys
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import torch

import pipeline.mining
from pipeline.mining import (
    FAISS_GPU_MAX_K,
    estimate_recall,
    faiss_gpu_available,
    measure_recall,
    search_topk,
    search_within_groups,
    select_negatives,
    summarize_counts,
)
from tests.st_standins import FixedEmbeddingModel, InMemoryDataset, datasets_standin

N_CAND, N_QUERY, DIM = 1000, 200, 32
BLOCK, QUERY_BLOCK = 137, 61  # neither divides N_CAND / N_QUERY


def _unit_rows(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)  # (n, d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Queries (Q, d), candidates (N, d) and the float64 similarity matrix (Q, N)."""
    rng = np.random.default_rng(0)
    queries, candidates = _unit_rows(rng, N_QUERY), _unit_rows(rng, N_CAND)
    return queries, candidates, queries.astype(np.float64) @ candidates.astype(np.float64).T


def _assert_topk_exact(scores: np.ndarray, ids: np.ndarray, sims: np.ndarray, k: int,
                       tol: float = 1e-5) -> None:
    """``scores``/``ids`` (Q, k) are a float64 brute-force top-k up to ties within 1e-6."""
    ref_ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # (Q, k)
    ref_scores = np.take_along_axis(sims, ref_ids, axis=1)  # (Q, k)
    assert scores.shape == ids.shape == (sims.shape[0], k)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_allclose(scores, ref_scores, atol=tol, rtol=0)
    np.testing.assert_allclose(np.take_along_axis(sims, ids, axis=1), scores, atol=tol, rtol=0)
    assert all(len(set(row)) == k for row in ids.tolist())
    differ = ids != ref_ids  # only allowed where the reference score ties a neighbour
    ref_next = -np.sort(-sims, axis=1)[:, :k + 1]  # (Q, k + 1): ties across the k-th too
    ties = np.abs(np.diff(ref_next, axis=1)) < 1e-6  # (Q, k) rank i ties rank i + 1
    near_tie = ties.copy()
    near_tie[:, 1:] |= ties[:, :-1]
    assert not (differ & ~near_tie).any()


def _backends() -> list[Any]:
    gpu = pytest.mark.skipif(not faiss_gpu_available(), reason="faiss without GPU support")
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
    return [
        pytest.param("faiss", "cpu", id="faiss"),
        pytest.param("torch", "cpu", id="torch-cpu"),
        pytest.param("faiss_gpu", None, id="faiss_gpu", marks=[pytest.mark.gpu, gpu]),
        pytest.param("torch", "cuda", id="torch-cuda", marks=[pytest.mark.gpu, cuda]),
    ]


# -- exact search -------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 10, 64])
@pytest.mark.parametrize(("backend", "device"), _backends())
def test_blockwise_search_equals_float64_brute_force(data, backend, device, k):
    queries, candidates, sims = data
    kwargs = {"device": device} if backend == "torch" else {}
    scores, ids, stats = search_topk(queries, candidates, k, backend=backend, block_size=BLOCK,
                                     query_block_size=QUERY_BLOCK, **kwargs)
    _assert_topk_exact(scores, ids, sims, k)
    assert stats["backend"] == backend and not stats["k_clamped"]


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_topk_inside_one_block_and_single_tile(data, backend):
    queries, candidates, _ = data
    rng = np.random.default_rng(7)
    near = queries[:1] + 0.01 * _unit_rows(rng, 40)  # (40, d) near query 0
    candidates = candidates.copy()
    candidates[140:180] = near / np.linalg.norm(near, axis=1, keepdims=True)  # all in block 1
    sims = queries.astype(np.float64) @ candidates.astype(np.float64).T  # (Q, N)
    for block, query_block in [(BLOCK, QUERY_BLOCK), (N_CAND + 5, N_QUERY + 3)]:
        scores, ids, _ = search_topk(queries, candidates, 32, backend=backend, block_size=block,
                                     query_block_size=query_block)
        _assert_topk_exact(scores, ids, sims, 32)
        assert ((ids[0] >= 140) & (ids[0] < 180)).all()


def test_search_handles_exact_ties(data):
    queries, candidates, _ = data
    doubled = np.concatenate([candidates, candidates[:300]])  # (N + 300, d) exact ties
    sims = queries.astype(np.float64) @ doubled.astype(np.float64).T  # (Q, N + 300)
    for backend in ("faiss", "torch"):
        scores, ids, _ = search_topk(queries, doubled, 10, backend=backend, block_size=BLOCK,
                                     query_block_size=QUERY_BLOCK)
        _assert_topk_exact(scores, ids, sims, 10)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torch_low_precision_is_rescored_in_fp32(data, dtype):
    queries, candidates, sims = data
    scores, ids, stats = search_topk(queries, candidates, 10, backend="torch", device="cpu",
                                     dtype=dtype, block_size=BLOCK,
                                     query_block_size=QUERY_BLOCK)
    assert stats["dtype"] == dtype
    # Scores are fp32 dot products of the returned ids (bf16 alone is off by ~1e-3) ...
    np.testing.assert_allclose(np.take_along_axis(sims, ids, axis=1), scores, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)
    # ... and the over-fetch (2k) recovers the exact top-k on this data.
    ref_ids = np.argsort(-sims, axis=1)[:, :10]
    assert measure_recall(ref_ids, ids) > 0.995


def test_search_tiles_never_exceed_the_block_sizes(data, monkeypatch):
    queries, candidates, _ = data
    shapes: list[tuple[int, ...]] = []
    real_knn, real_topk = faiss.knn, torch.topk

    def spy_knn(xq, xb, k, **kw):
        shapes.append((xq.shape[0], xb.shape[0]))
        return real_knn(xq, xb, k, **kw)

    def spy_topk(x, k, *args, **kw):
        shapes.append(tuple(x.shape))
        return real_topk(x, k, *args, **kw)

    monkeypatch.setattr(faiss, "knn", spy_knn)
    monkeypatch.setattr(torch, "topk", spy_topk)
    for backend in ("faiss", "torch"):
        shapes.clear()
        search_topk(queries, candidates, 10, backend=backend, block_size=BLOCK,
                    query_block_size=QUERY_BLOCK)
        assert shapes, backend
        assert max(s[0] for s in shapes) <= QUERY_BLOCK
        assert max(s[1] for s in shapes) <= BLOCK


def test_k_above_n_is_clamped_with_a_warning(data, caplog):
    queries, candidates, _ = data
    with caplog.at_level(logging.WARNING, logger="pipeline.mining.search"):
        scores, ids, stats = search_topk(queries[:5], candidates[:7], 10, backend="faiss")
    assert scores.shape == ids.shape == (5, 7)
    assert stats["k_clamped"] and stats["k_requested"] == 10 and stats["k"] == 7
    assert sorted(ids[0].tolist()) == list(range(7))
    assert "k=10 > number of candidates N=7" in caplog.text


def test_auto_backend_is_logged(data, caplog):
    queries, candidates, _ = data
    with caplog.at_level(logging.INFO, logger="pipeline.mining.search"):
        _, _, stats = search_topk(queries[:3], candidates, 4)
    assert stats["backend"] == ("faiss_gpu" if faiss_gpu_available() else "faiss")
    assert "search backend auto ->" in caplog.text


def test_search_argument_errors(data):
    queries, candidates, _ = data
    with pytest.raises(ValueError, match="k <= 2048"):
        search_topk(queries, candidates, FAISS_GPU_MAX_K + 1, backend="faiss_gpu")
    with pytest.raises(ValueError, match="only supported by backend='torch'"):
        search_topk(queries, candidates, 5, backend="faiss", dtype="bfloat16")
    with pytest.raises(ValueError, match="dimension mismatch"):
        search_topk(queries[:, :8], candidates, 5)
    with pytest.raises(ValueError, match="needs a faiss backend"):
        search_topk(queries, candidates, 5, backend="torch", build="ivf", nlist=4)
    with pytest.raises(ValueError, match="nprobe"):
        search_topk(queries, candidates, 5, backend="faiss", build="ivf", nlist=4, nprobe=5)


@pytest.mark.skipif(faiss_gpu_available(), reason="faiss GPU is available here")
def test_faiss_gpu_requested_without_gpu_raises(data):
    queries, candidates, _ = data
    with pytest.raises(RuntimeError, match="faiss_gpu.*requested"):
        search_topk(queries, candidates, 5, backend="faiss_gpu")


# -- grouped search -----------------------------------------------------------------------
def test_search_within_groups_stays_in_group_and_pads(data, caplog):
    queries, candidates, sims = data
    rng = np.random.default_rng(1)
    q_groups = rng.choice(np.array(["vqa", "ret", "cls", "tiny", "empty"]), size=N_QUERY)
    c_groups = rng.choice(np.array(["vqa", "ret", "cls"], dtype="<U8"), size=N_CAND)
    c_groups[:3] = "tiny"  # 3 candidates < k
    k = 5
    with caplog.at_level(logging.WARNING, logger="pipeline.mining.search"):
        scores, ids, stats = search_within_groups(queries, q_groups, candidates, c_groups, k,
                                                  backend="faiss", block_size=BLOCK,
                                                  query_block_size=QUERY_BLOCK)
    assert scores.shape == ids.shape == (N_QUERY, k)
    found = ids >= 0
    assert (c_groups[ids[found]] == np.broadcast_to(q_groups[:, None], ids.shape)[found]).all()
    for group in ("vqa", "ret", "cls"):
        rows, cols = np.flatnonzero(q_groups == group), np.flatnonzero(c_groups == group)
        if rows.size:
            _assert_topk_exact(scores[rows], np.searchsorted(cols, ids[rows]),
                               sims[np.ix_(rows, cols)], k)
    tiny, empty = q_groups == "tiny", q_groups == "empty"
    assert tiny.any() and empty.any()
    assert (ids[tiny, :3] >= 0).all() and (ids[tiny, 3:] == -1).all()
    assert np.isneginf(scores[tiny, 3:]).all() and (ids[empty] == -1).all()
    assert sorted(stats["groups_short"]) == ["empty", "tiny"]
    assert stats["queries_short"] == int(tiny.sum() + empty.sum())
    assert "fewer than k=5 candidates" in caplog.text


def test_search_within_groups_keeps_ivf_misses_as_padding(caplog):
    rng = np.random.default_rng(3)
    queries, candidates = _unit_rows(rng, 60), _unit_rows(rng, 60)
    q_groups, c_groups = np.repeat([0, 1], 30), np.repeat([0, 1], 30)
    with caplog.at_level(logging.WARNING, logger="pipeline.mining.ivf"):
        scores, ids, _ = search_within_groups(queries, q_groups, candidates, c_groups, 8,
                                              backend="faiss", build="ivf", nlist=10,
                                              nprobe=1)
    missing = ids == -1
    assert missing.any() and "returned fewer than k=8" in caplog.text
    np.testing.assert_array_equal(missing, np.isneginf(scores))
    assert (c_groups[ids[~missing]] == np.broadcast_to(q_groups[:, None], ids.shape)[~missing]).all()


# -- IVF ----------------------------------------------------------------------------------
def test_ivf_recall_is_measured_and_depends_on_nprobe():
    rng = np.random.default_rng(2)
    candidates, queries = _unit_rows(rng, 3000), _unit_rows(rng, 300)
    exact = search_topk(queries, candidates, 10, backend="faiss")
    recalls = {}
    for nprobe in (1, 16):
        approx = search_topk(queries, candidates, 10, backend="faiss", build="ivf", nlist=16,
                             nprobe=nprobe, seed=0)
        assert approx.stats["nprobe"] == nprobe and approx.stats["nlist"] == 16
        recalls[nprobe] = measure_recall(exact.ids, approx.ids)
    assert recalls[16] > 0.9
    assert recalls[1] < recalls[16] - 0.2
    approx = search_topk(queries, candidates, 10, backend="faiss", build="ivf", nlist=16,
                         nprobe=1, seed=0)
    sampled = estimate_recall(queries, candidates, approx.ids, sample_size=100, seed=0)
    assert abs(sampled - recalls[1]) < 0.15


def test_measure_recall_on_hand_made_ids():
    exact = np.array([[1, 2, 3], [4, 5, -1]])
    approx = np.array([[3, 9, 1], [-1, -1, 4]])
    assert measure_recall(exact, approx) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert measure_recall(exact, exact) == 1.0


# -- filters on hand-made cases -----------------------------------------------------------
def _above(x: float) -> np.float32:
    """The next float32 above ``x`` (``x`` exactly representable)."""
    return np.nextafter(np.float32(x), np.float32(np.inf))


def _one_query(pairs: list[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(1, M) ids and scores from (id, score) pairs given in descending score order."""
    ids = np.array([[i for i, _ in pairs]], dtype=np.int64)
    scores = np.array([[s for _, s in pairs]], dtype=np.float32)
    return scores, ids


# id 6 has the positive's content (a duplicate under another id); id 9 repeats id 4's.
KEYS = np.array(["pos", "a", "b", "c", "d", "e", "pos", "f", "g", "d"])


def _select(pairs, pos_score=0.5, **kwargs):
    scores, ids = _one_query(pairs)
    return select_negatives(scores, ids, np.array([pos_score]), np.array([0]), KEYS,
                            np.array(["pos"]), **kwargs)


def test_duplicate_with_top_score_and_the_positive_are_never_chosen():
    pairs = [(6, 0.99), (0, 0.5), (1, 0.4), (2, 0.3), (3, 0.2)]
    neg_ids, neg_scores, counts = _select(pairs, num_negatives=3, fn_margin=None)
    assert neg_ids.tolist() == [[1, 2, 3]]
    np.testing.assert_array_equal(neg_scores, np.float32([[0.4, 0.3, 0.2]]))
    assert counts["dropped_duplicate"].tolist() == [1] and counts["dropped_self"].tolist() == [1]
    # Even with every threshold disabled and the whole list allowed.
    neg_ids, _, _ = _select(pairs, num_negatives=5, fn_margin=None)
    assert 0 not in neg_ids and 6 not in neg_ids


def test_margin_threshold_edge_is_kept():
    # pos 0.5, margin 0.25: 0.75 exactly is kept, the next float32 above is dropped.
    pairs = [(1, 0.9), (2, float(_above(0.75))), (3, 0.75), (4, 0.6)]
    neg_ids, neg_scores, counts = _select(pairs, num_negatives=2, fn_margin=0.25)
    assert neg_ids.tolist() == [[3, 4]]
    assert neg_scores[0, 0] == np.float32(0.75)
    assert counts["dropped_margin"].tolist() == [2]


def test_ratio_threshold_edge_is_kept_and_mirrored_for_negative_positives():
    # pos 0.5, ratio 0.75 -> threshold 0.375.
    pairs = [(1, float(_above(0.375))), (2, 0.375), (3, 0.25)]
    neg_ids, _, counts = _select(pairs, num_negatives=2, fn_margin=None, fn_ratio=0.75)
    assert neg_ids.tolist() == [[2, 3]] and counts["dropped_ratio"].tolist() == [1]
    # pos -0.5: threshold pos - |pos| * 0.25 = -0.625 (stays below the positive).
    pairs = [(1, -0.5), (2, float(_above(-0.625))), (3, -0.625), (4, -0.75)]
    neg_ids, _, counts = _select(pairs, pos_score=-0.5, num_negatives=2, fn_margin=None,
                                 fn_ratio=0.75)
    assert neg_ids.tolist() == [[3, 4]] and counts["dropped_ratio"].tolist() == [2]


def test_max_score_edge_is_kept():
    pairs = [(1, float(_above(0.625))), (2, 0.625), (3, 0.5)]
    neg_ids, _, counts = _select(pairs, num_negatives=2, fn_margin=None, max_score=0.625)
    assert neg_ids.tolist() == [[2, 3]] and counts["dropped_max_score"].tolist() == [1]


def test_filter_counts_follow_the_filter_order():
    # pos 0.5, margin 0.125 (drop > 0.625), ratio 0.5 (drop > 0.25), max 0.125.
    rows = [
        [(6, 0.9), (1, 0.8), (2, 0.7), (0, 0.5), (3, 0.3), (4, 0.2), (5, 0.1), (7, 0.0),
         (-1, -np.inf)],
        [(1, 0.6), (2, 0.25), (3, 0.2), (4, 0.125), (5, 0.0625), (7, 0.0), (8, -0.5),
         (9, -0.75), (-1, -np.inf)],
    ]
    scores = np.concatenate([_one_query(r)[0] for r in rows])  # (2, 9)
    ids = np.concatenate([_one_query(r)[1] for r in rows])  # (2, 9)
    neg_ids, neg_scores, counts = select_negatives(
        scores, ids, np.array([0.5, 0.5]), np.array([0, 0]), KEYS, np.array(["pos", "pos"]),
        num_negatives=3, fn_margin=0.125, fn_ratio=0.5, max_score=0.125)
    expected = {
        "n_candidates": [8, 8], "dropped_self": [1, 0], "dropped_duplicate": [1, 0],
        "dropped_margin": [2, 0], "dropped_ratio": [1, 1], "dropped_max_score": [1, 2],
        "dropped_repeat": [0, 1], "kept_available": [2, 4], "n_selected": [2, 3], "short": [True, False],
    }
    assert {key: value.tolist() for key, value in counts.items()} == expected
    assert neg_ids.tolist() == [[5, 7, -1], [4, 5, 7]]
    assert np.isnan(neg_scores[0, 2]) and neg_scores[1].tolist() == [0.125, 0.0625, 0.0]
    summary = summarize_counts(counts)
    assert summary["total_dropped_margin"] == 2 and summary["queries_with_dropped_margin"] == 1
    assert summary["total_short"] == 1


def test_repeated_content_is_one_negative_unless_disabled():
    # ids 4 and 9 share content "d"; the first survivor of the two is the one kept.
    pairs = [(4, 0.4), (1, 0.3), (9, 0.2), (2, 0.1)]
    neg_ids, _, counts = _select(pairs, num_negatives=3, fn_margin=None)
    assert neg_ids.tolist() == [[4, 1, 2]] and counts["dropped_repeat"].tolist() == [1]
    neg_ids, _, counts = _select(pairs, num_negatives=3, fn_margin=None, max_score=0.35)
    assert neg_ids.tolist() == [[1, 9, 2]] and counts["dropped_repeat"].tolist() == [0]
    neg_ids, _, counts = _select(pairs, num_negatives=3, fn_margin=None,
                                 unique_negatives=False)
    assert neg_ids.tolist() == [[4, 1, 9]] and counts["dropped_repeat"].tolist() == [0]


def test_fewer_than_k_left_pads_and_warns(caplog):
    pairs = [(0, 0.5), (1, 0.4), (-1, -np.inf), (-1, -np.inf)]
    with caplog.at_level(logging.WARNING, logger="pipeline.mining.filters"):
        neg_ids, neg_scores, counts = _select(pairs, num_negatives=3, fn_margin=None)
    assert neg_ids.tolist() == [[1, -1, -1]] and np.isnan(neg_scores[0, 1:]).all()
    assert counts["short"].tolist() == [True] and counts["n_candidates"].tolist() == [2]
    assert "1 of 1 queries have fewer than num_negatives=3" in caplog.text


def test_int_content_keys_work_like_strings():
    scores, ids = _one_query([(6, 0.9), (1, 0.4), (2, 0.3)])
    codes = np.array([11, 12, 13, 14, 15, 16, 11, 17, 18, 19], dtype=np.int64)
    neg_ids, _, counts = select_negatives(scores, ids, np.array([0.5]), np.array([0]), codes,
                                          np.array([11]), num_negatives=2, fn_margin=None)
    assert neg_ids.tolist() == [[1, 2]] and counts["dropped_duplicate"].tolist() == [1]
    with pytest.raises(ValueError, match="both be text or both integer"):
        select_negatives(scores, ids, np.array([0.5]), np.array([0]), codes,
                         np.array(["pos"]), num_negatives=2)
    with pytest.raises(ValueError, match="sorted in descending order"):
        select_negatives(scores[:, ::-1], ids, np.array([0.5]), np.array([0]), codes,
                         np.array([11]), num_negatives=2)


def _ranked_rows(n_queries: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, M) descending scores and ids 1..M (id 0 = the positive, at rank 0 of each row)."""
    scores = np.tile(np.linspace(0.9, 0.0, m, dtype=np.float32), (n_queries, 1))  # (Q, M)
    ids = np.tile(np.arange(m, dtype=np.int64), (n_queries, 1))  # (Q, M)
    return scores, ids


def test_range_selection_is_seeded_and_within_the_survivor_window():
    n_queries, m = 300, 50
    scores, ids = _ranked_rows(n_queries, m)
    keys = np.arange(m, dtype=np.int64)  # all distinct
    args = (scores, ids, scores[:, 0].copy(), np.zeros(n_queries, np.int64), keys,
            np.zeros(n_queries, np.int64))
    kwargs = dict(num_negatives=4, fn_margin=None, selection="range", range_min=5,
                  range_max=20)
    first = select_negatives(*args, seed=3, **kwargs)
    again = select_negatives(*args, seed=3, **kwargs)
    other = select_negatives(*args, seed=4, **kwargs)
    np.testing.assert_array_equal(first.neg_ids, again.neg_ids)
    assert (first.neg_ids != other.neg_ids).any()
    # Survivor ranks: id 0 (the positive, rank 0 in the list) is dropped, so survivor rank r
    # is id r + 1; the window [5, 20) is ids 6..20.
    assert first.neg_ids.min() == 6 and first.neg_ids.max() == 20
    assert set(np.unique(first.neg_ids).tolist()) == set(range(6, 21))
    assert all(len(set(row)) == 4 for row in first.neg_ids.tolist())
    assert (np.diff(first.neg_scores, axis=1) < 0).all()
    assert not first.counts["short"].any()
    top = select_negatives(*args, num_negatives=4, fn_margin=None, range_min=5)
    assert (top.neg_ids == [6, 7, 8, 9]).all()


# -- equivalence with sentence-transformers ---------------------------------------------
def _mining_world(seed: int, n_pairs: int = 40, n_extra: int = 160):
    """Queries, positives (some near, some random) and extra docs, some near the queries."""
    rng = np.random.default_rng(seed)
    q_emb = _unit_rows(rng, n_pairs, 16)  # (P, d)
    pos_emb = q_emb + 0.6 * _unit_rows(rng, n_pairs, 16)  # (P, d)
    pos_emb[-6:] = _unit_rows(rng, 6, 16)  # random positives: some score below zero
    extra = _unit_rows(rng, n_extra, 16)  # (E, d)
    extra[:60] = q_emb[rng.integers(0, n_pairs, 60)] + 0.5 * _unit_rows(rng, 60, 16)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    queries = [f"query {i}" for i in range(n_pairs)]
    positives = [f"positive {i}" for i in range(n_pairs)]
    docs = [f"doc {i}" for i in range(n_extra)]
    table = dict(zip(queries + positives + docs,
                     np.concatenate([unit(q_emb), unit(pos_emb), unit(extra)]), strict=True))
    return queries, positives, docs, table


def _st_negatives(monkeypatch, queries, positives, docs, table, **kwargs) -> dict[str, list]:
    """Run the real ``mine_hard_negatives`` (fake ``datasets`` container) -> negatives by
    query text."""
    from sentence_transformers.util import hard_negatives

    monkeypatch.setitem(sys.modules, "datasets", datasets_standin())
    monkeypatch.setattr(hard_negatives, "is_datasets_available", lambda: True)
    out = hard_negatives.mine_hard_negatives(
        InMemoryDataset({"anchor": queries, "positive": positives}), FixedEmbeddingModel(table),
        corpus=docs, sampling_strategy="top", output_format="labeled-list",
        output_scores=True, use_faiss=False, verbose=False, **kwargs)
    return {anchor: (texts[1:], scores[1:]) for anchor, texts, scores
            in zip(out["anchor"], out["positive"], out["scores"], strict=True)}


@pytest.mark.parametrize(("st_kwargs", "ours", "duplicates"), [
    (dict(absolute_margin=0.05, max_score=0.8, range_min=1, range_max=8, num_negatives=4),
     dict(fn_margin=-0.05, max_score=0.8, range_min=1, range_max=8), False),
    (dict(relative_margin=0.1, range_max=60, num_negatives=8),
     dict(fn_margin=None, fn_ratio=0.9, range_max=60), True),
    (dict(absolute_margin=-0.1, range_max=30, num_negatives=8),
     dict(fn_margin=0.1, range_max=30), True),
], ids=["absolute+max_score+range", "relative+duplicates", "unime-margin+duplicates"])
def test_matches_sentence_transformers_mine_hard_negatives(monkeypatch, st_kwargs, ours,
                                                           duplicates):
    queries, positives, docs, table = _mining_world(seed=5)
    num_negatives, range_max = st_kwargs["num_negatives"], st_kwargs["range_max"]
    st = _st_negatives(monkeypatch, queries, positives, docs, table, **st_kwargs)
    # Our corpus = ST's (docs then positives, deduplicated by text) plus, optionally, a
    # second copy of every 3rd positive under a new id: our content-key filter must remove
    # what ST's text deduplication removes.
    corpus = docs + positives + (positives[::3] if duplicates else [])
    cand_emb = np.stack([table[t] for t in corpus])  # (N, d)
    q_emb = np.stack([table[t] for t in queries])  # (P, d)
    pos_ids = np.arange(len(docs), len(docs) + len(positives))  # (P,)
    pos_scores = (q_emb * cand_emb[pos_ids]).sum(axis=1)  # (P,)
    extra = len(positives[::3]) if duplicates else 0
    scores, ids, _ = search_topk(q_emb, cand_emb, range_max + 1 + extra, backend="faiss")
    neg_ids, neg_scores, counts = select_negatives(
        scores, ids, pos_scores, pos_ids, np.array(corpus), np.array(positives),
        num_negatives=num_negatives, **ours)
    assert (pos_scores < 0).any()  # the mirrored ratio rule is exercised
    n_full = 0
    for row, query in enumerate(queries):
        st_texts, st_scores = st.get(query, ([], []))
        mine = [corpus[i] for i in neg_ids[row] if i >= 0]
        if duplicates and len(st_texts) < num_negatives:
            # Our pool is `extra` deeper, so it may hold more survivors: ST's are a prefix.
            assert mine[:len(st_texts)] == st_texts, query
        else:
            assert mine == st_texts, query
            n_full += len(st_texts) == num_negatives
        np.testing.assert_allclose(neg_scores[row, :len(st_texts)], st_scores, atol=1e-5)
    assert n_full >= len(queries) // 2
    # Both margin and short-row handling are actually exercised by these settings.
    assert (counts["dropped_margin"] + counts["dropped_ratio"] + counts["dropped_max_score"]).sum()
    if not duplicates:
        assert counts["short"].any()
    else:
        assert counts["dropped_duplicate"].sum() > 0


# -- import graph -------------------------------------------------------------------------
PACKAGE = "pipeline.mining"


def _mining_imports(module_name: str) -> set[str]:
    """``pipeline.mining`` modules that ``module_name`` imports anywhere in its source (top
    level or inside functions); ``from pipeline.mining import x`` runs the package and, when
    ``x`` is a submodule, that submodule too."""
    module = importlib.import_module(module_name)
    tree = ast.parse(Path(module.__file__).read_text(), filename=module.__file__)
    package = module_name if module_name == PACKAGE else module_name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = (node.module or "") if node.level == 0 else ".".join(
                [package.rsplit(".", node.level - 1)[0], *filter(None, [node.module])])
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {t for t in targets if t == PACKAGE or t.startswith(PACKAGE + ".")} & _mining_modules()


def _mining_modules() -> set[str]:
    """The package and every submodule in it."""
    return {PACKAGE} | {f"{PACKAGE}.{info.name}"
                        for info in pkgutil.iter_modules(pipeline.mining.__path__)}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> modules it imports), or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        return error.args[1]
    return None


def test_mining_modules_import_without_cycles():
    modules = _mining_modules()
    assert {f"{PACKAGE}.{name}" for name in ("blocks", "common", "filters", "ivf", "recall",
                                                "search")} <= modules
    graph = {name: _mining_imports(name) - {name} for name in sorted(modules)}
    # The parser sees the imports it must (so an empty graph cannot pass by accident) ...
    assert f"{PACKAGE}.ivf" in graph[f"{PACKAGE}.search"]
    assert f"{PACKAGE}.search" in graph[f"{PACKAGE}.recall"]
    assert f"{PACKAGE}.blocks" in graph[f"{PACKAGE}.exact"]
    assert graph[PACKAGE] == modules - {PACKAGE}
    # ... the check finds the cycle the package used to have (ivf <-> search) ...
    assert _cycle(graph | {f"{PACKAGE}.ivf": {f"{PACKAGE}.search"}}) is not None
    # ... and there is none now.
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"
    assert graph[f"{PACKAGE}.common"] == set()


def test_package_exports_the_public_names():
    assert set(pipeline.mining.__all__) == {
        "BlockSource", "CandidateBlock", "search_blocks", "COUNT_KEYS", "FAISS_GPU_MAX_K", "MinedNegatives", "NegativeSelection", "SearchResult",
        "build_ivf_index", "estimate_recall", "faiss_gpu_available", "measure_recall",
        "mine_within_groups", "resolve_backend", "search_topk", "search_within_groups",
        "select_negatives", "summarize_counts"}
    assert all(hasattr(pipeline.mining, name) for name in pipeline.mining.__all__)
