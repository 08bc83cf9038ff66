"""The training loop's data path at scale: every worker reads about 1/W of the input shards
per epoch, and the rows are exchanged so that each rank holds, as Arrow buffers, the rows of
its slices of the epoch's global batches and the rows they refer to (stage 2: the targets of
the mined negatives).

A :class:`RowSource` (built on the driver from small columns only) says where each input
row lives: a pointer ``shard << 32 | row`` per sorted row key, followed by the pointers of
the rows it refers to (``-1`` = none). Per epoch, :func:`exchange_epoch`:

1. computes, on every rank alike, which pointers each rank needs for its steps from the
   resume position on (the epoch order is known everywhere);
2. reads the shards assigned to this rank (:func:`assign_shards`: balanced by file bytes,
   deterministic; a shard no rank needs is skipped), only the columns asked for;
3. sends every rank its rows of those shards with ``scatter_object_list`` on a gloo group
   (one round per shard index; Arrow tables pickle as their buffers).

Input bytes read per epoch: the table once in all (each rank its 1/W), not W times; a rank
receives its 1/W of the rows plus the rows they refer to. A rank's epoch rows then give
each step its :class:`RowBatch` (Arrow tables, decoded by the stage just before the step).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage

logger = logging.getLogger(__name__)

ROW_BITS = 32
ROW_MASK = (1 << ROW_BITS) - 1
CODE_COLUMN = "_pointer"


def pointer_codes(shards: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """int64 pointer codes ``shard << 32 | row``; a negative shard or row gives -1."""
    shards, rows = np.asarray(shards, np.int64), np.asarray(rows, np.int64)
    codes = (shards << ROW_BITS) | rows
    return np.where((shards < 0) | (rows < 0), -1, codes)


@dataclasses.dataclass(frozen=True)
class RowSource:
    """Where the input rows of a training stage live."""

    shards: tuple[str, ...]         # absolute URIs of the Parquet shards
    columns: tuple[str, ...]        # read for a row of the stage
    ref_columns: tuple[str, ...]    # read for a row another row refers to
    pointers: np.ndarray            # (N, 1 + E) int64 codes, per sorted key; -1 = none
    shard_bytes: tuple[int, ...] = ()  # file size of each shard (balances the reads)

    def shard_weights(self) -> np.ndarray:
        """(S,) what each shard weighs in the read assignment: its bytes (else its rows the
        source points at); 0 = no row of it is pointed at, never read."""
        valid = self.pointers[self.pointers >= 0]
        rows = np.bincount(valid >> ROW_BITS, minlength=len(self.shards))
        if len(self.shard_bytes) != len(self.shards):
            return rows
        return np.where(rows > 0, np.maximum(np.asarray(self.shard_bytes, np.int64), 1), 0)


@dataclasses.dataclass
class RowBatch:
    """One rank's rows of one step: ``own`` (n rows, in batch order), ``refs`` (the rows
    they refer to, row after row) and ``ref_counts`` (n,) how many refs each row has."""

    own: pa.Table
    refs: pa.Table
    ref_counts: np.ndarray


@dataclasses.dataclass
class EpochRows:
    """The rows a rank holds for one epoch, found by pointer code."""

    source: RowSource
    own: pa.Table
    refs: pa.Table
    bytes_read: int = 0        # Arrow bytes of the shards this rank read
    bytes_received: int = 0    # Arrow bytes of the rows it got (own + refs)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self._own_index = _CodeIndex(self.own)
        self._ref_index = _CodeIndex(self.refs)
        self._own_chunks = _Chunks(self.own)
        self._ref_chunks = _Chunks(self.refs)

    def batch(self, positions: np.ndarray) -> RowBatch:
        """The rows at sorted-key ``positions`` (n,) and their refs."""
        pointers = self.source.pointers[positions]  # (n, 1 + E)
        refs = pointers[:, 1:]
        valid = refs >= 0
        return RowBatch(own=self._own_chunks.take(self._own_index.find(pointers[:, 0])),
                        refs=self._ref_chunks.take(self._ref_index.find(refs[valid])),
                        ref_counts=valid.sum(axis=1))


def take_rows(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """``table.take(rows)`` touching only the chunks that hold them (see :class:`_Chunks`)."""
    return _Chunks(table).take(rows)


class _Chunks:
    """A table's record batches and where each starts, found once: a take touches only the
    chunks that hold its rows. A table of many chunks (the received pieces, kept as they
    came: no copy of the epoch's rows) would otherwise be concatenated whole on every take."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.batches = table.to_batches()
        self.starts = np.cumsum([0] + [b.num_rows for b in self.batches])  # (B + 1,)

    def take(self, rows: np.ndarray) -> pa.Table:
        rows = np.asarray(rows, dtype=np.int64)
        if self.table.num_columns == 0 or not rows.size:
            return self.table.slice(0, 0)
        chunk = np.searchsorted(self.starts, rows, side="right") - 1   # (n,)
        parts, order = [], []
        for c in np.unique(chunk):
            picked = np.flatnonzero(chunk == c)
            parts.append(self.batches[c].take(pa.array(rows[picked] - self.starts[c])))
            order.append(picked)
        taken = pa.Table.from_batches(parts, schema=self.table.schema).combine_chunks()
        return taken.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))


class _CodeIndex:
    """Positions of pointer codes in a table's ``_pointer`` column."""

    def __init__(self, table: pa.Table) -> None:
        codes = (table.column(CODE_COLUMN).to_numpy() if table.num_columns
                 else np.zeros(0, np.int64))
        self.order = np.argsort(codes, kind="stable")
        self.sorted = codes[self.order]

    def find(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.int64)
        at = np.searchsorted(self.sorted, codes)
        found = np.zeros(codes.shape, dtype=bool)
        inside = at < len(self.sorted)
        found[inside] = self.sorted[at[inside]] == codes[inside]
        if not np.all(found):
            missing = int(np.asarray(codes)[~found][0])
            raise ValueError(f"row {missing & ROW_MASK} of shard {missing >> ROW_BITS} is "
                             "missing from the input: it changed since the driver listed it")
        return self.order[at]


def assign_shards(weights: np.ndarray, world_size: int) -> list[list[int]]:
    """Shards per rank: heaviest first to the least loaded rank (ties: lowest rank), so each
    rank reads about 1/W of the bytes; shards of weight 0 are read by no one."""
    load = np.zeros(world_size, dtype=np.int64)
    assignment: list[list[int]] = [[] for _ in range(world_size)]
    for shard in sorted(np.flatnonzero(weights), key=lambda s: (-weights[s], s)):
        rank = int(np.argmin(load))
        assignment[rank].append(int(shard))
        load[rank] += weights[shard]
    return [sorted(shards) for shards in assignment]


def needed_pointers(source: RowSource, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique codes of the rows at ``positions`` and of the rows they refer to."""
    pointers = source.pointers[np.asarray(positions, dtype=np.int64)]  # (n, 1 + E)
    refs = pointers[:, 1:]
    return np.unique(pointers[:, 0]), np.unique(refs[refs >= 0])


def exchange_epoch(source: RowSource, wanted: Sequence[np.ndarray], rank: int, *,
                   group: Any = None) -> EpochRows:
    """This rank's :class:`EpochRows`, given the sorted-key positions every rank needs
    (``wanted[q]`` for rank q; the same list on every rank). A collective over ``group``
    (all ranks must call it) when there is more than one rank."""
    start = time.perf_counter()
    world_size = len(wanted)
    needs = [needed_pointers(source, positions) for positions in wanted]
    mine = assign_shards(source.shard_weights(), world_size)
    rounds = max(len(shards) for shards in mine)
    got: dict[str, list[pa.Table]] = collections.defaultdict(list)
    bytes_read = 0
    for k in range(rounds):
        outgoing: list[Any] = [(None, None)] * world_size
        if k < len(mine[rank]):
            table = _read_shard(source, mine[rank][k], needs)
            bytes_read += table.nbytes if table is not None else 0
            if table is not None:
                outgoing = [_pieces_for(table, source, mine[rank][k], own, refs)
                            for own, refs in needs]
        for own, refs in _scatter_rounds(outgoing, rank, world_size, group):
            if own is not None:
                got["own"].append(own)
            if refs is not None:
                got["refs"].append(refs)
    rows = EpochRows(source, _concat(got["own"], source.columns),
                     _concat(got["refs"], source.ref_columns), bytes_read=bytes_read,
                     seconds=time.perf_counter() - start)
    rows.bytes_received = rows.own.nbytes + rows.refs.nbytes
    return rows


def _read_shard(source: RowSource, shard: int,
                needs: list[tuple[np.ndarray, np.ndarray]]) -> pa.Table | None:
    """The shard's columns when some rank needs a row of it, else None (not read)."""
    if not any(_in_shard(codes, shard).size for pair in needs for codes in pair):
        return None
    columns = list(dict.fromkeys([*source.columns, *source.ref_columns]))
    return storage.read_table(source.shards[shard], columns=columns)


def _in_shard(codes: np.ndarray, shard: int) -> np.ndarray:
    lo, hi = np.searchsorted(codes, [shard << ROW_BITS, (shard + 1) << ROW_BITS])
    return codes[lo:hi]


def _pieces_for(table: pa.Table, source: RowSource, shard: int, own: np.ndarray,
                refs: np.ndarray) -> tuple[pa.Table | None, pa.Table | None]:
    """One rank's rows of this shard: (own rows, referred rows), each with its codes."""
    return (_take(table, _in_shard(own, shard), source.columns),
            _take(table, _in_shard(refs, shard), source.ref_columns))


def _take(table: pa.Table, codes: np.ndarray, columns: tuple[str, ...]) -> pa.Table | None:
    if not codes.size or not columns:
        return None
    rows = codes & ROW_MASK
    if int(rows.max()) >= table.num_rows:
        raise ValueError(f"a pointer names row {int(rows.max())} of a shard of "
                         f"{table.num_rows} rows: the input changed since the driver read it")
    picked = table.select(list(columns)).take(pa.array(rows))
    return picked.append_column(CODE_COLUMN, pa.array(codes, pa.int64()))


def _scatter_rounds(outgoing: list[Any], rank: int, world_size: int,
                    group: Any) -> Iterator[tuple[pa.Table | None, pa.Table | None]]:
    """What every rank (in turn the source) sends this rank in one round."""
    if world_size == 1:
        yield outgoing[0]
        return
    import torch.distributed as dist

    for src in range(world_size):
        received: list[Any] = [None]
        dist.scatter_object_list(received, outgoing if src == rank else None, src=src,
                                 group=group)
        yield received[0]


def _concat(pieces: list[pa.Table], columns: tuple[str, ...]) -> pa.Table:
    if not pieces:
        return pa.table({CODE_COLUMN: pa.array([], pa.int64())}) if columns else pa.table({})
    return pa.concat_tables(pieces)  # the received buffers as chunks: no copy


def source_from_shards(shards: Sequence[str], columns: Sequence[str], pointers: np.ndarray,
                       ref_columns: Sequence[str] = ()) -> RowSource:
    """A :class:`RowSource` over ``shards`` (a pointer's shard = its position here), with
    their file sizes (one listing call)."""
    uris = tuple(storage.absolute_uri(uri) for uri in shards)
    sizes: tuple[int, ...] = ()
    if uris:
        paths = [storage.resolve(uri)[1] for uri in uris]
        sizes = tuple(int(info.size or 0) for info in storage.call(
            "stat", uris[0], lambda fs_, _path: fs_.get_file_info(paths)))
    return RowSource(uris, tuple(columns), tuple(ref_columns),
                     np.asarray(pointers, dtype=np.int64), sizes)


# -- prefetch -----------------------------------------------------------------------------------
def prefetched(make: Callable[[int], Any], count: int, depth: int = 2) -> Iterator[Any]:
    """``make(0), make(1), ...`` in order, each started up to ``depth`` ahead in one
    background thread (decode, processor and tokenisation overlap the step before)."""
    if depth <= 0:
        yield from (make(i) for i in range(count))
        return
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
        ahead: collections.deque = collections.deque()
        for i in range(min(depth, count)):
            ahead.append(pool.submit(make, i))
        for i in range(count):
            result = ahead.popleft().result()
            if i + depth < count:
                ahead.append(pool.submit(make, i + depth))
            yield result
