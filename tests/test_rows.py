"""The training data path (:mod:`pipeline.train.rows`): shard assignment, the per-epoch row
exchange between ranks (real gloo collectives in spawned processes) against a brute-force
read of the shards, and the prefetch thread."""
from __future__ import annotations

import os
import pathlib
import socket
import time

import numpy as np
import pyarrow as pa
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline import storage
from pipeline.train import loop
from pipeline.train.rows import (
    RowSource,
    assign_shards,
    exchange_epoch,
    pointer_codes,
    prefetched,
)

ROWS_PER_SHARD = (7, 5, 9, 3, 8)


def write_shards(folder: pathlib.Path) -> list[str]:
    """Shards whose rows say where they are: id 's<shard>r<row>', a payload column."""
    uris = []
    for shard, count in enumerate(ROWS_PER_SHARD):
        uri = str(folder / f"part-{shard:05d}.parquet")
        storage.write_table(pa.table({
            "id": [f"s{shard}r{row}" for row in range(count)],
            "text": [f"text {shard}.{row}" for row in range(count)],
            "blob": [bytes([shard, row]) * 50 for row in range(count)]}), uri)
        uris.append(uri)
    return uris


def make_source(uris: list[str], refs: int = 2, seed: int = 0) -> RowSource:
    """Every row once (a random key order) with up to ``refs`` random referred rows."""
    rng = np.random.default_rng(seed)
    everything = [(s, r) for s, n in enumerate(ROWS_PER_SHARD) for r in range(n)]
    order = rng.permutation(len(everything))
    own = np.asarray([pointer_codes(*everything[i]) for i in order], dtype=np.int64)
    ref = np.full((len(own), refs), -1, dtype=np.int64)
    for i in range(len(own)):
        for j in range(rng.integers(0, refs + 1)):  # a prefix of valid refs, best first
            ref[i, j] = pointer_codes(*everything[rng.integers(len(everything))])
    return RowSource(tuple(uris), ("id", "text", "blob"), ("text",),
                     np.concatenate([own[:, None], ref], axis=1))


def brute_force(source: RowSource, positions: np.ndarray) -> tuple[list, list, list]:
    """The ids of the rows at ``positions``, their refs' texts and ref counts."""
    tables = [storage.read_table(uri) for uri in source.shards]

    def row(code: int) -> dict:
        return tables[code >> 32].slice(code & 0xFFFFFFFF, 1).to_pylist()[0]
    pointers = source.pointers[positions]
    ids = [row(int(c))["id"] for c in pointers[:, 0]]
    refs = [row(int(c))["text"] for c in pointers[:, 1:].ravel() if c >= 0]
    return ids, refs, (pointers[:, 1:] >= 0).sum(axis=1).tolist()


def check_batch(rows, source: RowSource, positions: np.ndarray) -> None:
    batch = rows.batch(positions)
    ids, refs, counts = brute_force(source, positions)
    assert batch.own.column("id").to_pylist() == ids
    assert batch.refs.column("text").to_pylist() == refs
    assert batch.ref_counts.tolist() == counts
    assert "blob" not in batch.refs.column_names  # referred rows carry ref_columns only


def test_take_rows_across_chunks_equals_take() -> None:
    from pipeline.train.rows import take_rows

    pieces = [pa.table({"id": [f"c{c}r{r}" for r in range(n)], "x": list(range(n))})
              for c, n in enumerate([3, 1, 4, 2])]
    table = pa.concat_tables(pieces)  # 4 chunks
    rows = np.asarray([9, 0, 3, 3, 5, 8, 1])
    assert take_rows(table, rows).to_pylist() == table.combine_chunks().take(rows).to_pylist()
    assert take_rows(table, np.zeros(0, np.int64)).num_rows == 0


def test_assign_shards_balances_rows_deterministically() -> None:
    rows = np.asarray([70, 50, 90, 30, 80, 0, 10])
    assert assign_shards(rows, 1) == [[0, 1, 2, 3, 4, 6]]
    two = assign_shards(rows, 2)
    assert sorted(s for shards in two for s in shards) == [0, 1, 2, 3, 4, 6]  # no empty one
    loads = [rows[shards].sum() for shards in two]
    assert max(loads) - min(loads) <= rows.max() and two == assign_shards(rows, 2)


def test_sources_weigh_shards_by_their_bytes(tmp_path: pathlib.Path) -> None:
    from pipeline.train.rows import source_from_shards

    uris = write_shards(tmp_path)
    plain = make_source(uris)
    source = source_from_shards(uris, plain.columns, plain.pointers, plain.ref_columns)
    assert source.shard_bytes == tuple(os.path.getsize(uri) for uri in uris)
    np.testing.assert_array_equal(source.shard_weights(), source.shard_bytes)
    valid = plain.pointers[plain.pointers >= 0]  # no sizes: the rows (and refs) pointed at
    np.testing.assert_array_equal(plain.shard_weights(), np.bincount(valid >> 32))
    unused = source_from_shards(uris, plain.columns, plain.pointers[plain.pointers[:, 0]
                                                                    >> 32 != 2][:, :1])
    assert unused.shard_weights()[2] == 0  # a shard no row points at is never read


def test_one_rank_reads_everything_it_needs_once(tmp_path: pathlib.Path) -> None:
    source = make_source(write_shards(tmp_path))
    positions = np.arange(0, len(source.pointers), 3)
    rows = exchange_epoch(source, [positions], 0)
    check_batch(rows, source, positions[::-1].copy())  # any subset, any order
    full = sum(storage.read_table(uri).nbytes for uri in source.shards)
    assert 0 < rows.bytes_read <= full


def test_a_changed_shard_is_named(tmp_path: pathlib.Path) -> None:
    source = make_source(write_shards(tmp_path))
    bad = source.pointers.copy()
    bad[0, 0] = pointer_codes(1, 99)
    with pytest.raises(ValueError, match="row 99 of a shard of 5 rows"):
        exchange_epoch(RowSource(source.shards, source.columns, source.ref_columns, bad),
                       [np.arange(len(bad))], 0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    source = make_source(sorted(str(p) for p in pathlib.Path(folder).glob("part-*.parquet")))
    order = loop.epoch_order(len(source.pointers), seed=3, epoch=1)
    wanted = [np.concatenate([loop.local_positions(order, s, r, global_batch_rows=2 * world_size,
                                                   world_size=world_size) for s in range(1, 4)])
              for r in range(world_size)]
    rows = exchange_epoch(source, wanted, rank)
    for step in range(1, 4):  # every step's slice, as the loop asks for it
        check_batch(rows, source, loop.local_positions(order, step, rank, world_size=world_size,
                                                       global_batch_rows=2 * world_size))
    storage.write_json(f"{out}/rank{rank}.json", {"read": rows.bytes_read,
                                                  "held": rows.own.num_rows})
    dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_read_their_share_and_get_exactly_their_rows(tmp_path: pathlib.Path,
                                                           world_size: int) -> None:
    """Each rank reads only its assigned shards (together: every shard once) and ends up
    with the rows of its slices of the steps to run, checked against a brute-force read."""
    uris = write_shards(tmp_path)
    mp.spawn(_rank_main, args=(world_size, _free_port(), str(tmp_path), str(tmp_path)),
             nprocs=world_size, join=True)
    stats = [storage.read_json(str(tmp_path / f"rank{r}.json")) for r in range(world_size)]
    full = sum(storage.read_table(uri).nbytes for uri in uris)
    assert sum(s["read"] for s in stats) <= full             # no shard read twice
    assert all(0 < s["read"] < full for s in stats)           # each reads a share only
    assert all(s["held"] == 3 * 2 for s in stats)            # 3 steps x 2 rows per rank


def test_prefetched_keeps_order_runs_ahead_and_raises() -> None:
    started: list[int] = []

    def make(i: int) -> int:
        started.append(i)
        time.sleep(0.01)
        return i * i

    stream = prefetched(make, 5, depth=2)
    assert next(stream) == 0
    time.sleep(0.05)
    assert started[:3] == [0, 1, 2]          # two ahead of the consumer
    assert list(stream) == [1, 4, 9, 16]

    def broken(i: int) -> int:
        if i == 1:
            raise RuntimeError("decode failed")
        return i

    with pytest.raises(RuntimeError, match="decode failed"):
        list(prefetched(broken, 3))
    assert list(prefetched(lambda i: i, 3, depth=0)) == [0, 1, 2]
