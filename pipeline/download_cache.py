"""A per-node local copy of an ``s3://`` folder (model weights): downloaded once, reused.

Model folders on S3 are copied to ``~/.cache/unime/s3/<bucket>/<key>`` the first time a
process on a node needs them; a file lock keeps concurrent processes (Ray workers) from
downloading twice and a marker file records completion.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator

import pyarrow.fs as pafs

from pipeline import storage

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "unime", "s3")


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
            while chunk := stream.read(storage.COPY_CHUNK_BYTES):
                out.write(chunk)

    storage.call("download", uri, copy)


def _download_prefix(uri: str, dest: str) -> int:
    """Download every object under ``uri`` into ``dest`` (created whole at the end)."""
    info = storage.call("stat", uri, lambda fs, path: fs.get_file_info(path))
    if info.type == pafs.FileType.File:
        raise storage.StorageError(f"download_to_cache({uri}): expects a folder prefix, not one object")
    infos = storage.call("list", uri, lambda fs, path: storage.list_infos(fs, path, recursive=True))
    if not infos:
        storage.check_bucket(uri)
        raise FileNotFoundError(f"download_to_cache({uri}): no objects under this prefix")
    parent, name = os.path.split(dest)
    staging = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        for item in infos:
            rel = item.path[len(info.path) + 1:]
            target = os.path.join(staging, *rel.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            _download_file(storage.join(uri, rel), target)
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
    if not storage.is_s3(uri):
        if not os.path.exists(storage.local_path(uri)):
            raise FileNotFoundError(f"download_to_cache: {uri} does not exist")
        return uri
    root = os.path.abspath(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR))
    dest = os.path.join(root, *storage.s3_path(uri).split("/"))
    parent, name = os.path.split(dest)
    os.makedirs(parent, exist_ok=True)
    marker = os.path.join(parent, f".{name}.complete")
    with _file_lock(os.path.join(parent, f".{name}.lock")):
        if os.path.exists(marker):
            logger.info("using cached copy of %s at %s", uri, dest)
            return dest
        start = time.monotonic()
        size = _download_prefix(uri, dest)
        storage.write_local(marker, json.dumps({"uri": uri, "bytes": size}).encode())
    logger.info("downloaded %s (%.1f MiB) to %s in %.1f s", uri, size / 2**20, dest,
                time.monotonic() - start)
    return dest
