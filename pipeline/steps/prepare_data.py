"""Step 1, prepare_data: raw sources (or the built-in demo world) -> canonical Parquet tables.

Outputs under ``<run_root>/prepare_data``::

    text_groups/   stage-1 input (from the NLI csv)
    pairs/         stage-2 input (MMEB-train folders and/or a JSONL of pairs)
    eval_images/   distinct eval images, packed, keyed by content
    eval/          MMEB-format eval queries referencing eval_images by key
    _manifest.json counts per table and per reject reason, pairs per dataset (written last)

The work itself (reading, validation, image packing, one Ray Data task per shard) is
:mod:`pipeline.data.prepare`.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from pipeline import outputs, storage
from pipeline.config import Config, ConfigError
from pipeline.steps import base

logger = logging.getLogger(__name__)

NAME = "prepare_data"
READS = ("data",)
USES_RAY = True
RECORD_SOURCES = ("nli_csv", "mmeb_train", "mmeb_eval", "pairs_jsonl")


def inputs(config: Config) -> tuple[str, ...]:
    return ()


def check(config: Config) -> None:
    """Sources either come from the demo world or are given, never both."""
    given = {k: v for k, v in dataclasses.asdict(config.data.sources).items() if v}
    if config.data.use_demo_world and given:
        raise ConfigError(f"data.sources.{next(iter(given))} is set but data.use_demo_world=true "
                          "ignores every source: set data.use_demo_world=false to use yours")
    if not config.data.use_demo_world and not any(given.get(k) for k in RECORD_SOURCES):
        raise ConfigError("data.use_demo_world is false but no data.sources.* is set "
                          f"({', '.join(RECORD_SOURCES)})")


def check_sources(config: Config) -> None:
    """Every given source file or folder exists (FileNotFoundError names the key)."""
    from pipeline.data import readers

    if config.data.use_demo_world:
        return
    for key, uri in dataclasses.asdict(config.data.sources).items():
        if not uri:
            continue
        if key in RECORD_SOURCES:
            try:
                readers.list_record_files(uri)
            except readers.SourceError as err:
                raise FileNotFoundError(f"data.sources.{key}: {err}") from err
        elif not storage.exists(uri):
            raise FileNotFoundError(f"data.sources.{key}: {uri} does not exist")


def run(config: Config) -> dict[str, Any]:
    """Prepare every table (or reuse the finished step); returns the manifest."""
    from pipeline.data import prepare
    from pipeline.data.readers import RawRow
    from pipeline.data.validate import eval_image_uris

    start = time.perf_counter()
    folder = config.step_dir(NAME)
    owner = base.step_hash(config, NAME)
    sources = prepare.resolve_sources(config)
    fingerprints = prepare.source_fingerprints(sources)
    if (done := base.finished(config, NAME)) is not None:
        prepare.check_same_sources(done.get("inputs"), fingerprints, folder, config.run_root)
        return done
    base.claim(config, NAME)
    tables = prepare.read_sources(sources)
    job = prepare.TableJob(folder=folder, owner=owner, job_record=base.job_record(config, NAME),
                           config_hash=config.config_hash, options=prepare.pack_options(config),
                           max_text_chars=config.data.max_text_chars,
                           rows_per_shard=config.data.rows_per_shard, inputs=fingerprints,
                           max_reject_fraction=config.data.max_reject_fraction,
                           run_root=config.run_root)
    manifests: dict[str, dict[str, Any]] = {}
    for name in ("text_groups", "pairs"):
        if name in tables:
            manifests[name] = prepare.write_table(name, tables[name], job)
    if "eval" in tables:
        image_rows = [RawRow(id=None, source=uri, values={"image": uri}, image_uris={"image": uri})
                      for uri in eval_image_uris(tables["eval"])]
        manifests["eval_images"] = prepare.write_table("eval_images", image_rows, job)
        keys = prepare.read_image_keys(storage.join(folder, "eval_images"))
        manifests["eval"] = prepare.write_table("eval", tables["eval"], job, image_keys=keys)
    summary = {name: {k: m[k] for k in ("rows_in", "rows_out", "rows_rejected",
                                        "rejects_by_reason")}
               for name, m in manifests.items()}
    per_dataset = (prepare.rows_per_dataset(storage.join(folder, "pairs"))
                   if "pairs" in manifests else {})
    return outputs.write_manifest(folder, {
        "rows_in": sum(m["rows_in"] for m in summary.values()),
        "rows_out": sum(m["rows_out"] for m in summary.values()),
        "rows_rejected": sum(m["rows_rejected"] for m in summary.values()),
        "tables": summary, "pairs_per_dataset": per_dataset,
        "sources": dataclasses.asdict(sources), "inputs": fingerprints,
        **base.manifest_fields(config, NAME), "config": config.to_dict(),
        "seconds": round(time.perf_counter() - start, 3),
    })


def summarize(manifest: dict[str, Any], folder: str) -> str:
    """One screen: rows in / out / rejected per table and per reason."""
    lines = [f"prepare_data -> {folder}  ({manifest['seconds']:.1f} s)",
             f"{'table':<12} {'rows in':>8} {'out':>8} {'rejected':>9}  reasons"]
    for name, m in manifest["tables"].items():
        reasons = ", ".join(f"{k}={v}" for k, v in m["rejects_by_reason"].items()) or "-"
        lines.append(f"{name:<12} {m['rows_in']:>8} {m['rows_out']:>8} "
                     f"{m['rows_rejected']:>9}  {reasons}")
    lines.append(f"{'total':<12} {manifest['rows_in']:>8} {manifest['rows_out']:>8} "
                 f"{manifest['rows_rejected']:>9}")
    lines.append(f"rejected rows with their reasons: {folder}/<table>/_rejects/")
    return "\n".join(lines)
