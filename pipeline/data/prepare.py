"""Raw sources -> canonical Parquet tables (the work of the prepare step,
:mod:`pipeline.steps.prepare_data`).

For each table the driver reads the sources (texts and image paths only, cheap), marks
duplicate ids, cuts the rows into shards of ``data.rows_per_shard`` and hands the shards
that are not done yet to Ray Data (:func:`write_table`); each task validates its rows,
packs the images, and writes its shard and its rejects (:func:`run_shard`). The sources
are the configured files, or the demo world generated under ``<run_root>/sources``
(:func:`resolve_sources`, also used by evaluate for the demo's caption sets).
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from pipeline import outputs, provenance, storage
from pipeline.config import Config
from pipeline.data import readers
from pipeline.data.images import PackOptions
from pipeline.data.readers import RawRow
from pipeline.data.schemas import TABLES
from pipeline.data.validate import (
    ImageLoader,
    RowError,
    eval_image_uris,
    reject_record,
    validate_eval,
    validate_pair,
    validate_text_group,
)
from pipeline.outputs import ShardedOutput, chunk
from pipeline.ray_utils import run_shard_tasks

logger = logging.getLogger(__name__)

DEMO_WORLD_FILE = "world.json"


@dataclass(frozen=True)
class Sources:
    """Resolved source URIs ('' = not used)."""

    nli_csv: str = ""
    mmeb_train: str = ""
    mmeb_train_images: str = ""
    mmeb_eval: str = ""
    mmeb_eval_images: str = ""
    pairs_jsonl: str = ""
    pairs_images: str = ""


@dataclass(frozen=True)
class ShardTask:
    """Everything one Ray task needs to write one shard."""

    table: str
    folder: str
    owner: str                                  # the prepare step's hash
    index: int
    rows: list[RawRow]
    options: PackOptions
    max_text_chars: int
    image_keys: dict[str, Any] | None = None   # eval rows: image URI -> key | RowError


# ---------------------------------------------------------------------------------------
# Sources


def resolve_sources(config: Config) -> Sources:
    """The configured sources, or the demo world generated under ``<run_root>/sources``."""
    if not config.data.use_demo_world:
        return Sources(**asdict(config.data.sources))
    root = storage.join(config.run_root, "sources", "demo_world")
    ensure_demo_world(root, config)
    return Sources(nli_csv=storage.join(root, "nli", "nli_for_simcse.csv"),
                   mmeb_train=storage.join(root, "mmeb_train"), mmeb_train_images=root,
                   mmeb_eval=storage.join(root, "mmeb_eval"), mmeb_eval_images=root)


def ensure_demo_world(root: str, config: Config) -> None:
    """Generate the demo world into ``root`` (local or S3) unless it is already there."""
    if storage.exists(storage.join(root, DEMO_WORLD_FILE)):
        logger.info("demo world already at %s", root)
        return
    from pipeline.data.demo_world import generate_demo_world

    demo = asdict(config.data.demo)
    if not storage.is_s3(root):
        generate_demo_world(root, **demo)
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate_demo_world(tmp, **demo)
        logger.info("uploading the demo world to %s", root)
        storage.upload_folder(tmp, root, last=DEMO_WORLD_FILE)


def source_fingerprints(sources: Sources) -> dict[str, list[dict[str, Any]]]:
    """Fingerprints of the record files of every source (not of image folders: too big)."""
    return {name: [provenance.fingerprint(f) for f in readers.list_record_files(uri)]
            for name, uri in asdict(sources).items() if uri and not name.endswith("_images")}


def read_sources(sources: Sources) -> dict[str, list[RawRow]]:
    """Raw rows per table; file-level errors (missing file, wrong columns) raise here."""
    tables: dict[str, list[RawRow]] = {}
    if sources.nli_csv:
        tables["text_groups"] = readers.read_nli_csv(sources.nli_csv)
    pairs: list[RawRow] = []
    if sources.mmeb_train:
        pairs += readers.read_mmeb_train(sources.mmeb_train, sources.mmeb_train_images)
    if sources.pairs_jsonl:
        pairs += readers.read_pairs_jsonl(sources.pairs_jsonl, sources.pairs_images)
    if pairs:
        tables["pairs"] = pairs
    if sources.mmeb_eval:
        tables["eval"] = readers.read_mmeb_eval(sources.mmeb_eval, sources.mmeb_eval_images)
    for name, rows in tables.items():
        duplicates = readers.mark_duplicate_ids(rows)
        if duplicates:
            logger.warning("%s: %d rows have a duplicate id (rejected)", name, duplicates)
    return tables


# ---------------------------------------------------------------------------------------
# One shard (runs inside a Ray task)


IMAGE_TABLES = ("pairs", "eval_images")  # tables that pack images (frames_dropped counted)


def _validator(task: ShardTask, loader: ImageLoader) -> Callable[[RawRow], dict[str, Any]]:
    if task.table == "text_groups":
        return lambda raw: validate_text_group(raw, task.max_text_chars)
    if task.table == "pairs":
        return lambda raw: validate_pair(raw, loader, task.max_text_chars)
    if task.table == "eval":
        return lambda raw: validate_eval(raw, task.image_keys or {}, task.max_text_chars)
    if task.table == "eval_images":
        def pack(raw: RawRow) -> dict[str, Any]:
            image = loader.load(raw.image_uris["image"], "image")
            return {"key": image.pixel_sha256[:32], "image": image.data, "source": raw.source}
        return pack
    raise ValueError(f"unknown table {task.table!r}")


def run_shard(task: ShardTask) -> dict[str, int]:
    """Validate one shard's rows and write its stats, its rejects and the shard (last)."""
    loader = ImageLoader(task.options)
    validate = _validator(task, loader)
    rows, rejects = [], []
    for raw in task.rows:
        try:
            rows.append(validate(raw))
        except RowError as err:
            rejects.append(reject_record(raw, err))
    output = ShardedOutput(task.folder, task.owner, TABLES[task.table])
    if task.table in IMAGE_TABLES:
        storage.write_json(output.stats_uri(task.index), {"frames_dropped": loader.frames_dropped})
    output.write_shard(task.index, rows, rejects)
    return {"shard": task.index, "rows_out": len(rows), "rows_rejected": len(rejects)}


def frames_dropped(output: ShardedOutput, num_shards: int) -> int:
    """Frames dropped from multi-frame images over a table's shards (from their stats)."""
    return sum(storage.read_json(output.stats_uri(i))["frames_dropped"]
               for i in range(num_shards))


# ---------------------------------------------------------------------------------------
# One table


class SourcesChangedError(outputs.OutputConflictError):
    """Finished outputs were prepared from source files whose content has changed since."""


class RejectedTableError(readers.SourceError):
    """A table's sources gave no rows, or more rejects than ``data.max_reject_fraction``."""


def check_same_sources(recorded: dict[str, Any] | None, current: dict[str, Any], where: str,
                       run_root: str) -> None:
    """Refuse finished outputs made from other source files (content hash or ETag, size)."""
    if recorded is None:
        logger.warning("%s records no source fingerprints: cannot tell whether the sources "
                       "changed", where)
        return
    changed = [f"data.sources.{name}: {_digest(recorded.get(name))} -> {_digest(files)}"
               for name, files in sorted(current.items()) if recorded.get(name) != files]
    changed += [f"data.sources.{name}: no longer used" for name in recorded
                if name not in current]
    if changed:
        raise SourcesChangedError(
            f"{where} was prepared from other source files ({'; '.join(changed)}); the run's "
            f"later steps used those rows too: delete {run_root} (or choose another "
            "output_root) to prepare and train from the current files")


def _digest(files: list[dict[str, Any]] | None) -> str:
    """Short content id of a source's files (sha256 of their fingerprints)."""
    if not files:
        return "none"
    payload = json.dumps([f.get("sha256") for f in files]).encode()
    return f"sha256 {hashlib.sha256(payload).hexdigest()[:12]} ({len(files)} file(s), " \
           f"{sum(f.get('bytes', 0) for f in files)} bytes)"


DERIVED_TABLES = ("eval_images",)  # built from other tables' rows: may be empty (text-only)


def check_rejects(name: str, output: ShardedOutput, num_shards: int,
                  max_fraction: float) -> Callable[[dict[str, Any]], None]:
    """A table manifest check: refuse no rows in (a source table), no rows out, or a reject
    share above ``max_fraction``, naming the top reasons and one rejected row."""
    def check(manifest: dict[str, Any]) -> None:
        rows_in, rejected = manifest["rows_in"], manifest["rows_rejected"]
        if rows_in == 0 and name in DERIVED_TABLES:
            return
        if rows_in == 0:
            raise RejectedTableError(f"{name}: its sources hold no rows (an empty file?); "
                                     "fill them or leave that source unset")
        share = rejected / rows_in
        if manifest["rows_out"] and share <= max_fraction:
            return
        reasons = collections.Counter(manifest["rejects_by_reason"]).most_common(3)
        example = output.first_reject(num_shards) or {}
        raise RejectedTableError(
            f"{name}: {rejected} of {rows_in} rows rejected ({share:.0%}; "
            f"data.max_reject_fraction={max_fraction}), top reasons "
            f"{', '.join(f'{r} ({n})' for r, n in reasons)}; e.g. row {example.get('id')!r} "
            f"({example.get('source')}) {example.get('field')}: {example.get('reason')}: "
            f"{str(example.get('detail'))[:200]}; every reject in {output.folder}/_rejects/")
    return check


@dataclass(frozen=True)
class TableJob:
    """Where and how the tables of one prepare run are written."""

    folder: str                   # the step folder; table ``name`` goes to ``folder/name``
    owner: str                    # the step hash (owner of every table folder)
    job_record: dict[str, Any]    # the step's identity, for each table's _job.json
    config_hash: str
    options: PackOptions
    max_text_chars: int
    rows_per_shard: int
    inputs: dict[str, Any]        # source fingerprints, recorded in every table manifest
    max_reject_fraction: float    # a table with a larger reject share fails the step
    run_root: str                 # named when finished tables came from other sources


def write_table(name: str, rows: list[RawRow], job: TableJob, *,
                image_keys: dict[str, Any] | None = None) -> dict[str, Any]:
    """Shard, validate and write one table with Ray Data; skip shards already done."""
    start = time.perf_counter()
    folder = storage.join(job.folder, name)
    output = ShardedOutput(folder, job.owner, TABLES[name])
    done_manifest = outputs.read_manifest(folder)
    if done_manifest is not None and done_manifest.get("step_hash") == job.owner:
        check_same_sources(done_manifest.get("inputs"), job.inputs, f"table {folder}",
                           job.run_root)
        logger.info("%s: complete already (%s)", name, folder)
        return done_manifest
    output.claim(job.job_record)
    shards = chunk(rows, job.rows_per_shard)
    done = output.done_shards(len(shards))
    base = ShardTask(table=name, folder=folder, owner=job.owner, index=0, rows=[],
                     options=job.options, max_text_chars=job.max_text_chars)
    tasks = [replace(base, index=i, rows=shard, image_keys=_subset(image_keys, shard))
             for i, shard in enumerate(shards) if i not in done]
    logger.info("%s: %d rows in %d shards (%d done already, %d to write) -> %s", name,
                len(rows), len(shards), len(done), len(tasks), folder)
    run_shard_tasks(tasks, run_shard)
    manifest = output.finish(rows_in=len(rows), num_shards=len(shards),
                             seconds=time.perf_counter() - start, config_hash=job.config_hash,
                             extra={"table": name, "inputs": job.inputs,
                                    "shards_skipped": len(done), **(
                                        {"frames_dropped": frames_dropped(output, len(shards))}
                                        if name in IMAGE_TABLES else {})},
                             check=check_rejects(name, output, len(shards),
                                                 job.max_reject_fraction))
    logger.info("%s: %d in, %d out, %d rejected %s", name, manifest["rows_in"],
                manifest["rows_out"], manifest["rows_rejected"], manifest["rejects_by_reason"])
    return manifest


def rows_per_dataset(folder: str) -> dict[str, int]:
    """Rows per ``dataset`` of a written pairs table (for checks against the batch size)."""
    counts: collections.Counter[str] = collections.Counter()
    for uri in outputs.shard_uris(folder):
        counts.update(storage.read_table(uri, columns=["dataset"]).column("dataset").to_pylist())
    return dict(sorted(counts.items()))


def pack_options(config: Config) -> PackOptions:
    names = {f.name for f in fields(PackOptions)}
    return PackOptions(**{k: v for k, v in asdict(config.data).items() if k in names})


def _subset(image_keys: dict[str, Any] | None, rows: list[RawRow]) -> dict[str, Any] | None:
    """The part of the image-key map that one eval shard needs."""
    if image_keys is None:
        return None
    return {uri: image_keys[uri] for uri in eval_image_uris(rows)}


def read_image_keys(folder: str) -> dict[str, str | RowError]:
    """Image URI -> key (or the reason it was rejected) from an ``eval_images`` output."""
    keys: dict[str, str | RowError] = {}
    for uri in outputs.shard_uris(folder):
        table = storage.read_table(uri, columns=["source", "key"])
        keys.update(zip(table.column("source").to_pylist(), table.column("key").to_pylist(),
                        strict=True))
    for uri in outputs.shard_uris(storage.join(folder, outputs.REJECTS_DIR)):
        table = storage.read_table(uri, columns=["source", "reason", "detail"])
        for row in table.to_pylist():
            keys[row["source"]] = RowError(row["reason"], "image", row["detail"])
    return keys
