"""Local paths and ``s3://`` URIs behind one small API: the only module that knows the two.

Everything else passes URI strings. Every call goes through :func:`retry` (transient errors
are retried with backoff and logged; others raise at once with the URI in the message).

Writes are atomic: locally a hidden temp file (``.<name>.tmp-<uuid>``) in the same folder is
renamed over the final name; on S3 the whole payload is serialised in memory first and sent
as one upload, which S3 publishes only when complete. (A pyarrow S3 output stream that is
closed after an exception, or garbage-collected unclosed, *does* publish what was written so
far: never stream a parquet writer straight to S3.)

Output folders (shards, rejects, manifests) are :mod:`pipeline.outputs`; fingerprints and the
code version :mod:`pipeline.provenance`; the per-node copy of S3 model folders
:mod:`pipeline.download_cache`.

S3 settings come from :func:`configure` (called once from the config), else from the
environment (``AWS_ENDPOINT_URL_S3`` > ``AWS_ENDPOINT_URL``; ``AWS_REGION`` >
``AWS_DEFAULT_REGION``; ``UNIME_STORAGE_MAX_ATTEMPTS``), which is all a Ray worker sees: pass
:func:`worker_env` in the runtime env. Credentials only ever come from the environment or the
instance role, and are never logged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_ATTEMPTS_ENV = "UNIME_STORAGE_MAX_ATTEMPTS"
DEFAULT_MAX_ATTEMPTS = 5
CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 60.0  # pyarrow applies it on Windows/macOS only
MAX_RETRY_DELAY_S = 20.0
COPY_CHUNK_BYTES = 8 * 1024 * 1024

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


def s3_path(uri: str) -> str:
    """'bucket/key' of an s3:// URI (no trailing slash)."""
    raw = uri[len("s3://"):]
    path = raw.strip("/")
    if not path or raw.startswith("/"):
        raise ValueError(f"{uri!r} has no bucket name (expected s3://bucket/key)")
    return path


def local_path(uri: str) -> str:
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
        return _s3_filesystem(_max_attempts()), s3_path(uri)
    return pafs.LocalFileSystem(), local_path(uri)


def _resolvecall(uri: str) -> tuple[pafs.FileSystem, str]:
    """Like :func:`resolve`, but without SDK retries: this module's calls go through
    :func:`retry`, and two retry layers would multiply (a dead endpoint would take minutes)."""
    if is_s3(uri):
        return _s3_filesystem(1), s3_path(uri)
    return pafs.LocalFileSystem(), local_path(uri)


def absolute_uri(uri: str) -> str:
    """``uri`` with a local path made absolute (Ray workers may run in another folder); an
    s3:// URI without its trailing slash."""
    return uri.rstrip("/") if is_s3(uri) else local_path(uri)


def join(uri: str, *parts: str) -> str:
    """``join("s3://b/x", "y") == "s3://b/x/y"``; local paths use ``os.path.join``."""
    if not is_s3(uri):
        return os.path.join(uri, *parts)
    pieces = [p.strip("/") for p in parts if p.strip("/")]
    return "/".join([uri.rstrip("/"), *pieces])


def basename(uri: str) -> str:
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


def check_bucket(uri: str) -> None:
    """Raise StorageError if the bucket of an s3:// URI does not exist (cached when it does).

    Used when S3 answers "not found", which is also what a missing bucket or an endpoint that
    is not S3 answers. Best effort: a bucket we may not HEAD (403) is not reported.
    """
    if not is_s3(uri):
        return
    bucket = s3_path(uri).split("/", 1)[0]
    key = (_endpoint_url(), bucket)
    if key in _buckets_seen:
        return
    fs, _ = _resolvecall(uri)
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


def call(op: str, uri: str, fn: Callable[[pafs.FileSystem, str], T]) -> T:
    """Run ``fn(fs, path)`` for ``uri`` under :func:`retry`; a missing bucket is an error."""
    fs, path = _resolvecall(uri)
    try:
        return retry(lambda: fn(fs, path), what=f"{op} {uri}")
    except FileNotFoundError:
        check_bucket(uri)
        raise


# -- files ----------------------------------------------------------------------------------
def exists(uri: str) -> bool:
    """True if a file or folder (a non-empty prefix on S3) exists at ``uri``."""
    info = call("stat", uri, lambda fs, path: fs.get_file_info(path))
    if info.type == pafs.FileType.NotFound:
        check_bucket(uri)
        return False
    return True


def list_infos(fs: pafs.FileSystem, path: str, recursive: bool) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
    infos = fs.get_file_info(selector)
    return [i for i in infos if i.type == pafs.FileType.File and not _is_temp(i.base_name)]


def list_files(uri: str, suffix: str | None = None) -> list[str]:
    """Sorted URIs of the files directly under a folder; [] if it does not exist.

    Unfinished temp files of atomic writes are never listed.
    """
    infos = call("list", uri, lambda fs, path: list_infos(fs, path, recursive=False))
    if not infos:
        check_bucket(uri)
    names = sorted(i.base_name for i in infos if suffix is None or i.base_name.endswith(suffix))
    return [join(uri, name) for name in names]


def _read_all(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_bytes(uri: str) -> bytes:
    """The whole content of a file."""
    return call("read", uri, _read_all)


def write_local(path: str, data: bytes) -> None:
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
        call("write", uri, lambda fs, path: _write_s3(fs, path, data))
    else:
        call("write", uri, lambda fs, path: write_local(path, data))


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


def _parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_size)
    return sink.getvalue().to_pybytes()


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """One parquet file as a table (optionally only ``columns``)."""
    def read(fs: pafs.FileSystem, path: str) -> pa.Table:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).read(columns=columns)

    try:
        return call("read parquet", uri, read)
    except pa.ArrowInvalid as err:
        raise StorageError(f"{uri}: cannot read as parquet: {err}") from err


def write_table(table: pa.Table, uri: str, *, row_group_size: int | None = None) -> None:
    """Write ``table`` as one zstd parquet file, atomically (row groups of
    ``row_group_size`` rows; None = pyarrow's default)."""
    write_bytes(uri, _parquet_bytes(table, row_group_size))


def upload_folder(local_dir: str, uri: str, *, last: str | None = None) -> str:
    """Copy a local folder to ``uri`` (local or s3://), replacing what was there.

    Files are written atomically one by one; ``last`` (a relative name) is written after
    all others, so it can serve as the folder's completion marker.
    """
    delete_prefix(uri)
    files = sorted(str(p.relative_to(local_dir)) for p in Path(local_dir).rglob("*")
                   if p.is_file())
    if last is not None:
        files = [f for f in files if f != last] + ([last] if last in files else [])
    for rel in files:
        write_bytes(join(uri, *rel.split(os.sep)), Path(local_dir, rel).read_bytes())
    return uri


def delete(uri: str) -> None:
    """Delete one file; no error if it is missing."""
    try:
        call("delete", uri, lambda fs, path: fs.delete_file(path))
    except FileNotFoundError:
        pass


def delete_prefix(uri: str) -> None:
    """Delete a folder (every key under the prefix) recursively; no error if missing."""
    if is_s3(uri) and "/" not in s3_path(uri):
        raise ValueError(f"refusing to delete a whole bucket: {uri}")
    if not is_s3(uri) and local_path(uri) == os.path.sep:
        raise ValueError(f"refusing to delete the root folder: {uri}")
    try:
        call("delete folder", uri, lambda fs, path: fs.delete_dir(path))
    except FileNotFoundError:
        pass


