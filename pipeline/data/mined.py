"""The mining step's tables (work of :mod:`pipeline.steps.mine_negatives`): the distinct
targets read back from the ``embeddings`` shards, the negatives' payloads read from the pairs
shards, the ``mined`` rows, and per-dataset statistics of the filters with their plot.

The search and the false-negative filter themselves are :mod:`pipeline.mining` (arrays in,
arrays out); this module is where they meet files. The ``mined`` table keeps the negatives by
reference (key, score, pairs shard and row), never their bytes: :func:`read_with_negatives`
shows them.
"""
from __future__ import annotations

import collections
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import outputs, storage
from pipeline.data.schemas import PAIRS, vectors_numpy

HISTOGRAM_BINS = np.linspace(-1.0, 1.0, 41)


@dataclass
class TargetIndex:
    """Every distinct target: its vector, group, content key and where its payload is."""

    emb: np.ndarray            # (C, D) float32, unit rows
    groups: np.ndarray         # (C,) dataset names (or one group for scope=global)
    keys: np.ndarray           # (C,) content keys
    location: np.ndarray       # (C, 2) int64: pairs shard, row
    row_of: dict[tuple[str, str], int]  # (dataset, key) -> target row


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


def load_targets(embeddings_folder: str, scope: str) -> TargetIndex:
    """The target rows of every embeddings shard, in shard order."""
    emb, groups, keys, location = [], [], [], []
    for uri in outputs.shard_uris(embeddings_folder):
        table = storage.read_table(uri)
        mask = np.asarray(table.column("kind").to_pylist()) == "target"
        if not mask.any():
            continue
        shard = outputs.shard_index(uri)
        vectors = vectors_numpy(table.column("emb"))[mask]
        emb.append(vectors)
        groups += [d for d, m in zip(table.column("dataset").to_pylist(), mask, strict=True) if m]
        keys += [k for k, m in zip(table.column("key").to_pylist(), mask, strict=True) if m]
        rows = np.asarray(table.column("row").to_pylist())[mask]
        location += [(shard, r) for r in rows]
    matrix = np.concatenate(emb) if emb else np.zeros((0, 1), np.float32)
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)  # fp16 -> unit
    row_of = {(g, k): i for i, (g, k) in enumerate(zip(groups, keys, strict=True))}
    group_arr = np.asarray(groups if scope == "dataset" else ["all"] * len(groups), dtype=object)
    return TargetIndex(matrix, group_arr, np.asarray(keys, dtype=object),
                       np.asarray(location, dtype=np.int64).reshape(-1, 2), row_of)


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
    """Per shard, the rows whose (dataset, target key) is seen for the first time."""
    seen: set[tuple[str, str]] = set()
    firsts = []
    for uri in pair_shards:
        table = storage.read_table(uri, columns=["dataset", "pos_key"])
        rows = []
        for i, key in enumerate(zip(table.column("dataset").to_pylist(),
                                    table.column("pos_key").to_pylist(), strict=True)):
            if key not in seen:
                seen.add(key)
                rows.append(i)
        firsts.append(rows)
    return firsts


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
