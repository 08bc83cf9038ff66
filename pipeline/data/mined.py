"""The mining step's tables (work of :mod:`pipeline.steps.mine_negatives`): the index of the
distinct targets read from the small columns of the ``embeddings`` shards, their vectors
streamed back block by block for a search task, the ``mined`` rows and their payloads read
from the pairs shards, and per-dataset statistics of the filters with their plot.

Target vectors are never gathered in one place: :func:`load_target_index` reads ``kind``,
``dataset``, ``key`` and ``row`` only (the driver's :class:`TargetIndex`), and
:func:`target_blocks` / :func:`iter_target_blocks` read, for one search pass, only the Parquet
row groups that hold the vectors of the groups it needs (the embeddings shards are sorted by
kind and dataset), one block at a time. :func:`read_target_matrix` assembles a whole matrix
for the approximate (IVF) search only.

The search and the false-negative filter themselves are :mod:`pipeline.mining` (arrays in,
arrays out); this module is where they meet files. The ``mined`` table keeps the negatives by
reference (key, score, pairs shard and row), never their bytes: :func:`read_with_negatives`
shows them.
"""
from __future__ import annotations

import collections
import functools
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import outputs, storage
from pipeline.data.schemas import PAIRS, vectors_numpy

if TYPE_CHECKING:
    from pipeline.mining import CandidateBlock

HISTOGRAM_BINS = np.linspace(-1.0, 1.0, 41)
INDEX_COLUMNS = ["kind", "dataset", "key", "row"]  # what the driver reads of the embeddings


@dataclass
class TargetIndex:
    """Every distinct target WITHOUT its vector: the driver's index, and (restricted to its
    groups by :meth:`select`) what a search task receives. A target's id is its position
    here; ids run in embeddings shard order, then file row order. Embeddings shard i and
    pairs shard i hold the same pairs (``part-i`` of both folders)."""

    datasets: np.ndarray       # (C,) dataset names
    keys: np.ndarray           # (C,) content keys
    location: np.ndarray       # (C, 2) int64: pairs (= embeddings) shard, row in the pairs shard
    vector_row: np.ndarray     # (C,) int64: row of the target's vector in its embeddings file
    scope: str                 # "dataset": search groups are datasets; "global": one group

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @property
    def groups(self) -> np.ndarray:
        """(C,) search group of each target: its dataset, or "all" for scope=global."""
        if self.scope == "dataset":
            return self.datasets
        return np.full(len(self), "all", dtype=object)

    def select(self, datasets: list[str]) -> TargetIndex:
        """The targets a search of queries from ``datasets`` can return (all of them for
        scope=global), renumbered from 0 in the same order."""
        if self.scope != "dataset":
            return self
        keep = np.isin(self.datasets, np.asarray(list(datasets), dtype=object))  # (C,)
        return TargetIndex(self.datasets[keep], self.keys[keep], self.location[keep],
                           self.vector_row[keep], self.scope)

    def ids_of(self, datasets: list[str], keys: list[str]) -> np.ndarray:
        """(n,) int64 ids of the targets (dataset, key), -1 where there is none."""
        def joint(names: Any, values: Any) -> pa.Array:
            return pc.binary_join_element_wise(pa.array(names, pa.string()),
                                               pa.array(values, pa.string()), "\x1f")

        found = pc.index_in(joint(datasets, keys), value_set=joint(self.datasets, self.keys))
        return found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

    def key_codes(self) -> np.ndarray:
        """(C,) int64 codes of the content keys: equal code = equal key (what the duplicate
        and repeat filters compare, cheaper than strings)."""
        codes = pa.array(self.keys, pa.string()).dictionary_encode().indices
        return codes.to_numpy(zero_copy_only=False).astype(np.int64)


def check_pair(row: dict[str, Any]) -> tuple[str, str, str] | None:
    """(reason, field, detail) when a pair cannot be mined, else None."""
    from PIL import Image

    if not (row.get("pos_text") or "").strip() and row.get("pos_image") is None:
        return ("missing_positive", "pos_text", "the pair has no positive text or image")
    for field in ("qry_image", "pos_image"):
        data = row.get(field)
        if data is None:
            continue
        try:
            Image.open(io.BytesIO(data)).load()
        except Exception as err:  # noqa: BLE001 - any decode failure refuses the row
            return ("corrupt_image", field, f"packed image does not decode: {err}")
    return None


def reject_row(row: dict[str, Any], uri: str, position: int, reason: str, field: str,
            detail: str) -> dict[str, Any]:
    payload = {k: v for k, v in row.items() if not isinstance(v, bytes | list)}
    return {"id": row["id"], "source": f"{uri}#{position}", "field": field,
            "reason": reason, "detail": detail,
            "row_json": json.dumps(payload, ensure_ascii=False, default=repr)}


def load_target_index(embeddings_folder: str, scope: str
                      ) -> tuple[TargetIndex, dict[int, list[str]]]:
    """The index of every distinct target and, per embeddings shard, the datasets of its
    queries, read from the small columns (:data:`INDEX_COLUMNS`) only: never a vector."""
    parts, query_datasets = [], {}
    for uri in outputs.shard_uris(embeddings_folder):
        table = storage.read_table(uri, columns=INDEX_COLUMNS)
        is_target = pc.equal(table.column("kind"), "target").to_numpy(zero_copy_only=False)
        shard = outputs.shard_index(uri)
        query_datasets[shard] = sorted(set(
            table.column("dataset").filter(pa.array(~is_target)).to_pylist()))
        positions = np.flatnonzero(is_target)  # (c,) rows of this file
        targets = table.take(pa.array(positions))
        parts.append(pa.table({
            "dataset": targets.column("dataset"), "key": targets.column("key"),
            "shard": pa.array(np.full(positions.size, shard, np.int64)),
            "row": targets.column("row").cast(pa.int64()),
            "vector_row": pa.array(positions.astype(np.int64))}))
    table = pa.concat_tables(parts) if parts else pa.table({
        "dataset": pa.array([], pa.string()), "key": pa.array([], pa.string()),
        "shard": pa.array([], pa.int64()), "row": pa.array([], pa.int64()),
        "vector_row": pa.array([], pa.int64())})
    location = np.stack([table.column("shard").to_numpy(), table.column("row").to_numpy()],
                        axis=1).reshape(-1, 2)  # (C, 2)
    index = TargetIndex(_shared_strings(table.column("dataset")),
                        np.asarray(table.column("key").to_pylist(), dtype=object),
                        location, table.column("vector_row").to_numpy(), scope)
    return index, query_datasets


def _shared_strings(column: pa.ChunkedArray) -> np.ndarray:
    """(n,) object array of a low-cardinality string column, one str object per value."""
    encoded = column.combine_chunks().dictionary_encode()
    names = np.asarray(encoded.dictionary.to_pylist(), dtype=object)  # (distinct,)
    return names[encoded.indices.to_numpy(zero_copy_only=False)]  # (n,)


def unit_rows(emb: np.ndarray) -> np.ndarray:
    """(n, D) float32 rows scaled to unit length, in place (float16 vectors are not)."""
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)  # (n, D)
    return emb


def read_queries(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows in the pairs shard (Q,), unit vectors (Q, D)) of the queries of one embeddings
    shard, in pairs row order; only the row groups holding queries are read."""
    kinds = storage.read_table(uri, columns=["kind"]).column("kind")
    positions = np.flatnonzero(pc.equal(kinds, "query").to_numpy(zero_copy_only=False))
    table = _read_positions(uri, positions, _row_group_starts(uri), ["row", "emb"])
    rows = table.column("row").to_numpy().astype(np.int64)  # (Q,)
    order = np.argsort(rows, kind="stable")
    return rows[order], unit_rows(vectors_numpy(table.column("emb"))[order])


def target_blocks(targets: TargetIndex, embeddings_folder: str,
                  block_rows: int) -> Callable[[np.ndarray], Iterator[CandidateBlock]]:
    """A :data:`pipeline.mining.BlockSource` over ``targets``: called with the groups a
    search pass needs, it streams their vectors (:func:`iter_target_blocks`)."""
    return functools.partial(iter_target_blocks, targets, embeddings_folder, block_rows)


def iter_target_blocks(targets: TargetIndex, embeddings_folder: str, block_rows: int,
                       groups: np.ndarray | None = None) -> Iterator[CandidateBlock]:
    """``CandidateBlock``s (unit float32 vectors, ids, groups) of the targets of ``groups``
    (None: all), one embeddings shard at a time, at most ``block_rows`` rows each. Only the
    Parquet row groups that hold them are read (shards are sorted by kind and dataset)."""
    from pipeline.mining import CandidateBlock

    all_groups = targets.groups  # (C,)
    wanted = np.arange(len(targets)) if groups is None else np.flatnonzero(
        np.isin(all_groups, np.asarray(groups, dtype=object)))  # (c,) ids
    for shard in np.unique(targets.location[wanted, 0]):
        ids = wanted[targets.location[wanted, 0] == shard]  # (cs,) ascending file rows
        uri = storage.join(embeddings_folder, outputs.shard_name(int(shard)))
        starts = _row_group_starts(uri)
        for run in _runs(targets.vector_row[ids], starts, block_rows):
            run_ids = ids[run]
            table = _read_positions(uri, targets.vector_row[run_ids], starts, ["row", "emb"])
            if not np.array_equal(table.column("row").to_numpy(), targets.location[run_ids, 1]):
                raise ValueError(f"{uri} does not hold the targets its index expects: the "
                                 "embeddings were rewritten after the index was read")
            emb = unit_rows(vectors_numpy(table.column("emb")))  # (r, D)
            for b0 in range(0, run_ids.size, block_rows):
                part = run_ids[b0:b0 + block_rows]
                yield CandidateBlock(emb[b0:b0 + block_rows], part, all_groups[part])


def read_target_matrix(targets: TargetIndex, embeddings_folder: str, dim: int | None = None,
                       block_rows: int = 65536) -> np.ndarray:
    """(C, D) unit float32 vectors of every target of ``targets``, by id: the whole matrix,
    for the approximate (IVF) search only, which needs it (``dim`` for an empty index)."""
    matrix = np.zeros((0, dim or 1), dtype=np.float32)  # (0, D) until the first block
    for block in iter_target_blocks(targets, embeddings_folder, block_rows):
        if not matrix.size:
            matrix = np.empty((len(targets), block.emb.shape[1]), dtype=np.float32)  # (C, D)
        matrix[block.ids] = block.emb
    return matrix


def _row_group_starts(uri: str) -> np.ndarray:
    """(G + 1,) first row of each row group of a Parquet file, then its number of rows."""
    def read(fs: Any, path: str) -> list[int]:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]

    sizes = storage.call("read parquet footer", uri, read)
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)


def _runs(positions: np.ndarray, starts: np.ndarray, block_rows: int) -> Iterator[slice]:
    """Slices of ``positions`` (ascending file rows) that end on a row-group boundary and
    hold about ``block_rows`` rows (at most one row group more): each is read at once."""
    group = np.searchsorted(starts, positions, side="right") - 1  # (n,) row group of each
    first = 0
    for cut in np.flatnonzero(np.diff(group)) + 1:
        if cut - first >= block_rows:
            yield slice(first, int(cut))
            first = int(cut)
    if first < positions.size:
        yield slice(first, positions.size)


def _read_positions(uri: str, positions: np.ndarray, starts: np.ndarray,
                    columns: list[str]) -> pa.Table:
    """Rows ``positions`` (ascending) of a Parquet file, reading only their row groups."""
    group = np.searchsorted(starts, positions, side="right") - 1  # (n,)
    needed = np.unique(group)  # (g,)

    def read(fs: Any, path: str) -> pa.Table:
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            if not needed.size:
                return parquet.schema_arrow.empty_table().select(columns)
            return parquet.read_row_groups(needed.tolist(), columns=columns)

    table = storage.call("read parquet", uri, read)
    sizes = starts[needed + 1] - starts[needed]  # (g,)
    offset = np.concatenate([[0], np.cumsum(sizes)])[np.searchsorted(needed, group)]  # (n,)
    return table.take(pa.array(positions - starts[group] + offset))


def mined_row(pair: dict[str, Any], location: tuple[int, int], selection: Any, j: int,
              pos_score: float, targets: TargetIndex) -> dict[str, Any]:
    """The ``mined`` row of query ``j``: the pair by reference (its pairs shard and row), its
    chosen negatives' keys, scores and the pairs rows holding their payloads."""
    chosen = np.asarray([t for t in selection.neg_ids[j] if t >= 0], dtype=np.int64)
    counts = selection.counts
    return {
        "id": pair["id"], "dataset": pair["dataset"], "pos_key": pair["pos_key"],
        "pair_shard": int(location[0]), "pair_row": int(location[1]),
        "neg_key": [targets.keys[t] for t in chosen],
        "neg_score": [float(s) for s in selection.neg_scores[j][:len(chosen)]],
        "neg_shard": targets.location[chosen, 0].tolist(),
        "neg_row": targets.location[chosen, 1].tolist(),
        "num_given": len(pair["neg_text"]),
        "pos_score": float(pos_score),
        "n_false_neg_dropped": int(counts["dropped_margin"][j] + counts["dropped_ratio"][j]
                                   + counts["dropped_max_score"][j]),
        "n_duplicate_dropped": int(counts["dropped_self"][j] + counts["dropped_duplicate"][j]
                                   + counts["dropped_repeat"][j]),
        "short": bool(counts["short"][j]),
    }


def read_rows(pairs_folder: str, pointers: np.ndarray, columns: list[str]) -> pa.Table:
    """Rows of the pairs table at ``pointers`` ((n, 2) int: shard, row), in that order; each
    shard holding one is read once (only ``columns``)."""
    pointers = np.asarray(pointers, dtype=np.int64).reshape(-1, 2)
    pieces, where = [], np.empty(len(pointers), dtype=np.int64)
    offset = 0
    for shard in np.unique(pointers[:, 0]):
        rows = np.flatnonzero(pointers[:, 0] == shard)
        table = storage.read_table(storage.join(pairs_folder, outputs.shard_name(int(shard))),
                                   columns=columns)
        pieces.append(table.take(pa.array(pointers[rows, 1])))
        where[rows] = offset + np.arange(len(rows))
        offset += len(rows)
    if not pieces:
        return pa.table({c: pa.array([], PAIRS.field(c).type) for c in columns})
    return pa.concat_tables(pieces).take(pa.array(where))


def read_with_negatives(mined_rows: list[dict[str, Any]], pairs_folder: str
                        ) -> list[dict[str, Any]]:
    """``mined`` rows with their payloads resolved from the pairs table, for inspection:
    the pair's columns, ``given_neg_text``/``given_neg_image`` (the data's negatives) and
    ``neg_text``/``neg_image`` (the mined ones, best first)."""
    own = read_rows(pairs_folder, [(r["pair_shard"], r["pair_row"]) for r in mined_rows],
                    PAIRS.names).to_pylist()
    neg_ptrs = [(s, i) for r in mined_rows for s, i in zip(r["neg_shard"], r["neg_row"],
                                                          strict=True)]
    negs = read_rows(pairs_folder, neg_ptrs, ["pos_text", "pos_image"]).to_pylist()
    out, offset = [], 0
    for row, pair in zip(mined_rows, own, strict=True):
        if pair["id"] != row["id"]:
            raise ValueError(f"mined row {row['id']!r} points at pairs row {pair['id']!r}: "
                             f"{pairs_folder} is not the table it was mined from")
        mine = negs[offset:offset + len(row["neg_key"])]
        offset += len(mine)
        out.append({**pair, **row, "given_neg_text": pair["neg_text"],
                    "given_neg_image": pair["neg_image"],
                    "neg_text": [n["pos_text"] for n in mine],
                    "neg_image": [n["pos_image"] for n in mine]})
    return out


def shard_stats(*, datasets: list[str], selection: Any, pos_scores: np.ndarray,
                searched_again: np.ndarray) -> dict[str, Any]:
    """Per-dataset sums of the filter counts, of the queries searched again deeper (their
    first candidates were all filtered out) and score histograms (to merge across shards)."""
    stats: dict[str, Any] = {}
    names = np.asarray(datasets, dtype=object)
    for dataset in sorted(set(datasets)):
        rows = names == dataset
        counts = {k: v[rows] for k, v in selection.counts.items()}
        neg = selection.neg_scores[rows]
        stats[dataset] = {
            **{k: int(np.sum(v)) for k, v in counts.items()},
            "queries": int(rows.sum()),
            "searched_again": int(searched_again[rows].sum()),
            "pos_hist": np.histogram(pos_scores[rows], HISTOGRAM_BINS)[0].tolist(),
            "neg_hist": np.histogram(neg[np.isfinite(neg)], HISTOGRAM_BINS)[0].tolist(),
        }
    return stats


def merge_stats(shards: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for shard in shards:
        for dataset, stats in shard.items():
            into = merged.setdefault(dataset, collections.defaultdict(int))
            for key, value in stats.items():
                if isinstance(value, list):
                    into[key] = (np.asarray(into.get(key) or np.zeros(len(value), int))
                                 + value).tolist()
                else:
                    into[key] += value
    return {d: dict(v) for d, v in sorted(merged.items())}


def first_target_rows(pair_shards: list[str]) -> list[list[int]]:
    """Per shard, the rows whose (dataset, target key) is seen for the first time (in shard
    order): Arrow strings and integer codes, no per-row Python objects."""
    joint, sizes = [], []
    for uri in pair_shards:
        table = storage.read_table(uri, columns=["dataset", "pos_key"])
        joint.append(pc.binary_join_element_wise(table.column("dataset"),
                                                 table.column("pos_key"), "\x1f"))
        sizes.append(table.num_rows)
    if not joint:
        return []
    codes = pa.chunked_array(joint).combine_chunks().dictionary_encode().indices.to_numpy()
    first = np.zeros(len(codes), dtype=bool)
    first[np.unique(codes, return_index=True)[1]] = True  # (N,) first occurrence of each
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return [np.flatnonzero(first[a:b]).tolist() for a, b in zip(starts[:-1], starts[1:],
                                                                  strict=True)]


def per_dataset(stats: dict[str, Any]) -> dict[str, Any]:
    return {d: {**s, "negatives_kept": s["n_selected"], "candidates_seen": s["n_candidates"]}
            for d, s in stats.items()}


def totals(stats: dict[str, Any]) -> dict[str, int]:
    keys = [k for k in next(iter(stats.values()), {}) if not k.endswith("_hist")]
    return {k: int(sum(s[k] for s in stats.values())) for k in keys}


def histogram_png(stats: dict[str, Any], uri: str) -> None:
    """One panel per dataset: positive vs chosen-negative similarity histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats) or ["(none)"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    centers = (HISTOGRAM_BINS[:-1] + HISTOGRAM_BINS[1:]) / 2
    width = HISTOGRAM_BINS[1] - HISTOGRAM_BINS[0]
    for ax, name in zip(axes[0], names, strict=True):
        for key, label in (("pos_hist", "positive"), ("neg_hist", "hard negatives")):
            ax.bar(centers, stats.get(name, {}).get(key, [0] * len(centers)), width=width,
                   alpha=0.6, label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("cosine similarity to the query")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(uri, buffer.getvalue())
