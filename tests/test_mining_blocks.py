"""Streamed (blockwise) mining vs the in-memory path and a float64 brute force, and the file
side of it: embeddings shards sorted in small row groups, a driver index that never reads a
vector, search tasks that read only their groups' row groups. No Ray here: the step's search
task runs through :func:`mine_shard`, the embed actor without its model."""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import outputs, storage
from pipeline.config import MiningConfig
from pipeline.data import mined
from pipeline.data.schemas import MINED, PAIRS, embeddings_schema, vectors_numpy
from pipeline.mining import (
    CandidateBlock,
    faiss_gpu_available,
    mine_within_groups,
    search_blocks,
)
from pipeline.steps import mine_negatives
from pipeline.steps.mine_negatives import MinerEmbedTask, MinerShardWorker, SearchTask
from tests.test_mining_exact import MARGIN, NUM_NEGATIVES, brute_force, build_world

DIM = 8


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


# -- the pure part: search_blocks ---------------------------------------------------------------
@pytest.fixture(scope="module")
def grouped() -> dict[str, np.ndarray]:
    """Groups a (200), b (37), c (5: smaller than k) interleaved among the candidates, and
    queries of a, b, c and of a group without candidates."""
    rng = np.random.default_rng(1)
    c_groups = rng.permutation(np.array(["a"] * 200 + ["b"] * 37 + ["c"] * 5, dtype=object))
    cands = unit(rng.normal(size=(242, 16)))
    q_groups = np.array(["a"] * 20 + ["b"] * 10 + ["c"] * 5 + ["ghost"] * 3, dtype=object)
    queries = unit(rng.normal(size=(38, 16)))
    return {"cands": cands, "c_groups": c_groups, "queries": queries, "q_groups": q_groups}


def brute_topk(queries: np.ndarray, q_groups: np.ndarray, cands: np.ndarray,
               c_groups: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) float64 scores and ids: each query's group ranked by a stable float64 argsort
    (ties: lower id first), padded with -inf / -1."""
    scores = np.full((len(queries), k), -np.inf)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for q, query in enumerate(queries.astype(np.float64)):
        members = np.flatnonzero(c_groups == q_groups[q])
        sims = cands[members].astype(np.float64) @ query
        order = np.argsort(-sims, kind="stable")[:k]
        ids[q, :order.size], scores[q, :order.size] = members[order], sims[order]
    return scores, ids


def split(cands: np.ndarray, c_groups: np.ndarray, order: np.ndarray,
          cuts: list[int]) -> list[CandidateBlock]:
    """Blocks of the candidates ``order[cuts[i]:cuts[i + 1]]`` (global ids kept)."""
    return [CandidateBlock(cands[order[a:b]], order[a:b], c_groups[order[a:b]])
            for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def splits(n: int, c_groups: np.ndarray) -> dict[str, tuple[np.ndarray, list[int]]]:
    by_group = np.argsort(c_groups, kind="stable")  # each group in few blocks only
    shuffled = np.random.default_rng(2).permutation(n)
    return {
        "one_block": (np.arange(n), [0, n]),
        "rows_of_1": (np.arange(n), list(range(n + 1))),
        "empty_blocks": (np.arange(n), [0, 0, 3, 3, 50, 51, 51, 200, n, n]),
        "by_group": (by_group, [*range(0, n, 16), n]),
        "shuffled": (shuffled, [*range(0, n, 33), n]),
    }


@pytest.mark.parametrize("name", ["one_block", "rows_of_1", "empty_blocks", "by_group",
                                  "shuffled"])
@pytest.mark.parametrize("k", [1, 8, 64])
def test_streamed_topk_equals_float64_brute_force(grouped, name: str, k: int) -> None:
    cands, c_groups = grouped["cands"], grouped["c_groups"]
    order, cuts = splits(len(cands), c_groups)[name]
    result, gathered = search_blocks(grouped["queries"], grouped["q_groups"],
                                     split(cands, c_groups, order, cuts), k, backend="faiss",
                                     num_threads=1, warn_short_groups=False)
    ref_scores, ref_ids = brute_topk(grouped["queries"], grouped["q_groups"], cands, c_groups, k)
    assert gathered is None
    assert result.ids.shape == result.scores.shape == (len(grouped["queries"]), k)
    np.testing.assert_array_equal(result.ids, ref_ids)
    np.testing.assert_allclose(result.scores, ref_scores, atol=1e-5, rtol=0)
    # k beyond a group's size pads, and the ghost group has nothing at all
    stats = result.stats
    assert stats["groups"]["c"] == {"n_queries": 5, "n_candidates": 5, "k": min(k, 5)}
    assert stats["groups"]["ghost"]["n_candidates"] == 0 and "ghost" in stats["groups_short"]
    assert stats["n_candidates"] == len(cands) and stats["n_blocks"] == len(cuts) - 1


@pytest.mark.parametrize("backend, device", [
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("torch", "cuda", id="torch-cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA")]),
    pytest.param("faiss_gpu", None, id="faiss_gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not faiss_gpu_available(), reason="faiss without GPU support")]),
])
def test_streamed_other_backends_match_too(grouped, backend: str, device: str | None) -> None:
    cands, c_groups = grouped["cands"], grouped["c_groups"]
    order, cuts = splits(len(cands), c_groups)["shuffled"]
    kwargs = {"device": device} if device else {}
    result, _ = search_blocks(grouped["queries"], grouped["q_groups"],
                              split(cands, c_groups, order, cuts), 16, backend=backend,
                              warn_short_groups=False, **kwargs)
    _, ref_ids = brute_topk(grouped["queries"], grouped["q_groups"], cands, c_groups, 16)
    np.testing.assert_array_equal(result.ids, ref_ids)


def test_ties_across_blocks_go_to_the_lower_id_and_short_groups_warn(grouped, caplog) -> None:
    cands = grouped["cands"].copy()
    twins = np.flatnonzero(grouped["c_groups"] == "a")[[3, 150]]
    cands[twins[1]] = cands[twins[0]]                    # the same vector under two ids
    query = cands[twins[0]][None]                        # (1, D): both score exactly 1
    order = np.r_[twins[1], np.setdiff1d(np.arange(len(cands)), [twins[1]])]  # later id first
    blocks = split(cands, grouped["c_groups"], order, [0, 1, 100, len(cands)])
    result, _ = search_blocks(query, np.array(["a"], dtype=object), blocks, 2, backend="faiss",
                              num_threads=1)
    assert result.ids[0].tolist() == sorted(twins.tolist())
    assert result.scores[0, 0] == result.scores[0, 1]
    caplog.clear()
    search_blocks(query, np.array(["c"], dtype=object), blocks, 8, backend="faiss",
                  num_threads=1)
    assert "fewer than k=8 candidates" in caplog.text


def test_scores_of_chosen_ids_are_gathered_while_streaming(grouped) -> None:
    cands, c_groups, queries = grouped["cands"], grouped["c_groups"], grouped["queries"]
    rng = np.random.default_rng(3)
    score_ids = rng.integers(0, len(cands), size=len(queries))
    score_ids[:2] = -1                                    # no id: nan
    score_ids[2] = 241                                    # never streamed: nan
    blocks = split(cands, c_groups, np.arange(241), [*range(0, 241, 10), 241])
    _, gathered = search_blocks(queries, grouped["q_groups"], blocks, 4, backend="faiss",
                                num_threads=1, score_ids=score_ids, warn_short_groups=False)
    expected = (queries[3:] * cands[score_ids[3:]]).sum(axis=1)  # (Q - 3,) as the step did
    np.testing.assert_array_equal(gathered[3:], expected)
    assert np.isnan(gathered[:3]).all()


def test_search_blocks_argument_errors(grouped) -> None:
    q, g = grouped["queries"], grouped["q_groups"]
    with pytest.raises(ValueError, match="k must be >= 1"):
        search_blocks(q, g, [], 0)
    with pytest.raises(ValueError, match="IVF needs the whole matrix"):
        search_blocks(q, g, [], 4, build="ivf")


# -- mine_within_groups: streamed == in memory --------------------------------------------------
def array_source(cands: np.ndarray, c_groups: np.ndarray, block_rows: int, *,
                 shuffle: bool, asked: list[set[str]]):
    """A BlockSource over in-memory arrays that records the groups each pass asked for."""
    order = (np.random.default_rng(4).permutation(len(cands)) if shuffle
             else np.arange(len(cands)))

    def blocks(groups: np.ndarray):
        asked.append(set(groups.tolist()))
        ids = order[np.isin(c_groups[order], groups)]
        for start in range(0, ids.size, block_rows):
            part = ids[start:start + block_rows]
            yield CandidateBlock(cands[part], part, c_groups[part])
    return blocks


SELECTIONS = {
    "margin_top": {"num_negatives": NUM_NEGATIVES, "fn_margin": MARGIN,
                   "unique_negatives": False},
    "repeats_ratio": {"num_negatives": NUM_NEGATIVES, "fn_margin": None, "fn_ratio": 0.9,
                      "unique_negatives": True},
    "range": {"num_negatives": NUM_NEGATIVES, "fn_margin": MARGIN, "selection": "range",
              "range_min": 2, "range_max": 20, "seed": 7},
}


@pytest.mark.parametrize("block_rows, shuffle, backend", [
    (3, False, "faiss"), (7, True, "faiss"), (64, False, "torch"), (1000, True, "faiss")])
@pytest.mark.parametrize("selection", sorted(SELECTIONS))
def test_streamed_mining_equals_in_memory(block_rows: int, shuffle: bool, backend: str,
                                          selection: str) -> None:
    world = build_world()  # weak positives: the first search_k are all false negatives
    queries, cands, pos_ids = world["queries"], world["cands"], world["pos_ids"]
    keys = world["keys"] if selection != "repeats_ratio" else np.array(
        [f"k{i % 50}" for i in range(len(cands))], dtype=object)  # repeated contents
    common = {"search_k": 8, "search_kwargs": {"backend": backend, "num_threads": 1},
              "select_kwargs": SELECTIONS[selection]}
    pos_scores = (queries * cands[pos_ids]).sum(axis=1)  # (Q,)
    expected = mine_within_groups(queries, world["q_groups"], cands, world["c_groups"],
                                  pos_scores, pos_ids, keys, keys[pos_ids], **common)
    asked: list[set[str]] = []
    source = array_source(cands, world["c_groups"], block_rows, shuffle=shuffle, asked=asked)
    got = mine_within_groups(queries, world["q_groups"], None, world["c_groups"], None,
                             pos_ids, keys, keys[pos_ids], candidates=source, **common)
    np.testing.assert_array_equal(got.pos_scores, pos_scores)
    np.testing.assert_array_equal(got.selection.neg_ids, expected.selection.neg_ids)
    np.testing.assert_array_equal(got.selection.neg_scores, expected.selection.neg_scores)
    for key, counts in expected.selection.counts.items():
        np.testing.assert_array_equal(got.selection.counts[key], counts, err_msg=key)
    np.testing.assert_array_equal(got.searched_k, expected.searched_k)
    assert got.search_stats["passes"] == expected.search_stats["passes"]
    # one stream per pass, of the groups of the rows that pass searches, no more
    passes = [p["k"] for p in expected.search_stats["passes"]]
    assert asked == [set(world["q_groups"][expected.searched_k >= k]) for k in passes]
    assert asked[0] == {"big", "small"} and asked[-1] == {"big"}


def test_streamed_mining_equals_brute_force_after_filters() -> None:
    world = build_world()
    asked: list[set[str]] = []
    got = mine_within_groups(
        world["queries"], world["q_groups"], None, world["c_groups"], None, world["pos_ids"],
        world["keys"], world["keys"][world["pos_ids"]], search_k=8,
        search_kwargs={"backend": "faiss", "num_threads": 1},
        select_kwargs=SELECTIONS["margin_top"],
        candidates=array_source(world["cands"], world["c_groups"], 13, shuffle=True,
                                asked=asked))
    assert [[int(i) for i in row if i >= 0] for row in got.selection.neg_ids] == \
        brute_force(world)
    assert got.search_stats["queries_searched_again"] >= 20


def test_mine_within_groups_source_errors() -> None:
    world = build_world()
    args = (world["queries"], world["q_groups"])
    rest = (world["pos_ids"], world["keys"], world["keys"][world["pos_ids"]])
    source = array_source(world["cands"], world["c_groups"], 8, shuffle=False, asked=[])
    with pytest.raises(ValueError, match="not both or neither"):
        mine_within_groups(*args, world["cands"], world["c_groups"], np.zeros(60), *rest,
                           search_k=8, candidates=source)
    with pytest.raises(ValueError, match="needs candidates="):
        mine_within_groups(*args, world["cands"], world["c_groups"], None, *rest, search_k=8)
    bad = world["pos_ids"].copy()
    bad[0] = -1
    with pytest.raises(ValueError, match="pos_ids >= 0"):
        mine_within_groups(*args, None, world["c_groups"], None, bad, world["keys"],
                           world["keys"][bad], search_k=8, candidates=source)


# -- the files: embed shards, driver index, streamed reads, one search task ----------------------
class FakeEmbedder:
    """Deterministic vectors from the text (a crc32-seeded normal draw)."""

    def embedding_dim(self) -> int:
        return DIM

    def encode(self, *, texts, images, batch_size, mode) -> torch.Tensor:
        rows = [np.random.default_rng(zlib.crc32(t.encode())).normal(size=DIM) for t in texts]
        return torch.from_numpy(np.asarray(rows, dtype=np.float32).reshape(-1, DIM))


def embed_worker(folder: str) -> MinerShardWorker:
    """The embed actor without its model (the constructor would load one)."""
    worker = object.__new__(MinerShardWorker)
    worker.embedder, worker.prompt_mode, worker.batch_size = FakeEmbedder(), "raw", 16
    worker.output = outputs.ShardedOutput(storage.join(folder, mine_negatives.EMBEDDINGS_DIR),
                                          "owner", embeddings_schema(DIM))
    return worker


def write_pairs_shards(folder: str, num_shards: int, rows_per_shard: int, num_targets: int,
                       datasets: list[list[str]] | None = None) -> list[str]:
    """Pairs of datasets d0..d2 (or ``datasets[shard]``) interleaved row by row; positives
    drawn from a pool, so a target repeats within and across shards."""
    rng = np.random.default_rng(5)
    uris = []
    for s in range(num_shards):
        rows = []
        names = datasets[s] if datasets else ["d0", "d1", "d2"]
        for r in range(rows_per_shard):
            dataset, target = names[(r + s) % len(names)], int(rng.integers(num_targets))
            rows.append({"id": f"s{s}r{r}", "dataset": dataset, "qry_text": f"query {s}.{r}",
                         "qry_image": None, "pos_text": f"target {target} of {dataset}",
                         "pos_image": None, "pos_key": f"key{target}", "neg_text": [],
                         "neg_image": [], "source": "test"})
        uris.append(storage.join(folder, outputs.shard_name(s)))
        storage.write_table(pa.Table.from_pylist(rows, schema=PAIRS), uris[-1])
    return uris


def embed_all(folder: str, pairs: list[str]) -> None:
    worker = embed_worker(folder)
    for i, (uri, firsts) in enumerate(zip(pairs, mined.first_target_rows(pairs), strict=True)):
        worker(MinerEmbedTask(i, uri, firsts))


@pytest.fixture()
def small_groups(monkeypatch):
    monkeypatch.setattr(mine_negatives, "EMBEDDINGS_ROW_GROUP_ROWS", 16)


@pytest.fixture()
def shards(tmp_path, small_groups) -> dict[str, object]:
    pairs = write_pairs_shards(str(tmp_path / "pairs"), 3, 60, 40)
    embed_all(str(tmp_path / "mine"), pairs)
    return {"pairs": pairs, "folder": str(tmp_path / "mine"),
            "embeddings": str(tmp_path / "mine" / mine_negatives.EMBEDDINGS_DIR)}


def test_embed_shard_is_sorted_by_kind_and_dataset_in_row_groups(tmp_path) -> None:
    pairs = write_pairs_shards(str(tmp_path / "pairs"), 1, 1500, 1200)
    embed_all(str(tmp_path / "mine"), pairs)
    uri = str(tmp_path / "mine" / "embeddings" / outputs.shard_name(0))
    table = storage.read_table(uri)
    order = list(zip(table.column("kind").to_pylist(), table.column("dataset").to_pylist(),
                     table.column("row").to_pylist(), strict=True))
    assert order == sorted(order)                         # (kind, dataset), rows ascending
    assert table.num_rows > mine_negatives.EMBEDDINGS_ROW_GROUP_ROWS
    num_groups = pq.ParquetFile(uri).metadata.num_row_groups
    assert num_groups == -(-table.num_rows // mine_negatives.EMBEDDINGS_ROW_GROUP_ROWS) > 1
    # every query and every first-seen target, each with the vector of its own text
    rows = storage.read_table(pairs[0]).to_pylist()
    assert table.column("kind").to_pylist().count("query") == len(rows)
    emb = vectors_numpy(table.column("emb"))
    texts = [rows[r]["qry_text" if k == "query" else "pos_text"] for k, _, r in order]
    expected = FakeEmbedder().encode(texts=texts, images=None, batch_size=1, mode="raw")
    np.testing.assert_allclose(emb, expected.numpy(), atol=2e-3, rtol=2e-3)  # float16


def test_driver_index_reads_only_small_columns(shards, monkeypatch) -> None:
    asked: list[list[str] | None] = []
    read_table = storage.read_table

    def recording(uri: str, columns: list[str] | None = None) -> pa.Table:
        asked.append(columns)
        return read_table(uri, columns)

    def no_vectors(*args, **kwargs):
        raise AssertionError("the driver read row groups of vectors")

    monkeypatch.setattr(storage, "read_table", recording)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", no_vectors)
    index, query_datasets = mined.load_target_index(shards["embeddings"], "dataset")
    monkeypatch.undo()
    assert len(asked) == 3 and all(c is not None and "emb" not in c for c in asked)
    full = [storage.read_table(u) for u in outputs.shard_uris(shards["embeddings"])]
    targets = [(s, p, row) for s, t in enumerate(full) for p, row in enumerate(t.to_pylist())
               if row["kind"] == "target"]
    assert index.keys.tolist() == [row["key"] for _, _, row in targets]
    assert index.datasets.tolist() == [row["dataset"] for _, _, row in targets]
    assert index.location.tolist() == [[s, row["row"]] for s, _, row in targets]
    assert index.vector_row.tolist() == [p for _, p, _ in targets]
    assert query_datasets == {0: ["d0", "d1", "d2"], 1: ["d0", "d1", "d2"],
                              2: ["d0", "d1", "d2"]}
    assert index.ids_of(["d1", "d9"], [index.keys[index.datasets == "d1"][0], "x"]).tolist() \
        == [int(np.flatnonzero(index.datasets == "d1")[0]), -1]
    glob = dataclasses.replace(index, scope="global")
    assert set(glob.groups) == {"all"} and glob.select(["d1"]) is glob


def reference_matrix(folder: str, index: mined.TargetIndex) -> np.ndarray:
    """(C, D) unit float32 target vectors the way the driver used to build them."""
    tables = [storage.read_table(u) for u in outputs.shard_uris(folder)]
    emb = np.concatenate([vectors_numpy(t.column("emb"))[np.asarray(
        t.column("kind").to_pylist()) == "target"] for t in tables])
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    assert len(emb) == len(index)
    return emb


def test_streamed_targets_read_only_their_row_groups(shards, monkeypatch) -> None:
    index, _ = mined.load_target_index(shards["embeddings"], "dataset")
    subset = index.select(["d1"])
    read_groups: list[list[int]] = []
    read_row_groups = pq.ParquetFile.read_row_groups

    def recording(self, row_groups, *args, **kwargs):
        read_groups.append(list(row_groups))
        return read_row_groups(self, row_groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", recording)
    blocks = list(mined.target_blocks(subset, shards["embeddings"], 5)(np.array(["d1"])))
    assert all(0 < len(b.ids) <= 5 for b in blocks)
    ids = np.concatenate([b.ids for b in blocks])
    assert ids.tolist() == list(range(len(subset)))
    full = reference_matrix(shards["embeddings"], index)[index.datasets == "d1"]
    np.testing.assert_array_equal(np.concatenate([b.emb for b in blocks]), full)
    # only the row groups holding d1's targets, each once per pass
    needed = {(int(s), int(r) // 16) for s, r in zip(subset.location[:, 0],
                                                      subset.vector_row, strict=True)}
    assert sum(len(g) for g in read_groups) == len(needed)
    total = sum(pq.ParquetFile(u).metadata.num_row_groups
                for u in outputs.shard_uris(shards["embeddings"]))
    assert len(needed) < total / 3


def mining_config(**overrides) -> MiningConfig:
    return dataclasses.replace(MiningConfig(), backend="faiss", search_k=4, num_negatives=3,
                               fn_margin=0.0, block_size=7, query_block_size=5, **overrides)


def run_shards(shards: dict[str, object], mining: MiningConfig, name: str) -> list[dict]:
    """Every shard's search task (no Ray), then the mined rows of all shards."""
    index, query_datasets = mined.load_target_index(shards["embeddings"], mining.scope)
    folder = storage.join(shards["folder"], name)
    embedded = outputs.ShardedOutput(shards["embeddings"], "owner", pa.schema([]))
    for i, uri in enumerate(shards["pairs"]):
        task = SearchTask(i, uri, shards["embeddings"], embedded.reject_uri(i), None, folder,
                          "owner", mining)
        result = mine_negatives.mine_shard(task, index.select(query_datasets[i]))
        assert result["rows"] == 60 and result["peak_rss_mb"] > 0
    return [r for u in outputs.shard_uris(folder) for r in storage.read_table(u).to_pylist()]


def in_memory_rows(shards: dict[str, object], mining: MiningConfig) -> dict[str, dict]:
    """The old path: the whole unit target matrix in memory, one in-memory search."""
    index, _ = mined.load_target_index(shards["embeddings"], mining.scope)
    matrix = reference_matrix(shards["embeddings"], index)
    out = {}
    for i, uri in enumerate(shards["pairs"]):
        pairs = storage.read_table(uri).to_pylist()
        q_rows, q_emb = mined.read_queries(storage.join(shards["embeddings"],
                                                        outputs.shard_name(i)))
        pos_ids = index.ids_of([pairs[r]["dataset"] for r in q_rows],
                               [pairs[r]["pos_key"] for r in q_rows])
        groups = np.asarray([pairs[r]["dataset"] if mining.scope == "dataset" else "all"
                             for r in q_rows], dtype=object)
        pos_scores = (q_emb * matrix[pos_ids]).sum(axis=1)
        got = mine_within_groups(
            q_emb, groups, matrix, index.groups, pos_scores, pos_ids, index.keys,
            index.keys[pos_ids], search_k=4,
            search_kwargs={"backend": "faiss", "num_threads": 1},
            select_kwargs={"num_negatives": 3, "fn_margin": 0.0, "seed": mining.seed + i})
        for j, r in enumerate(q_rows):
            chosen = [t for t in got.selection.neg_ids[j] if t >= 0]
            out[pairs[r]["id"]] = {"neg_key": index.keys[chosen].tolist(),
                                   "neg_score": got.selection.neg_scores[j][:len(chosen)],
                                   "pos_score": pos_scores[j]}
    return out


@pytest.mark.parametrize("scope", ["dataset", "global"])
def test_search_task_streams_the_same_negatives_as_in_memory(shards, scope: str) -> None:
    mining = mining_config(scope=scope)
    rows = run_shards(shards, mining, f"mined-{scope}")
    expected = in_memory_rows(shards, mining)
    assert [r["id"] for r in rows] == [f"s{s}r{r}" for s in range(3) for r in range(60)]
    for row in rows:
        assert row["neg_key"] == expected[row["id"]]["neg_key"], row["id"]
        np.testing.assert_array_equal(np.float32(row["neg_score"]),
                                      expected[row["id"]]["neg_score"])
        assert np.float32(row["pos_score"]) == expected[row["id"]]["pos_score"]
    if scope == "dataset":  # margin 0: weak rows needed a deeper pass
        stats = mined.merge_stats([storage.read_json(outputs.ShardedOutput(
            storage.join(shards["folder"], "mined-dataset"), "", MINED).stats_uri(i))
            for i in range(3)])
        assert sum(s["searched_again"] for s in stats.values()) > 0


def test_ivf_task_reads_its_matrix_and_recall_needs_no_driver_vectors(shards) -> None:
    # one IVF list probed = exhaustive: the IVF task mines what the streamed one does
    flat = run_shards(shards, mining_config(), "flat")
    ivf = run_shards(shards, mining_config(index="ivf", ivf_nlist=1, ivf_nprobe=1), "ivf")
    assert [r["neg_key"] for r in ivf] == [r["neg_key"] for r in flat]
    index, _ = mined.load_target_index(shards["embeddings"], "dataset")
    matrix = mined.read_target_matrix(index, shards["embeddings"])
    np.testing.assert_array_equal(matrix, reference_matrix(shards["embeddings"], index))
    recall = mine_negatives.recall_shard(mine_negatives.RecallTask(
        index, shards["embeddings"], mining_config(index="ivf", ivf_nlist=2, ivf_nprobe=2)))
    assert recall["ivf_recall"] == pytest.approx(1.0) and recall["peak_rss_mb"] > 0


def test_search_all_hands_each_task_the_index_of_its_groups_only(tmp_path, small_groups,
                                                                  monkeypatch) -> None:
    """The driver side of the search phase with Ray's put/get and the task runner replaced
    by plain calls (no cluster): one small index object per distinct set of datasets, no
    vectors in it, and every task reports its peak RSS."""
    import ray

    from pipeline import ray_utils
    from pipeline.config import load_config

    config = load_config("jobs/configs/demo.yaml", [
        f"output_root={tmp_path}", "mining.backend=faiss", "mining.search_k=4",
        "mining.num_negatives=4", "mining.block_size=7"])
    folder = config.step_dir(mine_negatives.NAME)
    pairs = write_pairs_shards(str(tmp_path / "pairs"), 3, 30, 20,
                               datasets=[["d0", "d1"], ["d1", "d2"], ["d1", "d0"]])
    embed_all(folder, pairs)
    put: list[object] = []
    monkeypatch.setattr(ray, "put", lambda obj: put.append(obj) or obj)
    monkeypatch.setattr(ray, "get", lambda ref: ref)
    monkeypatch.setattr(ray_utils, "run_shard_tasks",
                        lambda tasks, fn, **kw: [fn(task) for task in tasks])
    index, query_datasets = mined.load_target_index(storage.join(folder, "embeddings"),
                                                    "dataset")
    results = mine_negatives.search_all(config, pairs, {1}, index, query_datasets, "owner",
                                        cpus=1.0, gpus=0.0)
    assert [r["shard"] for r in results] == [0, 2] and all(r["peak_rss_mb"] > 0
                                                           for r in results)
    assert len(put) == 1 and set(put[0].datasets) == {"d0", "d1"}   # shards 0 and 2 share it
    assert not any(isinstance(v, np.ndarray) and v.ndim == 2 and v.dtype.kind == "f"
                   for v in vars(put[0]).values())
    mined_rows = storage.read_table(storage.join(folder, outputs.shard_name(2))).to_pylist()
    assert len(mined_rows) == 30 and all(r["dataset"] in ("d0", "d1") for r in mined_rows)
    recall = mine_negatives.recall_in_task(
        dataclasses.replace(config.mining, index="ivf", ivf_nlist=2, ivf_nprobe=2), index,
        storage.join(folder, "embeddings"), cpus=1.0, gpus=0.0)
    assert recall == pytest.approx(1.0)
