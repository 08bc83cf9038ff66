"""Local paths and ``s3://`` URIs behind one small API: the only module that knows the two.

Everything else passes URI strings. Every call goes through :func:`retry` (transient errors
are retried with backoff and logged; others raise at once with the URI in the message).

Writes are atomic: locally a hidden temp file (``.<name>.tmp-<uuid>``) in the same folder is
renamed over the final name; on S3 the whole payload is serialised in memory first and sent
as one upload, which S3 publishes only when complete. (A pyarrow S3 output stream that is
closed after an exception, or garbage-collected unclosed, *does* publish what was written so
far: never stream a parquet writer straight to S3.)

A job output folder holds ``part-NNNNN.parquet`` shards, an optional ``_rejects/`` folder and
``_manifest.json``, written last: a folder without it is incomplete.

S3 settings come from :func:`configure` (called once from the config), else from the
environment (``AWS_ENDPOINT_URL_S3`` > ``AWS_ENDPOINT_URL``; ``AWS_REGION`` >
``AWS_DEFAULT_REGION``; ``UNIME_STORAGE_MAX_ATTEMPTS``), which is all a Ray worker sees: pass
:func:`worker_env` in the runtime env. Credentials only ever come from the environment or the
instance role, and are never logged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import random
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

T = TypeVar("T")

SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".parquet"
MANIFEST_NAME = "_manifest.json"
REJECTS_DIR = "_rejects"
SCHEMA_VERSION = 1

PACKAGE_NAME = "unime-pipeline"
MAX_ATTEMPTS_ENV = "UNIME_STORAGE_MAX_ATTEMPTS"
DEFAULT_MAX_ATTEMPTS = 5
CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 60.0  # pyarrow applies it on Windows/macOS only
MAX_RETRY_DELAY_S = 20.0
HASH_CONTENT_MAX_BYTES = 64 * 1024 * 1024
FOOTER_READ_BYTES = 64 * 1024
FOOTER_CHECK_THREADS = 16
COPY_CHUNK_BYTES = 8 * 1024 * 1024
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "unime", "s3")
REQUIRED_MANIFEST_KEYS = ("rows_in", "rows_out", "rows_rejected", "config_hash", "seconds")

_SHARD_RE = re.compile(rf"^{re.escape(SHARD_PREFIX)}(\d+){re.escape(SHARD_SUFFIX)}$")
_TEMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_QUOTED_RE = re.compile(r"'[^']*'")
_NOT_TRANSIENT_RE = re.compile(
    r"ACCESS_DENIED|AccessDenied|NO_SUCH_BUCKET|NoSuchBucket|NO_SUCH_KEY|NoSuchKey|"
    r"InvalidAccessKeyId|SignatureDoesNotMatch|INVALID_ACCESS_KEY_ID", re.IGNORECASE)
_TRANSIENT_RE = re.compile(
    r"throttl|slow[ _]?down|\b(?:500|502|503|504)\b|request[ _]?time[ _]?out|connection reset|"
    r"timed out|NETWORK_CONNECTION|internal[ _]?(?:error|failure)|service[ _]?unavailable",
    re.IGNORECASE)


class StorageError(RuntimeError):
    """A storage call failed; the message names the URI and what to check."""


class IncompleteOutputError(StorageError):
    """An output folder has no manifest: the job that writes it did not finish."""


# -- settings ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Settings:
    s3_endpoint_url: str = ""
    s3_region: str = ""
    max_attempts: int | None = None


_configured = _Settings()
_lock = threading.Lock()
_filesystems: dict[tuple, pafs.S3FileSystem] = {}
_buckets_seen: set[tuple[str, str]] = set()


def configure(*, s3_endpoint_url: str = "", s3_region: str = "",
              max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> None:
    """Set this process's S3 endpoint, region and attempts per call ('' = from env)."""
    global _configured
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    _configured = _Settings(s3_endpoint_url.strip(), s3_region.strip(), max_attempts)
    reset_filesystems()
    logger.info("storage: S3 endpoint %s, region %s, %d attempts per call",
                _endpoint_url() or "AWS default", _region() or "SDK default", max_attempts)


def reset_filesystems() -> None:
    """Forget cached S3 filesystems and checked buckets (after changing env settings)."""
    with _lock:
        _filesystems.clear()
        _buckets_seen.clear()


def worker_env() -> dict[str, str]:
    """Environment variables that give a fresh process (a Ray worker) these settings."""
    env = {MAX_ATTEMPTS_ENV: str(_max_attempts())}
    if _endpoint_url():
        env["AWS_ENDPOINT_URL_S3"] = _endpoint_url()
    if _region():
        env["AWS_REGION"] = _region()
    return env


def _endpoint_url() -> str:
    return (_configured.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3", "")
            or os.environ.get("AWS_ENDPOINT_URL", ""))


def _region() -> str:
    return (_configured.s3_region or os.environ.get("AWS_REGION", "")
            or os.environ.get("AWS_DEFAULT_REGION", ""))


def _max_attempts() -> int:
    if _configured.max_attempts is not None:
        return _configured.max_attempts
    raw = os.environ.get(MAX_ATTEMPTS_ENV, "")
    if not raw:
        return DEFAULT_MAX_ATTEMPTS
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{MAX_ATTEMPTS_ENV}={raw!r} must be an integer >= 1")
    return int(raw)


def _split_endpoint(url: str) -> tuple[str, str]:
    """('http'|'https', 'host:port') of an endpoint URL; no scheme -> http on loopback only."""
    if "://" in url:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise StorageError(f"S3 endpoint {url!r} is not an http(s) URL: check "
                               "storage.s3_endpoint_url / AWS_ENDPOINT_URL")
        if parts.username or parts.password:
            raise StorageError("the S3 endpoint URL must not hold credentials: set "
                               "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment")
        return parts.scheme, parts.netloc
    host = url.rstrip("/")
    name = host.rsplit(":", 1)[0].strip("[]")
    loopback = name in ("localhost", "::1") or name.startswith("127.")
    return ("http" if loopback else "https"), host


# -- URIs and filesystems ---------------------------------------------------------------------
def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return uri.startswith("s3://")


def _s3_path(uri: str) -> str:
    """'bucket/key' of an s3:// URI (no trailing slash)."""
    raw = uri[len("s3://"):]
    path = raw.strip("/")
    if not path or raw.startswith("/"):
        raise ValueError(f"{uri!r} has no bucket name (expected s3://bucket/key)")
    return path


def _local_path(uri: str) -> str:
    match = _SCHEME_RE.match(uri)
    if match and match.group(1) != "file":
        raise ValueError(f"{uri!r}: unsupported URI scheme {match.group(1)!r} "
                         "(use a local path or s3://bucket/key)")
    path = uri[len("file://"):] if match else uri
    return os.path.abspath(os.path.expanduser(path))


def _s3_filesystem(sdk_attempts: int) -> pafs.S3FileSystem:
    endpoint, region = _endpoint_url(), _region()
    key = (endpoint, region, sdk_attempts)
    with _lock:
        if key not in _filesystems:
            kwargs: dict[str, Any] = {}
            if endpoint:
                kwargs["scheme"], kwargs["endpoint_override"] = _split_endpoint(endpoint)
            _filesystems[key] = pafs.S3FileSystem(
                region=region or None, connect_timeout=CONNECT_TIMEOUT_S,
                request_timeout=REQUEST_TIMEOUT_S, allow_delayed_open=True,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=sdk_attempts),
                **kwargs)
        return _filesystems[key]


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for ``uri``, e.g. for ``ray.data.read_parquet(path, filesystem=fs)``.

    The S3 filesystem retries each request itself (``max_attempts``), since callers like
    Ray Data use it directly. Local paths are made absolute.
    """
    if is_s3(uri):
        return _s3_filesystem(_max_attempts()), _s3_path(uri)
    return pafs.LocalFileSystem(), _local_path(uri)


def _resolve_io(uri: str) -> tuple[pafs.FileSystem, str]:
    """Like :func:`resolve`, but without SDK retries: this module's calls go through
    :func:`retry`, and two retry layers would multiply (a dead endpoint would take minutes)."""
    if is_s3(uri):
        return _s3_filesystem(1), _s3_path(uri)
    return pafs.LocalFileSystem(), _local_path(uri)


def join(uri: str, *parts: str) -> str:
    """``join("s3://b/x", "y") == "s3://b/x/y"``; local paths use ``os.path.join``."""
    if not is_s3(uri):
        return os.path.join(uri, *parts)
    pieces = [p.strip("/") for p in parts if p.strip("/")]
    return "/".join([uri.rstrip("/"), *pieces])


def _basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1] if is_s3(uri) else os.path.basename(uri)


def _is_temp(name: str) -> bool:
    return bool(_TEMP_RE.match(name))


# -- retry --------------------------------------------------------------------------------------
def _is_transient(err: BaseException) -> bool:
    if isinstance(err, FileNotFoundError | PermissionError) or not isinstance(err, OSError):
        return False
    text = _QUOTED_RE.sub("''", str(err))  # paths like 'part-00503.parquet' are not codes
    if _NOT_TRANSIENT_RE.search(text):
        return False
    return isinstance(err, ConnectionError | TimeoutError) or bool(_TRANSIENT_RE.search(text))


def _s3_hint() -> str:
    return (f" (check AWS_ENDPOINT_URL [in use: {_endpoint_url() or 'AWS default'}], the "
            "credentials in the environment or instance role, and the bucket name)")


def _hint(what: str, err: BaseException) -> str:
    return _s3_hint() if "s3://" in what or "AWS Error" in str(err) else ""


def retry(fn: Callable[[], T], *, what: str, attempts: int | None = None,
          base_delay_s: float = 0.2) -> T:
    """Call ``fn``; retry transient I/O errors with exponential backoff and jitter.

    Non-transient OS errors raise :class:`StorageError` at once (``FileNotFoundError`` stays
    one); other exceptions propagate unchanged. ``what`` names the operation and URI.
    """
    total = _max_attempts() if attempts is None else attempts
    if total < 1:
        raise ValueError(f"attempts must be >= 1, got {total}")
    for attempt in range(1, total + 1):
        try:
            return fn()
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{what}: not found: {err}") from err
        except OSError as err:
            if not _is_transient(err):
                raise StorageError(f"{what}: {err}{_hint(what, err)}") from err
            if attempt == total:
                raise StorageError(f"{what}: gave up after {total} attempts: {err}"
                                   f"{_hint(what, err)}") from err
            delay = min(base_delay_s * 2 ** (attempt - 1), MAX_RETRY_DELAY_S)
            delay *= random.uniform(0.5, 1.5)
            logger.warning("%s: attempt %d/%d failed (%s); retrying in %.2f s",
                           what, attempt, total, err, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _check_bucket(uri: str) -> None:
    """Raise StorageError if the bucket of an s3:// URI does not exist (cached when it does).

    Used when S3 answers "not found", which is also what a missing bucket or an endpoint that
    is not S3 answers. Best effort: a bucket we may not HEAD (403) is not reported.
    """
    if not is_s3(uri):
        return
    bucket = _s3_path(uri).split("/", 1)[0]
    key = (_endpoint_url(), bucket)
    if key in _buckets_seen:
        return
    fs, _ = _resolve_io(uri)
    try:
        info = retry(lambda: fs.get_file_info(bucket), what=f"check bucket of {uri}")
    except StorageError as err:
        logger.debug("could not check bucket %s: %s", bucket, err)
        return
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: bucket {bucket!r} does not exist at "
                           f"{_endpoint_url() or 'AWS'}{_s3_hint()}")
    with _lock:
        _buckets_seen.add(key)


def _io(op: str, uri: str, fn: Callable[[pafs.FileSystem, str], T]) -> T:
    """Run ``fn(fs, path)`` for ``uri`` under :func:`retry`; a missing bucket is an error."""
    fs, path = _resolve_io(uri)
    try:
        return retry(lambda: fn(fs, path), what=f"{op} {uri}")
    except FileNotFoundError:
        _check_bucket(uri)
        raise


# -- files ----------------------------------------------------------------------------------
def exists(uri: str) -> bool:
    """True if a file or folder (a non-empty prefix on S3) exists at ``uri``."""
    info = _io("stat", uri, lambda fs, path: fs.get_file_info(path))
    if info.type == pafs.FileType.NotFound:
        _check_bucket(uri)
        return False
    return True


def _list(fs: pafs.FileSystem, path: str, recursive: bool) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
    infos = fs.get_file_info(selector)
    return [i for i in infos if i.type == pafs.FileType.File and not _is_temp(i.base_name)]


def list_files(uri: str, suffix: str | None = None) -> list[str]:
    """Sorted URIs of the files directly under a folder; [] if it does not exist.

    Unfinished temp files of atomic writes are never listed.
    """
    infos = _io("list", uri, lambda fs, path: _list(fs, path, recursive=False))
    if not infos:
        _check_bucket(uri)
    names = sorted(i.base_name for i in infos if suffix is None or i.base_name.endswith(suffix))
    return [join(uri, name) for name in names]


def _read_all(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_bytes(uri: str) -> bytes:
    """The whole content of a file."""
    return _io("read", uri, _read_all)


def _write_local(path: str, data: bytes) -> None:
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(temp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _write_s3(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    # The whole payload in one write, then close(): the object appears only when close()
    # completes the upload. Small payloads go as one PUT (allow_delayed_open), larger ones
    # as a multipart upload that Arrow completes only when every part succeeded.
    stream = fs.open_output_stream(path)
    stream.write(data)
    stream.close()


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` atomically (readers see the old file, no file, or all of it)."""
    if is_s3(uri):
        _io("write", uri, lambda fs, path: _write_s3(fs, path, data))
    else:
        _io("write", uri, lambda fs, path: _write_local(path, data))


def read_json(uri: str) -> Any:
    """Parsed JSON content of a file."""
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except ValueError as err:
        raise StorageError(f"{uri}: not valid JSON ({err}); delete or rewrite it") from err


def write_json(uri: str, obj: Any) -> None:
    """Write ``obj`` as JSON (indent 2, sorted keys) atomically."""
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """One parquet file as a table (optionally only ``columns``)."""
    def read(fs: pafs.FileSystem, path: str) -> pa.Table:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).read(columns=columns)

    try:
        return _io("read parquet", uri, read)
    except pa.ArrowInvalid as err:
        raise StorageError(f"{uri}: cannot read as parquet: {err}") from err


def write_table(table: pa.Table, uri: str) -> None:
    """Write ``table`` as one zstd parquet file, atomically."""
    write_bytes(uri, _parquet_bytes(table))


def delete(uri: str) -> None:
    """Delete one file; no error if it is missing."""
    try:
        _io("delete", uri, lambda fs, path: fs.delete_file(path))
    except FileNotFoundError:
        pass


def delete_prefix(uri: str) -> None:
    """Delete a folder (every key under the prefix) recursively; no error if missing."""
    if is_s3(uri) and "/" not in _s3_path(uri):
        raise ValueError(f"refusing to delete a whole bucket: {uri}")
    if not is_s3(uri) and _local_path(uri) == os.path.sep:
        raise ValueError(f"refusing to delete the root folder: {uri}")
    try:
        _io("delete folder", uri, lambda fs, path: fs.delete_dir(path))
    except FileNotFoundError:
        pass


# -- shards and manifests ---------------------------------------------------------------------
def shard_name(index: int) -> str:
    """``shard_name(3) == "part-00003.parquet"``."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"{SHARD_PREFIX}{index:05d}{SHARD_SUFFIX}"


def shard_index(name_or_uri: str) -> int:
    """Inverse of :func:`shard_name` (accepts a full URI); ValueError for other names."""
    match = _SHARD_RE.match(_basename(name_or_uri))
    if not match:
        raise ValueError(f"{name_or_uri!r} is not a shard name like {shard_name(0)!r}")
    return int(match.group(1))


def shard_uris(folder: str) -> list[str]:
    """Existing ``part-*.parquet`` files of a folder, by index (never temp files)."""
    uris = [u for u in list_files(folder, suffix=SHARD_SUFFIX) if _SHARD_RE.match(_basename(u))]
    return sorted(uris, key=shard_index)


def _read_footer(fs: pafs.FileSystem, path: str) -> bytes:
    """The last bytes of a file: at least the parquet footer when it is intact."""
    with fs.open_input_file(path) as f:
        size = f.size()
        tail = f.read_at(min(size, FOOTER_READ_BYTES), max(size - FOOTER_READ_BYTES, 0))
        if len(tail) >= 8 and tail[-4:] == b"PAR1":
            need = int.from_bytes(tail[-8:-4], "little") + 8
            if len(tail) < need <= size:
                tail = f.read_at(need, size - need)
    return tail


def _footer_ok(uri: str) -> bool:
    """True if the file ends with a parquet footer that parses (False means incomplete)."""
    tail = _io("read footer of", uri, _read_footer)
    try:
        pq.read_metadata(pa.BufferReader(b"PAR1" + tail))
    except (pa.ArrowException, OSError) as err:  # parsing local bytes: no I/O here
        logger.warning("%s is truncated or corrupt (%s): not counted as complete", uri, err)
        return False
    return True


def completed_shards(folder: str) -> set[int]:
    """Indices of the folder's shards whose parquet footer reads OK."""
    uris = shard_uris(folder)
    with ThreadPoolExecutor(max_workers=min(FOOTER_CHECK_THREADS, max(len(uris), 1))) as pool:
        oks = list(pool.map(_footer_ok, uris))
    return {shard_index(u) for u, ok in zip(uris, oks, strict=True) if ok}


def _utc_now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _validate_counts(manifest: dict) -> None:
    for key in REQUIRED_MANIFEST_KEYS:
        if key not in manifest:
            raise ValueError(f"manifest is missing required key {key!r} "
                             f"(required: {', '.join(REQUIRED_MANIFEST_KEYS)})")
    rows_in, rows_out, rows_rejected = (manifest[k] for k in ("rows_in", "rows_out",
                                                               "rows_rejected"))
    if rows_in != rows_out + rows_rejected:
        raise ValueError(f"manifest counts do not balance: rows_in={rows_in} != rows_out="
                         f"{rows_out} + rows_rejected={rows_rejected}")


def write_manifest(folder: str, manifest: dict) -> dict:
    """Validate and write ``folder/_manifest.json``: call it last, after every shard.

    Adds ``schema_version``, ``code_version`` and ``written_at`` (informative) if absent.
    Returns the manifest as written.
    """
    _validate_counts(manifest)
    full = dict(manifest)
    full.setdefault("schema_version", SCHEMA_VERSION)
    full.setdefault("code_version", code_version())
    full.setdefault("written_at", _utc_now_iso())
    write_json(join(folder, MANIFEST_NAME), full)
    logger.info("wrote %s (rows in %s, out %s, rejected %s)", join(folder, MANIFEST_NAME),
                full["rows_in"], full["rows_out"], full["rows_rejected"])
    return full


def read_manifest(folder: str) -> dict | None:
    """The folder's manifest, or None if it has none."""
    uri = join(folder, MANIFEST_NAME)
    try:
        manifest = read_json(uri)
    except FileNotFoundError:
        return None
    if not isinstance(manifest, dict):
        raise StorageError(f"{uri}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise StorageError(f"{uri}: schema_version {version!r} is newer than this code's "
                           f"{SCHEMA_VERSION}; update the code or rerun the job")
    return manifest


def is_complete(folder: str) -> bool:
    """True if the folder has a manifest (its job finished)."""
    return exists(join(folder, MANIFEST_NAME))


def require_complete(folder: str) -> dict:
    """The folder's manifest, or IncompleteOutputError if its job did not finish."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise IncompleteOutputError(f"{folder} has no {MANIFEST_NAME}: the job that writes it "
                                    "did not finish; rerun it")
    return manifest


# -- fingerprints -------------------------------------------------------------------------------
def _content_id(uri: str, info: pafs.FileInfo) -> str:
    """sha256 of the content up to 64 MiB, else size and modification time."""
    if info.size > HASH_CONTENT_MAX_BYTES:
        return f"size={info.size},mtime_ns={info.mtime_ns}"

    def digest(fs: pafs.FileSystem, path: str) -> str:
        sha = hashlib.sha256()
        with fs.open_input_stream(path) as stream:
            while chunk := stream.read(COPY_CHUNK_BYTES):
                sha.update(chunk)
        return sha.hexdigest()

    return "sha256=" + _io("hash", uri, digest)


def _folder_entries(uri: str, infos: list[pafs.FileInfo],
                    prefix: str) -> tuple[list[list], list[pafs.FileInfo]]:
    """(entries, counted files) of a folder; a finished output (with a manifest) counts its
    data files by size plus the manifest's config_hash, so a rerun of the same config (new
    timings in the manifest) keeps its fingerprint."""
    files = {i.path[len(prefix) + 1:]: i for i in infos}
    manifest = read_manifest(uri) if MANIFEST_NAME in files else None
    if manifest is None:
        return [[rel, i.size, _content_id(join(uri, rel), i)] for rel, i in files.items()], infos
    data = {rel: i for rel, i in files.items() if rel != MANIFEST_NAME}
    entries = [[rel, i.size] for rel, i in data.items()]
    return [*entries, [MANIFEST_NAME, manifest.get("config_hash")]], list(data.values())


def fingerprint(uri: str) -> dict:
    """Stable fingerprint of an input file or folder: ``{uri, files, bytes, sha256}``.

    Entries are (relative name, size, content id) per file, where the content id is the
    sha256 of files up to 64 MiB and size+mtime above; a finished output folder (with a
    manifest) uses (relative name, size) of its data files and the manifest's
    ``config_hash`` instead of hashing its shards; ``files``/``bytes`` then count data files.
    """
    info = _io("stat", uri, lambda fs, path: fs.get_file_info(path))
    if info.type == pafs.FileType.NotFound:
        _check_bucket(uri)
        raise FileNotFoundError(f"fingerprint {uri}: no such file or folder")
    if info.type == pafs.FileType.File:
        counted = [info]
        entries = [[info.base_name, info.size, _content_id(uri, info)]]
    else:
        infos = _io("list", uri, lambda fs, path: _list(fs, path, recursive=True))
        entries, counted = _folder_entries(uri, infos, info.path)
    payload = json.dumps(sorted(entries), separators=(",", ":")).encode()
    return {"uri": uri, "files": len(counted), "bytes": sum(i.size for i in counted),
            "sha256": hashlib.sha256(payload).hexdigest()}


# -- code version -------------------------------------------------------------------------------
def _git(repo: str, *args: str) -> str:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # never touch the index of a live repo
    done = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                          timeout=10, check=True, env=env)
    return done.stdout.strip()


def _git_version(repo: str) -> str | None:
    """'<commit>[-dirty]' if ``repo`` is the top of a git work tree, else None."""
    try:
        if os.path.realpath(_git(repo, "rev-parse", "--show-toplevel")) != os.path.realpath(repo):
            return None
        commit = _git(repo, "rev-parse", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError) as err:
        logger.info("no git commit for %s (%s)", repo, getattr(err, "stderr", "") or err)
        return None
    return commit + ("-dirty" if dirty else "")


@functools.cache
def code_version() -> str:
    """Git commit of this repo (+``-dirty``), else ``unime-pipeline==<version>``. Never raises."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    version = _git_version(repo)
    if version:
        return version
    try:
        return f"{PACKAGE_NAME}=={importlib.metadata.version(PACKAGE_NAME)}"
    except importlib.metadata.PackageNotFoundError:
        logger.warning("code version unknown: %s is neither a git checkout nor installed", repo)
        return f"{PACKAGE_NAME}==unknown"


# -- download cache -----------------------------------------------------------------------------
@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download_file(uri: str, target: str) -> None:
    def copy(fs: pafs.FileSystem, path: str) -> None:
        with fs.open_input_stream(path) as stream, open(target, "wb") as out:
            while chunk := stream.read(COPY_CHUNK_BYTES):
                out.write(chunk)

    _io("download", uri, copy)


def _download_prefix(uri: str, dest: str) -> int:
    """Download every object under ``uri`` into ``dest`` (created whole at the end)."""
    info = _io("stat", uri, lambda fs, path: fs.get_file_info(path))
    if info.type == pafs.FileType.File:
        raise StorageError(f"download_to_cache({uri}): expects a folder prefix, not one object")
    infos = _io("list", uri, lambda fs, path: _list(fs, path, recursive=True))
    if not infos:
        _check_bucket(uri)
        raise FileNotFoundError(f"download_to_cache({uri}): no objects under this prefix")
    parent, name = os.path.split(dest)
    staging = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        for item in infos:
            rel = item.path[len(info.path) + 1:]
            target = os.path.join(staging, *rel.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            _download_file(join(uri, rel), target)
        if os.path.exists(dest):
            logger.warning("replacing unfinished download at %s", dest)
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sum(i.size for i in infos)


def download_to_cache(uri: str, cache_dir: str | None = None) -> str:
    """Local folder holding a copy of an s3:// prefix (downloaded once per node).

    The copy lives at ``<cache_dir>/<bucket>/<key>`` (default cache_dir
    ``~/.cache/unime/s3``); a marker file records completion and a file lock keeps
    concurrent processes from downloading twice. Later calls do not contact S3: delete the
    folder to refresh it. A local path is returned unchanged (it must exist).
    """
    if not is_s3(uri):
        if not os.path.exists(_local_path(uri)):
            raise FileNotFoundError(f"download_to_cache: {uri} does not exist")
        return uri
    root = os.path.abspath(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR))
    dest = os.path.join(root, *_s3_path(uri).split("/"))
    parent, name = os.path.split(dest)
    os.makedirs(parent, exist_ok=True)
    marker = os.path.join(parent, f".{name}.complete")
    with _file_lock(os.path.join(parent, f".{name}.lock")):
        if os.path.exists(marker):
            logger.info("using cached copy of %s at %s", uri, dest)
            return dest
        start = time.monotonic()
        size = _download_prefix(uri, dest)
        _write_local(marker, json.dumps({"uri": uri, "bytes": size}).encode())
    logger.info("downloaded %s (%.1f MiB) to %s in %.1f s", uri, size / 2**20, dest,
                time.monotonic() - start)
    return dest
