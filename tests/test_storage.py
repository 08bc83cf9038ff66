"""pipeline.storage: each behaviour on a local folder and on a moto S3 bucket."""
from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline import outputs, storage

REPO = Path(__file__).resolve().parents[1]
TABLE = pa.table({"id": list(range(50)), "text": [f"row {i}" for i in range(50)]})

pytestmark = pytest.mark.usefixtures("storage_env")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- URIs ----------------------------------------------------------------------------------------
def test_join_and_resolve() -> None:
    assert storage.join("s3://b/x", "y") == "s3://b/x/y"
    assert storage.join("s3://b/x/", "y/", "z.json") == "s3://b/x/y/z.json"
    assert storage.join("/tmp/a", "b", "c") == os.path.join("/tmp/a", "b", "c")
    fs, path = storage.resolve("rel/dir")
    assert path == os.path.join(os.getcwd(), "rel", "dir")
    assert fs.type_name == "local"
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/data/s3://x")
    for bad in ("s3://", "s3:///key", "gs://bucket/key"):
        with pytest.raises(ValueError, match="bucket|scheme"):
            storage.resolve(bad)

@pytest.mark.cluster
def test_endpoint_precedence(s3_endpoint: str, s3_bucket: str,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    uri = storage.join(s3_bucket, "x.bin")
    storage.write_bytes(uri, b"x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)  # the S3-specific one wins
    assert storage.read_bytes(uri) == b"x"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    storage.configure(s3_endpoint_url=s3_endpoint, max_attempts=2)  # configure() wins
    assert storage.read_bytes(uri) == b"x"
    assert storage.worker_env() == {"AWS_ENDPOINT_URL_S3": s3_endpoint,
                                    "AWS_REGION": "us-east-1",
                                    storage.MAX_ATTEMPTS_ENV: "2"}
    assert storage.resolve(uri)[0] is storage.resolve(uri)[0]  # cached per endpoint

# -- round trips ---------------------------------------------------------------------------------
def test_bytes_round_trip(root: str) -> None:
    uri = storage.join(root, "a", "b", "blob.bin")  # parents are created
    storage.write_bytes(uri, b"\x00first")
    assert storage.read_bytes(uri) == b"\x00first"
    storage.write_bytes(uri, b"second")
    assert storage.read_bytes(uri) == b"second"

def test_json_round_trip(root: str) -> None:
    uri = storage.join(root, "obj.json")
    obj = {"b": [1, 2.5, None], "a": {"z": "ü", "y": True}}
    storage.write_json(uri, obj)
    assert storage.read_json(uri) == obj
    assert storage.read_bytes(uri).decode() == json.dumps(obj, indent=2, sort_keys=True) + "\n"

def test_table_round_trip(root: str) -> None:
    uri = storage.join(root, outputs.shard_name(0))
    storage.write_table(TABLE, uri)
    assert storage.read_table(uri).equals(TABLE)
    assert storage.read_table(uri, columns=["text"]).equals(TABLE.select(["text"]))
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        assert pq.ParquetFile(f).metadata.row_group(0).column(0).compression == "ZSTD"

def test_read_missing_file_names_uri(root: str) -> None:
    uri = storage.join(root, "nope.bin")
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        storage.read_bytes(uri)

def test_list_files_sorted_filtered_non_recursive(root: str) -> None:
    for name in ("b.txt", "c.parquet", "a.parquet", "sub/d.parquet"):
        storage.write_bytes(storage.join(root, *name.split("/")), b"x")
    names = ["a.parquet", "b.txt", "c.parquet"]
    assert storage.list_files(root) == [storage.join(root, n) for n in names]
    assert storage.list_files(root, suffix=".parquet") == [
        storage.join(root, "a.parquet"), storage.join(root, "c.parquet")]
    assert storage.list_files(storage.join(root, "missing")) == []

def test_exists_and_delete(root: str) -> None:
    uri = storage.join(root, "sub", "f.bin")
    assert not storage.exists(uri) and not storage.exists(root)
    storage.write_bytes(uri, b"x")
    storage.write_bytes(storage.join(root, "sub", "deeper", "g.bin"), b"y")
    assert storage.exists(uri) and storage.exists(storage.join(root, "sub"))
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # missing: no error
    storage.delete_prefix(storage.join(root, "sub"))
    assert storage.list_files(storage.join(root, "sub", "deeper")) == []
    assert not storage.exists(storage.join(root, "sub", "deeper", "g.bin"))
    storage.delete_prefix(storage.join(root, "never-was"))  # missing: no error

@pytest.mark.reliability
def test_crash_before_rename_leaves_nothing(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    folder = str(tmp_path / "out")
    seen: list[list[str]] = []

    def crash(src: str, dst: str) -> None:
        seen.append(sorted(os.listdir(folder)))
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(storage.StorageError, match="part-00000.parquet"):
        storage.write_table(TABLE, storage.join(folder, outputs.shard_name(0)))
    monkeypatch.undo()
    assert len(seen) == 1 and seen[0][0].startswith(".part-00000.parquet.tmp-")
    assert os.listdir(folder) == []  # the temp file was removed, the final name never made
    assert outputs.shard_uris(folder) == []

@pytest.mark.reliability
def test_killed_writer_leaves_only_an_ignored_temp_file(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    code = textwrap.dedent(f"""
        import os, pyarrow as pa
        from pipeline import storage
        os.replace = lambda src, dst: os._exit(17)  # killed between write and rename
        storage.write_table(pa.table({{"a": [1, 2]}}), {str(folder / "part-00000.parquet")!r})
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60)
    assert done.returncode == 17
    (leftover,) = os.listdir(folder)
    assert leftover.startswith(".part-00000.parquet.tmp-")
    assert outputs.shard_uris(str(folder)) == []
    assert storage.list_files(str(folder)) == []
    assert outputs.completed_shards(str(folder)) == set()

@pytest.mark.reliability
def test_failed_serialisation_publishes_nothing(root: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def half_then_fail(table: pa.Table, sink: pa.NativeFile, **kwargs: object) -> None:
        sink.write(b"PAR1 half a file")
        raise RuntimeError("writer died")

    uri = storage.join(root, outputs.shard_name(0))
    monkeypatch.setattr(pq, "write_table", half_then_fail)
    with pytest.raises(RuntimeError, match="writer died"):
        storage.write_table(TABLE, uri)
    monkeypatch.undo()
    assert not storage.exists(uri)
    assert outputs.shard_uris(root) == []

# -- retry ---------------------------------------------------------------------------------------
class Flaky:
    """Raises ``errors`` in turn, then returns "ok"; counts calls."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"

def test_retry_recovers_from_transient_errors(caplog: pytest.LogCaptureFixture) -> None:
    fn = Flaky(OSError("AWS Error SLOW_DOWN: 503 SlowDown"), ConnectionResetError("reset"))
    with caplog.at_level(logging.WARNING, logger=storage.__name__):
        assert storage.retry(fn, what="read s3://b/k", base_delay_s=0.001) == "ok"
    assert fn.calls == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("read s3://b/k" in w for w in warnings)

def test_retry_gives_up_after_attempts() -> None:
    fn = Flaky(*[OSError("Request timed out")] * 5)
    with pytest.raises(storage.StorageError,
                       match=r"^read /x/y: gave up after 3 attempts: Request timed out$"):
        storage.retry(fn, what="read /x/y", attempts=3, base_delay_s=0.001)
    assert fn.calls == 3

@pytest.mark.parametrize("message", [
    "AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate",
    "AWS Error UNKNOWN (HTTP status 503) during GetObject operation",
    "HTTP 500 Internal Server Error", "502 Bad Gateway", "504 Gateway Timeout",
    "AWS Error REQUEST_TIMEOUT: RequestTimeout", "Connection reset by peer",
    "AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7",
    "Throttling: Rate exceeded",
])
def test_transient_errors_are_retried(message: str) -> None:
    fn = Flaky(OSError(message))
    assert storage.retry(fn, what="op", attempts=2, base_delay_s=0.001) == "ok"
    assert fn.calls == 2

@pytest.mark.parametrize("error", [
    OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied"),
    OSError("AWS Error NO_SUCH_BUCKET during PutObject: bucket 'b' (HTTP status 404)"),
    OSError("When reading 'b/part-00503.parquet': invalid argument"),
    PermissionError(13, "Permission denied"),
])
def test_permanent_errors_raise_at_once(error: OSError) -> None:
    fn = Flaky(error)
    with pytest.raises(storage.StorageError, match=r"^write s3://b/k: .*bucket name"):
        storage.retry(fn, what="write s3://b/k", base_delay_s=0.001)
    assert fn.calls == 1

def test_not_found_and_non_io_errors_are_not_wrapped() -> None:
    missing = Flaky(FileNotFoundError("Path does not exist 'b/k'"))
    with pytest.raises(FileNotFoundError, match="^read s3://b/k: not found"):
        storage.retry(missing, what="read s3://b/k")
    bug = Flaky(KeyError("column"))
    with pytest.raises(KeyError):
        storage.retry(bug, what="read s3://b/k")
    assert missing.calls == bug.calls == 1

# -- S3 failure modes ----------------------------------------------------------------------------
@pytest.mark.reliability
@pytest.mark.cluster
def test_unreachable_endpoint_fails_fast_and_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    endpoint = f"http://127.0.0.1:{closed_port()}"
    storage.configure(s3_endpoint_url=endpoint)  # default attempts: the bound users get
    uri = "s3://some-bucket/run/_manifest.json"
    start = time.monotonic()
    with pytest.raises(storage.StorageError) as info:
        outputs.is_complete("s3://some-bucket/run")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert uri in message and "gave up after 5 attempts" in message
    assert "AWS_ENDPOINT_URL" in message and endpoint in message and "bucket name" in message
    storage.configure(s3_endpoint_url=endpoint, max_attempts=1)
    with pytest.raises(storage.StorageError, match="s3://some-bucket/x.bin"):
        storage.write_bytes("s3://some-bucket/x.bin", b"x")

@pytest.mark.cluster
def test_missing_bucket_is_an_error_not_an_empty_folder(s3_endpoint: str) -> None:
    folder = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run"
    calls = [lambda: storage.read_bytes(folder + "/a.bin"), lambda: storage.exists(folder),
             lambda: storage.list_files(folder), lambda: outputs.require_complete(folder),
             lambda: storage.write_bytes(folder + "/a.bin", b"x")]
    for call in calls:
        with pytest.raises(storage.StorageError, match="bucket") as info:
            call()
        assert not isinstance(info.value, outputs.IncompleteOutputError)
        assert folder.split("/")[2] in str(info.value)

# -- interop with pyarrow / Ray Data -------------------------------------------------------------
def test_resolved_filesystem_reads_written_shards(root: str) -> None:
    for index in (0, 1):
        storage.write_table(TABLE, storage.join(root, outputs.shard_name(index)))
    fs, path = storage.resolve(root)
    for filesystem in (fs, pickle.loads(pickle.dumps(fs))):  # Ray ships it to workers
        dataset = pads.dataset(path, filesystem=filesystem, format="parquet")
        assert dataset.to_table().num_rows == 2 * TABLE.num_rows
