"""One output folder of a job: deterministic shards, rejects, manifest (README: outputs).

Layout of a folder::

    _job.json                 identity of the step that owns the folder (written first)
    part-00000.parquet ...    output rows, shard i written atomically after its rejects
    _rejects/part-00000.parquet
    _stats/part-00000.json    per-shard statistics (some steps), summed by the manifest
    _manifest.json            written last; a folder without it is incomplete

A shard counts as done when its data file has a readable footer (its rejects file is
written before it). A rerun of the same step identity skips done shards; another identity
refuses to write into the folder instead of mixing outputs (the runner replaces a stale
step's folder before the step runs: ``pipeline.steps.base``).
"""
from __future__ import annotations

import collections
import datetime
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import provenance, storage

logger = logging.getLogger(__name__)

SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".parquet"
MANIFEST_NAME = "_manifest.json"
REJECTS_DIR = "_rejects"
JOB_FILE = "_job.json"
STATS_DIR = "_stats"
SCHEMA_VERSION = 1
FOOTER_READ_BYTES = 64 * 1024
FOOTER_CHECK_THREADS = 16
REQUIRED_MANIFEST_KEYS = ("rows_in", "rows_out", "rows_rejected", "config_hash", "seconds")

_SHARD_RE = re.compile(rf"^{re.escape(SHARD_PREFIX)}(\d+){re.escape(SHARD_SUFFIX)}$")

# A refused input row: nothing is dropped silently.
REJECTS = pa.schema([
    pa.field("id", pa.string()),
    pa.field("source", pa.string(), nullable=False),
    pa.field("field", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string(), nullable=False),
    pa.field("row_json", pa.string(), nullable=False),
])

# Reasons a row is rejected (the `reason` column); counted per reason in manifests.
REJECT_REASONS = (
    "missing_field",     # a required column is absent or null
    "wrong_type",        # a value has the wrong type (e.g. a number where text goes)
    "empty_text",        # a text is empty or whitespace (and no image stands in for it)
    "text_too_long",     # longer than data.max_text_chars
    "missing_image",     # an image path that does not exist
    "corrupt_image",     # an image of a known format whose bytes are broken
    "unsupported_image",  # not an image format (or codec) PIL reads
    "image_too_large",   # more pixels than pipeline.data.images.MAX_IMAGE_PIXELS (not decoded)
    "path_outside_root",  # an image path that resolves outside its image root (not opened)
    "bad_encoding",      # text bytes that are not UTF-8
    "extra_cells",       # a CSV row with more cells than its header
    "placeholder_mismatch",  # the text names an image placeholder but no image is given
    "duplicate_id",      # an id seen before in the same table
    "bad_candidates",    # eval row: target lists empty or of unequal length
    "nan_embedding",     # a model produced a NaN/inf vector for the row
    "missing_positive",  # a pair without a usable positive (mining)
)


class IncompleteOutputError(storage.StorageError):
    """An output folder has no manifest: the job that writes it did not finish."""


class OutputConflictError(storage.StorageError):
    """The folder belongs to another step identity (other settings or inputs)."""


class ShardedOutput:
    """Writer/reader of one job output folder, owned by one step identity.

    ``owner`` is the step hash (:func:`pipeline.steps.base.step_hash`): the folder's
    ``_job.json`` records it, and another owner is refused instead of mixing outputs."""

    def __init__(self, folder: str, owner: str, schema: pa.Schema) -> None:
        self.folder = folder.rstrip("/")
        self.owner = owner
        self.schema = schema

    # -- paths ----------------------------------------------------------------------------
    def shard_uri(self, index: int) -> str:
        return storage.join(self.folder, shard_name(index))

    def reject_uri(self, index: int) -> str:
        return storage.join(self.folder, REJECTS_DIR, shard_name(index))

    def stats_uri(self, index: int) -> str:
        """Per-shard statistics (JSON), kept so that a resumed run can sum them."""
        name = shard_name(index).replace(SHARD_SUFFIX, ".json")
        return storage.join(self.folder, STATS_DIR, name)

    # -- lifecycle -----------------------------------------------------------------------
    def claim(self, record: dict[str, Any] | None = None) -> None:
        """Mark the folder as this owner's (``record``: what else ``_job.json`` keeps, e.g.
        the step's identity); refuse a folder of another owner."""
        job_uri = storage.join(self.folder, JOB_FILE)
        if storage.exists(job_uri):
            recorded = storage.read_json(job_uri)
            owner = recorded.get("owner")
            if owner != self.owner:
                changed = describe_changes(recorded.get("identity"),
                                           (record or {}).get("identity"))
                raise OutputConflictError(
                    f"{self.folder} holds outputs of another config, made with other settings "
                    f"({changed}; step hash {str(owner):.12}, this run {self.owner:.12}); "
                    "choose another output_root or delete it (jobs/<step>.py and run_all "
                    "replace it)")
            return
        storage.write_json(job_uri, {"owner": self.owner, **(record or {})})

    def done_shards(self, num_shards: int) -> set[int]:
        """Shards below ``num_shards`` whose data and rejects files are complete."""
        data = completed_shards(self.folder)
        rejects = completed_shards(storage.join(self.folder, REJECTS_DIR))
        return {i for i in data & rejects if i < num_shards}

    def write_shard(self, index: int, rows: list[dict[str, Any]] | pa.Table,
                    rejects: list[dict[str, Any]], *, row_group_size: int | None = None) -> None:
        """Write the rejects, then the rows (atomically each): the data file marks done."""
        storage.write_table(pa.Table.from_pylist(rejects, schema=REJECTS), self.reject_uri(index))
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, self.schema)
        if not table.schema.equals(self.schema):
            raise ValueError(f"shard {index} of {self.folder}: schema {table.schema} differs "
                             f"from {self.schema}")
        storage.write_table(table, self.shard_uri(index), row_group_size=row_group_size)

    def shard_counts(self, index: int) -> tuple[int, collections.Counter]:
        """(rows out, rejects per reason) of a written shard, read from its files."""
        rows_out = _num_rows(self.shard_uri(index))
        reasons = storage.read_table(self.reject_uri(index), columns=["reason"])
        return rows_out, collections.Counter(reasons.column("reason").to_pylist())

    def finish(self, *, rows_in: int, num_shards: int, seconds: float, config_hash: str,
               extra: dict[str, Any] | None = None,
               check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Count every shard from its files and write the manifest (last): the counts, the
        run's ``config_hash``, the folder's owner as ``step_hash``, and ``extra``. ``check``
        sees the manifest first and may refuse it (raise): the folder then stays unfinished."""
        rows_out, reasons = 0, collections.Counter()
        for index in range(num_shards):
            out, why = self.shard_counts(index)
            rows_out += out
            reasons.update(why)
        manifest = {
            "rows_in": rows_in, "rows_out": rows_out, "rows_rejected": sum(reasons.values()),
            "rejects_by_reason": dict(sorted(reasons.items())), "num_shards": num_shards,
            "config_hash": config_hash, "step_hash": self.owner, "seconds": round(seconds, 3),
            "schema": self.schema.to_string(show_schema_metadata=False),
            **(extra or {}),
        }
        if check is not None:
            check(manifest)
        return write_manifest(self.folder, manifest)

    def first_reject(self, num_shards: int) -> dict[str, Any] | None:
        """The first rejected row of the folder's shards (for messages), or None."""
        for index in range(num_shards):
            table = storage.read_table(self.reject_uri(index))
            if table.num_rows:
                return table.slice(0, 1).to_pylist()[0]
        return None


def complete_input(folder: str) -> tuple[dict[str, Any], list[str]]:
    """(manifest, shard URIs) of a finished job output that a later step reads.

    Refuses an incomplete folder (no manifest) and one whose shard files do not match
    the count its manifest recorded."""
    manifest = require_complete(folder)
    shards = shard_uris(folder)
    if "num_shards" in manifest and len(shards) != manifest["num_shards"]:
        raise storage.StorageError(f"{folder}: manifest lists {manifest['num_shards']} shards "
                                   f"but {len(shards)} are present")
    return manifest, shards


def describe_changes(recorded: dict[str, Any] | None, current: dict[str, Any] | None) -> str:
    """What differs between two step identities (``{"settings": {key: value}, "inputs":
    {step: hash}}``), e.g. ``stage2.optim.lr: 0.001 -> 0.0005; input stage1 changed``."""
    if not recorded or not current or "settings" not in recorded:
        return "other settings"
    changes = []
    for key, value in current["settings"].items():
        changes += _diff(key, recorded["settings"].get(key), value)
    for parent in sorted(set(current["inputs"]) | set(recorded.get("inputs", {}))):
        if recorded.get("inputs", {}).get(parent) != current["inputs"].get(parent):
            changes.append(f"input {parent} changed")
    if not changes:
        return "other settings"
    more = f" (+{len(changes) - 6} more)" if len(changes) > 6 else ""
    return "; ".join(changes[:6]) + more


def _diff(key: str, old: Any, new: Any) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for sub in sorted(set(old) | set(new))
                for line in _diff(f"{key}.{sub}", old.get(sub), new.get(sub))]
    return [] if old == new else [f"{key}: {old!r} -> {new!r}"]


def _num_rows(uri: str) -> int:
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def chunk(items: list, size: int) -> list[list]:
    """Consecutive chunks of ``size`` items (the last may be shorter); [] -> one empty."""
    return [items[i:i + size] for i in range(0, len(items), size)] or [[]]


# -- shard files and manifests -----------------------------------------------------------------
def shard_name(index: int) -> str:
    """``shard_name(3) == "part-00003.parquet"``."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"{SHARD_PREFIX}{index:05d}{SHARD_SUFFIX}"


def shard_index(name_or_uri: str) -> int:
    """Inverse of :func:`shard_name` (accepts a full URI); ValueError for other names."""
    match = _SHARD_RE.match(storage.basename(name_or_uri))
    if not match:
        raise ValueError(f"{name_or_uri!r} is not a shard name like {shard_name(0)!r}")
    return int(match.group(1))


def shard_uris(folder: str) -> list[str]:
    """Existing ``part-*.parquet`` files of a folder, by index (never temp files)."""
    uris = [u for u in storage.list_files(folder, suffix=SHARD_SUFFIX) if _SHARD_RE.match(storage.basename(u))]
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
    tail = storage.call("read footer of", uri, _read_footer)
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
    full.setdefault("code_version", provenance.code_version())
    full.setdefault("written_at", _utc_now_iso())
    storage.write_json(storage.join(folder, MANIFEST_NAME), full)
    logger.info("wrote %s (rows in %s, out %s, rejected %s)", storage.join(folder, MANIFEST_NAME),
                full["rows_in"], full["rows_out"], full["rows_rejected"])
    return full


def read_manifest(folder: str) -> dict | None:
    """The folder's manifest, or None if it has none."""
    uri = storage.join(folder, MANIFEST_NAME)
    try:
        manifest = storage.read_json(uri)
    except FileNotFoundError:
        return None
    if not isinstance(manifest, dict):
        raise storage.StorageError(f"{uri}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise storage.StorageError(f"{uri}: schema_version {version!r} is newer than this code's "
                           f"{SCHEMA_VERSION}; update the code or rerun the job")
    return manifest


def is_complete(folder: str) -> bool:
    """True if the folder has a manifest (its job finished)."""
    return storage.exists(storage.join(folder, MANIFEST_NAME))


def require_complete(folder: str) -> dict:
    """The folder's manifest, or IncompleteOutputError if its job did not finish."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise IncompleteOutputError(f"{folder} has no {MANIFEST_NAME}: the job that writes it "
                                    "did not finish; rerun it")
    return manifest
