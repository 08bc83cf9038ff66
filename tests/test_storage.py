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
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline import storage

REPO = Path(__file__).resolve().parents[1]
TABLE = pa.table({"id": list(range(50)), "text": [f"row {i}" for i in range(50)]})
MANIFEST = {"rows_in": 10, "rows_out": 8, "rows_rejected": 2, "config_hash": "abc",
            "seconds": 1.5}


@pytest.fixture(autouse=True)
def _env_settings():
    """Every test starts (and leaves) storage on env-only settings."""
    storage.configure()
    yield
    storage.configure()


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.cluster)])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A folder URI that does not exist yet: local (tmp_path) or on a fresh S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parquet_bytes(table: pa.Table = TABLE) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


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
    uri = storage.join(root, storage.shard_name(0))
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


# -- shards and atomic writes ----------------------------------------------------------------
def test_shard_name_and_index() -> None:
    assert storage.shard_name(7) == "part-00007.parquet"
    assert storage.shard_index("s3://b/x/part-00007.parquet") == 7
    assert storage.shard_index(storage.shard_name(123456)) == 123456
    for bad in ("part-1.json", "xpart-00001.parquet", ".part-00001.parquet.tmp-ab", "part-.parquet"):
        with pytest.raises(ValueError, match="not a shard name"):
            storage.shard_index(bad)
    with pytest.raises(ValueError):
        storage.shard_name(-1)


def test_shard_uris_by_index_without_temp_or_other_files(root: str) -> None:
    for index in (100000, 2, 0):
        storage.write_bytes(storage.join(root, storage.shard_name(index)), b"x")
    leftover = f".{storage.shard_name(1)}.tmp-{uuid.uuid4().hex}"  # what a crash leaves
    for name in ("notes.parquet", leftover, "part-00003.parquet.bak"):
        storage.write_bytes(storage.join(root, name), b"x")
    assert storage.shard_uris(root) == [storage.join(root, storage.shard_name(i))
                                        for i in (0, 2, 100000)]
    assert storage.join(root, leftover) not in storage.list_files(root)


def test_crash_before_rename_leaves_nothing(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    folder = str(tmp_path / "out")
    seen: list[list[str]] = []

    def crash(src: str, dst: str) -> None:
        seen.append(sorted(os.listdir(folder)))
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(storage.StorageError, match="part-00000.parquet"):
        storage.write_table(TABLE, storage.join(folder, storage.shard_name(0)))
    monkeypatch.undo()
    assert len(seen) == 1 and seen[0][0].startswith(".part-00000.parquet.tmp-")
    assert os.listdir(folder) == []  # the temp file was removed, the final name never made
    assert storage.shard_uris(folder) == []


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
    assert storage.shard_uris(str(folder)) == []
    assert storage.list_files(str(folder)) == []
    assert storage.completed_shards(str(folder)) == set()


def test_failed_serialisation_publishes_nothing(root: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def half_then_fail(table: pa.Table, sink: pa.NativeFile, **kwargs: object) -> None:
        sink.write(b"PAR1 half a file")
        raise RuntimeError("writer died")

    uri = storage.join(root, storage.shard_name(0))
    monkeypatch.setattr(pq, "write_table", half_then_fail)
    with pytest.raises(RuntimeError, match="writer died"):
        storage.write_table(TABLE, uri)
    monkeypatch.undo()
    assert not storage.exists(uri)
    assert storage.shard_uris(root) == []


def test_completed_shards_skips_truncated_and_corrupt(root: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    data = parquet_bytes()
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    corrupt = data[:footer_start] + b"\xff" * 40 + data[footer_start + 40:]
    for index in (0, 2):
        storage.write_table(TABLE, storage.join(root, storage.shard_name(index)))
    storage.write_bytes(storage.join(root, storage.shard_name(1)), data[: len(data) // 2])
    storage.write_bytes(storage.join(root, storage.shard_name(3)), corrupt)
    storage.write_bytes(storage.join(root, storage.shard_name(4)), b"")
    with caplog.at_level(logging.WARNING, logger=storage.__name__):
        assert storage.completed_shards(root) == {0, 2}
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for index in (1, 3, 4):
        assert storage.join(root, storage.shard_name(index)) in warned
    assert storage.completed_shards(storage.join(root, "missing")) == set()


# -- manifests ---------------------------------------------------------------------------------
def test_manifest_marks_complete(root: str) -> None:
    storage.write_table(TABLE, storage.join(root, storage.shard_name(0)))
    assert not storage.is_complete(root)
    assert storage.read_manifest(root) is None
    with pytest.raises(storage.IncompleteOutputError) as info:
        storage.require_complete(root)
    assert root in str(info.value) and "_manifest.json" in str(info.value)
    assert "rerun" in str(info.value)
    written = storage.write_manifest(root, {**MANIFEST, "extra": [1, 2]})
    assert written["schema_version"] == storage.SCHEMA_VERSION
    assert written["code_version"] == storage.code_version()
    assert written["written_at"].endswith("+00:00")
    assert storage.is_complete(root)
    assert storage.require_complete(root) == written == storage.read_manifest(root)
    kept = storage.write_manifest(root, {**MANIFEST, "code_version": "pinned"})
    assert kept["code_version"] == "pinned"


@pytest.mark.parametrize("key", storage.REQUIRED_MANIFEST_KEYS)
def test_manifest_requires_keys(tmp_path: Path, key: str) -> None:
    bad = {k: v for k, v in MANIFEST.items() if k != key}
    with pytest.raises(ValueError, match=repr(key)):
        storage.write_manifest(str(tmp_path), bad)
    assert not storage.is_complete(str(tmp_path))


def test_manifest_counts_must_balance(root: str) -> None:
    with pytest.raises(ValueError, match=r"rows_in=10 != rows_out=8 \+ rows_rejected=1"):
        storage.write_manifest(root, {**MANIFEST, "rows_rejected": 1})
    assert not storage.is_complete(root)


def test_manifest_from_newer_code_is_refused(tmp_path: Path) -> None:
    storage.write_json(str(tmp_path / storage.MANIFEST_NAME),
                       {**MANIFEST, "schema_version": storage.SCHEMA_VERSION + 1})
    with pytest.raises(storage.StorageError, match="newer"):
        storage.require_complete(str(tmp_path))


# -- fingerprints ------------------------------------------------------------------------------
def test_fingerprint_tracks_content(root: str) -> None:
    storage.write_bytes(storage.join(root, "a.txt"), b"aaaa")
    storage.write_bytes(storage.join(root, "sub", "b.txt"), b"bb")
    first = storage.fingerprint(root)
    assert first == storage.fingerprint(root)
    assert (first["uri"], first["files"], first["bytes"]) == (root, 2, 6)
    storage.write_bytes(storage.join(root, "sub", "b.txt"), b"bc")  # same size, new content
    changed = storage.fingerprint(root)
    assert changed["sha256"] != first["sha256"]
    storage.write_bytes(storage.join(root, "sub", "b.txt"), b"bb")
    assert storage.fingerprint(root) == first
    one = storage.fingerprint(storage.join(root, "a.txt"))
    assert one["files"] == 1 and one["bytes"] == 4
    storage.write_bytes(storage.join(root, "a.txt"), b"aaab")
    assert storage.fingerprint(storage.join(root, "a.txt"))["sha256"] != one["sha256"]
    with pytest.raises(FileNotFoundError):
        storage.fingerprint(storage.join(root, "missing"))


def test_fingerprint_of_complete_output_uses_config_hash(root: str) -> None:
    storage.write_table(TABLE, storage.join(root, storage.shard_name(0)))
    storage.write_manifest(root, {**MANIFEST, "seconds": 1.0})
    first = storage.fingerprint(root)
    storage.write_manifest(root, {**MANIFEST, "seconds": 2.0, "written_at": "later"})
    assert storage.fingerprint(root) == first  # a rerun of the same config
    storage.write_manifest(root, {**MANIFEST, "config_hash": "other"})
    assert storage.fingerprint(root)["sha256"] != first["sha256"]


def test_fingerprint_of_large_file_uses_size_and_mtime(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "HASH_CONTENT_MAX_BYTES", 3)
    path = tmp_path / "big.bin"
    path.write_bytes(b"abcd")
    os.utime(path, ns=(10**18, 10**18))
    first = storage.fingerprint(str(path))
    path.write_bytes(b"abce")
    os.utime(path, ns=(10**18, 10**18))
    assert storage.fingerprint(str(path)) == first  # content is not read above the limit
    os.utime(path, ns=(10**18 + 1, 10**18 + 1))
    assert storage.fingerprint(str(path))["sha256"] != first["sha256"]


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
        storage.is_complete("s3://some-bucket/run")
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
             lambda: storage.list_files(folder), lambda: storage.require_complete(folder),
             lambda: storage.write_bytes(folder + "/a.bin", b"x")]
    for call in calls:
        with pytest.raises(storage.StorageError, match="bucket") as info:
            call()
        assert not isinstance(info.value, storage.IncompleteOutputError)
        assert folder.split("/")[2] in str(info.value)


# -- interop with pyarrow / Ray Data -------------------------------------------------------------
def test_resolved_filesystem_reads_written_shards(root: str) -> None:
    for index in (0, 1):
        storage.write_table(TABLE, storage.join(root, storage.shard_name(index)))
    fs, path = storage.resolve(root)
    for filesystem in (fs, pickle.loads(pickle.dumps(fs))):  # Ray ships it to workers
        dataset = pads.dataset(path, filesystem=filesystem, format="parquet")
        assert dataset.to_table().num_rows == 2 * TABLE.num_rows


# -- download cache ------------------------------------------------------------------------------
@pytest.mark.cluster
def test_download_to_cache_downloads_once(s3_bucket: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    model = storage.join(s3_bucket, "models", "tiny")
    files = {"config.json": b"{}", "sub/weights.bin": os.urandom(1000)}
    for rel, data in files.items():
        storage.write_bytes(storage.join(model, rel), data)
    calls: list[str] = []
    download = storage._download_prefix
    monkeypatch.setattr(storage, "_download_prefix",
                        lambda uri, dest: (calls.append(uri), download(uri, dest))[1])
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(
        storage.download_to_cache(model, str(tmp_path)))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    local = str(tmp_path / s3_bucket[len("s3://"):] / "models" / "tiny")
    assert results == [local] * 3 and len(calls) == 1
    for rel, data in files.items():
        assert (Path(local) / rel).read_bytes() == data
    storage.delete_prefix(model)  # a second call must not need S3
    assert storage.download_to_cache(model, str(tmp_path)) == local
    assert (Path(local) / "config.json").read_bytes() == b"{}" and len(calls) == 1
    with pytest.raises(FileNotFoundError, match="no objects"):
        storage.download_to_cache(storage.join(s3_bucket, "models", "absent"), str(tmp_path))


def test_download_to_cache_keeps_local_paths(tmp_path: Path) -> None:
    assert storage.download_to_cache(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError):
        storage.download_to_cache(str(tmp_path / "missing"))


# -- code version --------------------------------------------------------------------------------
def test_code_version_of_git_checkout_and_fallback(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f.py").write_text("a = 1\n")
    subprocess.run([*git, "add", "f.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()
    assert storage._git_version(str(tmp_path)) == commit
    (tmp_path / "f.py").write_text("a = 2\n")
    assert storage._git_version(str(tmp_path)) == commit + "-dirty"
    (tmp_path / "sub").mkdir()
    assert storage._git_version(str(tmp_path / "sub")) is None  # not the top of the repo
    monkeypatch.setattr(storage, "_git_version", lambda repo: None)
    assert storage.code_version.__wrapped__() == "unime-pipeline==0.1.0"
