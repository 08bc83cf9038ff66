"""Exact after the filters: rows whose first ``search_k`` candidates are all false negatives
(a weak positive) are searched deeper, so the mined negatives equal a brute-force float64
ranking of the whole group filtered one candidate at a time."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.mining import mine_within_groups

MARGIN = 0.1
NUM_NEGATIVES = 4


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def world() -> dict[str, np.ndarray]:
    return build_world()


def build_world() -> dict[str, np.ndarray]:
    """Two groups (300 and 40 candidates); each query's positive is a candidate of its
    group at a chosen rank of the query's own ranking: rank 0 (easy), or deep (weak: every
    candidate above it by more than the margin comes first)."""
    rng = np.random.default_rng(0)
    cands = unit(rng.normal(size=(340, 16)))
    c_groups = np.array(["big"] * 300 + ["small"] * 40, dtype=object)
    queries = unit(cands[rng.integers(0, 340, size=60)] + 0.3 * rng.normal(size=(60, 16)))
    q_groups = c_groups[rng.integers(0, 340, size=60)]
    pos_ids = np.empty(60, dtype=np.int64)
    for q in range(60):
        members = np.flatnonzero(c_groups == q_groups[q])
        order = members[np.argsort(-(cands[members].astype(np.float64) @ queries[q]))]
        # weak positives: deep in the ranking; the last query of each group: the very last
        # candidate (its group runs out before NUM_NEGATIVES survive)
        rank = [0, 5, len(members) // 2, len(members) - 8][q % 4]
        pos_ids[q] = order[-1] if q in (58, 59) else order[rank]
    return {"queries": queries, "q_groups": q_groups, "cands": cands, "c_groups": c_groups,
            "pos_ids": pos_ids, "keys": np.array([f"k{i}" for i in range(340)], dtype=object)}


def brute_force(world: dict[str, np.ndarray]) -> list[list[int]]:
    """Per query: its group ranked in float64, self and sim > pos + margin dropped, the first
    NUM_NEGATIVES kept (plain loops)."""
    out = []
    for q, query in enumerate(world["queries"].astype(np.float64)):
        members = np.flatnonzero(world["c_groups"] == world["q_groups"][q])
        sims = world["cands"][members].astype(np.float64) @ query
        pos = float(world["cands"][world["pos_ids"][q]].astype(np.float64) @ query)
        kept = [int(c) for c in members[np.argsort(-sims, kind="stable")]
                if c != world["pos_ids"][q]
                and not float(world["cands"][c].astype(np.float64) @ query) > pos + MARGIN]
        out.append(kept[:NUM_NEGATIVES])
    return out


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_weak_positives_are_searched_deeper_until_exact(world, backend: str) -> None:
    queries, cands, pos_ids = world["queries"], world["cands"], world["pos_ids"]
    pos_scores = (queries * cands[pos_ids]).sum(axis=1)
    mined = mine_within_groups(
        queries, world["q_groups"], cands, world["c_groups"], pos_scores, pos_ids,
        world["keys"], world["keys"][pos_ids], search_k=8,
        search_kwargs={"backend": backend},
        select_kwargs={"num_negatives": NUM_NEGATIVES, "fn_margin": MARGIN,
                       "unique_negatives": False})
    expected = brute_force(world)
    got = [[int(i) for i in row if i >= 0] for row in mined.selection.neg_ids]
    assert got == expected
    # The first 8 could not serve the weak rows: they were searched again, deeper, and
    # the two whose positive is their group's last candidate searched their whole group.
    weak = np.flatnonzero(mined.searched_k > 8)
    assert mined.search_stats["queries_searched_again"] == weak.size >= 20
    group_size = np.where(world["q_groups"] == "big", 300, 40)
    assert (mined.searched_k[[58, 59]] == group_size[[58, 59]]).all()
    short = [len(row) < NUM_NEGATIVES for row in expected]
    assert mined.selection.counts["short"].tolist() == short and any(short)
    assert [p["k"] for p in mined.search_stats["passes"]][:3] == [8, 16, 32]


def test_one_pass_when_nothing_is_short(world) -> None:
    """Easy positives only: the first pass is final (no extra search cost)."""
    queries, cands = world["queries"], world["cands"]
    nearest = np.array([np.flatnonzero(world["c_groups"] == g)[
        np.argmax(cands[world["c_groups"] == g] @ q)] for q, g in
        zip(queries, world["q_groups"], strict=True)])
    mined = mine_within_groups(
        queries, world["q_groups"], cands, world["c_groups"],
        (queries * cands[nearest]).sum(axis=1), nearest, world["keys"],
        world["keys"][nearest], search_k=16, search_kwargs={"backend": "faiss"},
        select_kwargs={"num_negatives": NUM_NEGATIVES, "fn_margin": MARGIN})
    assert len(mined.search_stats["passes"]) == 1
    assert (mined.searched_k == 16).all()
    assert mined.search_stats["queries_searched_again"] == 0
