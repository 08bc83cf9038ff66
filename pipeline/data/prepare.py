"""The prepare step: raw sources -> canonical Parquet shards, with Ray Data.

For each table the driver reads the sources (texts and image paths only, cheap),
marks duplicate ids, cuts the rows into shards of ``data.rows_per_shard`` and hands the
shards that are not done yet to Ray Data; each task validates its rows, packs the
images, and writes its shard and its rejects. Outputs, under ``<run_root>/prepare_data``::

    text_groups/   stage-1 input (from the NLI csv)
    pairs/         stage-2 input (MMEB-train folders and/or a JSONL of pairs)
    eval_images/   distinct eval images, packed, keyed by content
    eval/          MMEB-format eval queries referencing eval_images by key
    _manifest.json counts per table and per reject reason (written last)
"""
from __future__ import annotations

import logging
import os
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

STEP = "prepare_data"
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
    config_hash: str
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
        sources = Sources(**asdict(config.data.sources))
        if not (sources.nli_csv or sources.mmeb_train or sources.pairs_jsonl
                or sources.mmeb_eval):
            raise ValueError("data.use_demo_world is false but no data.sources.* is set "
                             "(nli_csv, mmeb_train, pairs_jsonl, mmeb_eval)")
        return sources
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
        _upload_tree(tmp, root)


def _upload_tree(local: str, uri: str) -> None:
    """Copy a local folder to ``uri``; the demo world's marker file goes last."""
    files = []
    for folder, _, names in os.walk(local):
        files += [os.path.join(folder, n) for n in names]
    files.sort(key=lambda p: (os.path.basename(p) == DEMO_WORLD_FILE, p))
    logger.info("uploading %d demo-world files to %s", len(files), uri)
    for path in files:
        rel = os.path.relpath(path, local).replace(os.sep, "/")
        with open(path, "rb") as f:
            storage.write_bytes(storage.join(uri, *rel.split("/")), f.read())


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


def _validator(task: ShardTask) -> Callable[[RawRow], dict[str, Any]]:
    if task.table == "text_groups":
        return lambda raw: validate_text_group(raw, task.max_text_chars)
    if task.table == "pairs":
        loader = ImageLoader(task.options)
        return lambda raw: validate_pair(raw, loader, task.max_text_chars)
    if task.table == "eval":
        return lambda raw: validate_eval(raw, task.image_keys or {}, task.max_text_chars)
    if task.table == "eval_images":
        loader = ImageLoader(task.options)

        def pack(raw: RawRow) -> dict[str, Any]:
            image = loader.load(raw.source, "image")
            return {"key": image.pixel_sha256[:32], "image": image.data, "source": raw.source}
        return pack
    raise ValueError(f"unknown table {task.table!r}")


def run_shard(task: ShardTask) -> dict[str, int]:
    """Validate one shard's rows and write the shard and its rejects."""
    validate = _validator(task)
    rows, rejects = [], []
    for raw in task.rows:
        try:
            rows.append(validate(raw))
        except RowError as err:
            rejects.append(reject_record(raw, err))
    output = ShardedOutput(task.folder, task.config_hash, TABLES[task.table])
    output.write_shard(task.index, rows, rejects)
    return {"shard": task.index, "rows_out": len(rows), "rows_rejected": len(rejects)}


# ---------------------------------------------------------------------------------------
# One table


def write_table(name: str, rows: list[RawRow], config: Config, *, inputs: dict[str, Any],
                image_keys: dict[str, Any] | None = None) -> dict[str, Any]:
    """Shard, validate and write one table with Ray Data; skip shards already done."""
    start = time.perf_counter()
    folder = storage.join(config.step_dir(STEP), name)
    output = ShardedOutput(folder, config.config_hash, TABLES[name])
    if outputs.is_complete(folder):
        logger.info("%s: complete already (%s)", name, folder)
        return outputs.read_manifest(folder) or {}
    output.claim()
    shards = chunk(rows, config.data.rows_per_shard)
    done = output.done_shards(len(shards))
    base = ShardTask(table=name, folder=folder, config_hash=config.config_hash, index=0,
                     rows=[], options=pack_options(config),
                     max_text_chars=config.data.max_text_chars)
    tasks = [replace(base, index=i, rows=shard, image_keys=_subset(image_keys, shard))
             for i, shard in enumerate(shards) if i not in done]
    logger.info("%s: %d rows in %d shards (%d done already, %d to write) -> %s", name,
                len(rows), len(shards), len(done), len(tasks), folder)
    run_shard_tasks(tasks, run_shard)
    manifest = output.finish(rows_in=len(rows), num_shards=len(shards),
                             seconds=time.perf_counter() - start,
                             extra={"table": name, "inputs": inputs,
                                    "shards_skipped": len(done)})
    logger.info("%s: %d in, %d out, %d rejected %s", name, manifest["rows_in"],
                manifest["rows_out"], manifest["rows_rejected"], manifest["rejects_by_reason"])
    return manifest


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


# ---------------------------------------------------------------------------------------
# The step


def prepare_data(config: Config) -> dict[str, Any]:
    """Run the prepare step; return its manifest (reused as is when already complete)."""
    start = time.perf_counter()
    step = config.step_dir(STEP)
    if outputs.is_complete(step):
        logger.info("prepare_data: complete already at %s (delete it to redo)", step)
        return outputs.require_complete(step)
    sources = resolve_sources(config)
    inputs = source_fingerprints(sources)
    tables = read_sources(sources)
    manifests: dict[str, dict[str, Any]] = {}
    for name in ("text_groups", "pairs"):
        if name in tables:
            manifests[name] = write_table(name, tables[name], config, inputs=inputs)
    if "eval" in tables:
        image_rows = [RawRow(id=None, source=uri, values={"image": uri})
                      for uri in eval_image_uris(tables["eval"])]
        manifests["eval_images"] = write_table("eval_images", image_rows, config,
                                               inputs=inputs)
        keys = read_image_keys(storage.join(step, "eval_images"))
        manifests["eval"] = write_table("eval", tables["eval"], config, inputs=inputs,
                                        image_keys=keys)
    summary = {name: {k: m[k] for k in ("rows_in", "rows_out", "rows_rejected",
                                        "rejects_by_reason")}
               for name, m in manifests.items()}
    manifest = {
        "rows_in": sum(m["rows_in"] for m in summary.values()),
        "rows_out": sum(m["rows_out"] for m in summary.values()),
        "rows_rejected": sum(m["rows_rejected"] for m in summary.values()),
        "tables": summary, "sources": asdict(sources), "inputs": inputs,
        "config_hash": config.config_hash, "config": config.to_dict(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return outputs.write_manifest(step, manifest)


def format_summary(manifest: dict[str, Any], step_dir: str) -> str:
    """One screen: rows in / out / rejected per table and per reason."""
    lines = [f"prepare_data -> {step_dir}  ({manifest['seconds']:.1f} s)",
             f"{'table':<12} {'rows in':>8} {'out':>8} {'rejected':>9}  reasons"]
    for name, m in manifest["tables"].items():
        reasons = ", ".join(f"{k}={v}" for k, v in m["rejects_by_reason"].items()) or "-"
        lines.append(f"{name:<12} {m['rows_in']:>8} {m['rows_out']:>8} "
                     f"{m['rows_rejected']:>9}  {reasons}")
    lines.append(f"{'total':<12} {manifest['rows_in']:>8} {manifest['rows_out']:>8} "
                 f"{manifest['rows_rejected']:>9}")
    lines.append(f"rejected rows with their reasons: {step_dir}/<table>/_rejects/")
    return "\n".join(lines)
