"""pipeline.outputs: shard names, completed shards and manifests, on a local folder and on S3."""
from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import outputs, provenance, storage

TABLE = pa.table({"id": list(range(50)), "text": [f"row {i}" for i in range(50)]})
MANIFEST = {"rows_in": 10, "rows_out": 8, "rows_rejected": 2, "config_hash": "abc",
            "seconds": 1.5}

pytestmark = pytest.mark.usefixtures("storage_env")


def parquet_bytes(table: pa.Table = TABLE) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


# -- shards ----------------------------------------------------------------
def test_shard_name_and_index() -> None:
    assert outputs.shard_name(7) == "part-00007.parquet"
    assert outputs.shard_index("s3://b/x/part-00007.parquet") == 7
    assert outputs.shard_index(outputs.shard_name(123456)) == 123456
    for bad in ("part-1.json", "xpart-00001.parquet", ".part-00001.parquet.tmp-ab", "part-.parquet"):
        with pytest.raises(ValueError, match="not a shard name"):
            outputs.shard_index(bad)
    with pytest.raises(ValueError):
        outputs.shard_name(-1)

def test_shard_uris_by_index_without_temp_or_other_files(root: str) -> None:
    for index in (100000, 2, 0):
        storage.write_bytes(storage.join(root, outputs.shard_name(index)), b"x")
    leftover = f".{outputs.shard_name(1)}.tmp-{uuid.uuid4().hex}"  # what a crash leaves
    for name in ("notes.parquet", leftover, "part-00003.parquet.bak"):
        storage.write_bytes(storage.join(root, name), b"x")
    assert outputs.shard_uris(root) == [storage.join(root, outputs.shard_name(i))
                                        for i in (0, 2, 100000)]
    assert storage.join(root, leftover) not in storage.list_files(root)

def test_completed_shards_skips_truncated_and_corrupt(root: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    data = parquet_bytes()
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    corrupt = data[:footer_start] + b"\xff" * 40 + data[footer_start + 40:]
    for index in (0, 2):
        storage.write_table(TABLE, storage.join(root, outputs.shard_name(index)))
    storage.write_bytes(storage.join(root, outputs.shard_name(1)), data[: len(data) // 2])
    storage.write_bytes(storage.join(root, outputs.shard_name(3)), corrupt)
    storage.write_bytes(storage.join(root, outputs.shard_name(4)), b"")
    with caplog.at_level(logging.WARNING, logger=outputs.__name__):
        assert outputs.completed_shards(root) == {0, 2}
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for index in (1, 3, 4):
        assert storage.join(root, outputs.shard_name(index)) in warned
    assert outputs.completed_shards(storage.join(root, "missing")) == set()

def test_manifest_marks_complete(root: str) -> None:
    storage.write_table(TABLE, storage.join(root, outputs.shard_name(0)))
    assert not outputs.is_complete(root)
    assert outputs.read_manifest(root) is None
    with pytest.raises(outputs.IncompleteOutputError) as info:
        outputs.require_complete(root)
    assert root in str(info.value) and "_manifest.json" in str(info.value)
    assert "rerun" in str(info.value)
    written = outputs.write_manifest(root, {**MANIFEST, "extra": [1, 2]})
    assert written["schema_version"] == outputs.SCHEMA_VERSION
    assert written["code_version"] == provenance.code_version()
    assert written["written_at"].endswith("+00:00")
    assert outputs.is_complete(root)
    assert outputs.require_complete(root) == written == outputs.read_manifest(root)
    kept = outputs.write_manifest(root, {**MANIFEST, "code_version": "pinned"})
    assert kept["code_version"] == "pinned"

@pytest.mark.parametrize("key", outputs.REQUIRED_MANIFEST_KEYS)
def test_manifest_requires_keys(tmp_path: Path, key: str) -> None:
    bad = {k: v for k, v in MANIFEST.items() if k != key}
    with pytest.raises(ValueError, match=repr(key)):
        outputs.write_manifest(str(tmp_path), bad)
    assert not outputs.is_complete(str(tmp_path))

def test_manifest_counts_must_balance(root: str) -> None:
    with pytest.raises(ValueError, match=r"rows_in=10 != rows_out=8 \+ rows_rejected=1"):
        outputs.write_manifest(root, {**MANIFEST, "rows_rejected": 1})
    assert not outputs.is_complete(root)

def test_manifest_from_newer_code_is_refused(tmp_path: Path) -> None:
    storage.write_json(str(tmp_path / outputs.MANIFEST_NAME),
                       {**MANIFEST, "schema_version": outputs.SCHEMA_VERSION + 1})
    with pytest.raises(storage.StorageError, match="newer"):
        outputs.require_complete(str(tmp_path))
