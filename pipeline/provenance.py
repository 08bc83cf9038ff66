"""What an output was made from: fingerprints of its inputs and the code version.

Every manifest records both (``inputs``, ``code_version``), so a result can be traced to
the data and the commit (and the exact sources) that produced it, also in a job submitted
with ``--working-dir`` (no ``.git`` there): see :func:`code_version`.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import pathlib
import subprocess

import pyarrow.fs as pafs

from pipeline import outputs, storage

logger = logging.getLogger(__name__)

PACKAGE_NAME = "unime-pipeline"
HASH_CONTENT_MAX_BYTES = 64 * 1024 * 1024


# -- fingerprints -------------------------------------------------------------------------------
def _content_id(uri: str, info: pafs.FileInfo) -> str:
    """sha256 of the content up to 64 MiB, else size and modification time."""
    if info.size > HASH_CONTENT_MAX_BYTES:
        return f"size={info.size},mtime_ns={info.mtime_ns}"

    def digest(fs: pafs.FileSystem, path: str) -> str:
        sha = hashlib.sha256()
        with fs.open_input_stream(path) as stream:
            while chunk := stream.read(storage.COPY_CHUNK_BYTES):
                sha.update(chunk)
        return sha.hexdigest()

    return "sha256=" + storage.call("hash", uri, digest)


def _folder_entries(uri: str, infos: list[pafs.FileInfo],
                    prefix: str) -> tuple[list[list], list[pafs.FileInfo]]:
    """(entries, counted files) of a folder; a finished output (with a manifest) counts its
    data files by size plus the manifest's config_hash, so a rerun of the same config (new
    timings in the manifest) keeps its fingerprint."""
    files = {i.path[len(prefix) + 1:]: i for i in infos}
    manifest = outputs.read_manifest(uri) if outputs.MANIFEST_NAME in files else None
    if manifest is None:
        return [[rel, i.size, _content_id(storage.join(uri, rel), i)] for rel, i in files.items()], infos
    data = {rel: i for rel, i in files.items() if rel != outputs.MANIFEST_NAME}
    entries = [[rel, i.size] for rel, i in data.items()]
    return [*entries, [outputs.MANIFEST_NAME, manifest.get("config_hash")]], list(data.values())


def fingerprint(uri: str) -> dict:
    """Stable fingerprint of an input file or folder: ``{uri, files, bytes, sha256}``.

    Entries are (relative name, size, content id) per file, where the content id is the
    sha256 of files up to 64 MiB and size+mtime above; a finished output folder (with a
    manifest) uses (relative name, size) of its data files and the manifest's
    ``config_hash`` instead of hashing its shards; ``files``/``bytes`` then count data files.
    """
    info = storage.call("stat", uri, lambda fs, path: fs.get_file_info(path))
    if info.type == pafs.FileType.NotFound:
        storage.check_bucket(uri)
        raise FileNotFoundError(f"fingerprint {uri}: no such file or folder")
    if info.type == pafs.FileType.File:
        counted = [info]
        entries = [[info.base_name, info.size, _content_id(uri, info)]]
    else:
        infos = storage.call("list", uri, lambda fs, path: storage.list_infos(fs, path, recursive=True))
        entries, counted = _folder_entries(uri, infos, info.path)
    payload = json.dumps(sorted(entries), separators=(",", ":")).encode()
    return {"uri": uri, "files": len(counted), "bytes": sum(i.size for i in counted),
            "sha256": hashlib.sha256(payload).hexdigest()}


# -- code version -------------------------------------------------------------------------------
CODE_COMMIT_ENV = "UNIME_CODE_COMMIT"  # set by jobs/submit.py: the .git folder is not uploaded
SOURCE_GLOBS = ("pipeline/**/*.py", "jobs/**/*.py", "jobs/configs/**/*.yaml")
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(repo: str, *args: str) -> str:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # never touch the index of a live repo
    done = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                          timeout=10, check=True, env=env)
    return done.stdout.strip()


def git_version(repo: str) -> str | None:
    """'<commit>[-dirty]' if ``repo`` is the top of a git work tree (dirty: uncommitted
    changes to tracked files), else None."""
    try:
        if os.path.realpath(_git(repo, "rev-parse", "--show-toplevel")) != os.path.realpath(repo):
            return None
        commit = _git(repo, "rev-parse", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError) as err:
        logger.debug("no git commit for %s (%s)", repo, getattr(err, "stderr", "") or err)
        return None
    return commit + ("-dirty" if dirty else "")


def source_hash(root: str) -> str:
    """sha256 of the sources under ``root`` that a job runs (:data:`SOURCE_GLOBS`): sorted
    relative paths and contents. A few ms (this repo: ~75 files, 0.6 MB, 2-8 ms)."""
    base = pathlib.Path(root)
    paths = sorted({p.relative_to(base).as_posix() for pattern in SOURCE_GLOBS
                    for p in base.glob(pattern) if p.is_file()})
    sha = hashlib.sha256()
    for rel in paths:
        data = (base / rel).read_bytes()
        sha.update(f"{rel}\0{len(data)}\0".encode())
        sha.update(data)
    return sha.hexdigest()


def _base_version(root: str) -> str:
    """The git commit of ``root``, else ``$UNIME_CODE_COMMIT``, else the installed package."""
    version = git_version(root) or os.environ.get(CODE_COMMIT_ENV, "").strip()
    if version:
        return version
    try:
        return f"{PACKAGE_NAME}=={importlib.metadata.version(PACKAGE_NAME)}"
    except importlib.metadata.PackageNotFoundError:
        logger.warning("code version unknown: %s is neither a git checkout nor installed, and "
                       "%s is not set", root, CODE_COMMIT_ENV)
        return f"{PACKAGE_NAME}==unknown"


def describe_code(root: str) -> str:
    """``<base>+src.<12 hex of source_hash(root)>`` (see :func:`code_version`). Never raises."""
    try:
        digest = source_hash(root)[:12]
    except OSError as err:
        logger.warning("cannot hash the sources under %s: %s", root, err)
        digest = "unknown"
    return f"{_base_version(root)}+src.{digest}"


@functools.cache
def code_version() -> str:
    """What code wrote an output: ``<base>+src.<12 hex>``. The hex is the sha256 of the
    sources that run (``pipeline/**/*.py``, ``jobs/**/*.py``, ``jobs/configs/**/*.yaml`` of
    the tree this module was imported from), so it holds in a job's uploaded copy of the
    working dir too; ``<base>`` is the git commit of that tree (``-dirty`` with uncommitted
    changes), else ``$UNIME_CODE_COMMIT`` (the submitting checkout's, set by
    ``jobs/submit.py``), else ``unime-pipeline==<installed version>``. Never raises."""
    return describe_code(SOURCE_ROOT)
