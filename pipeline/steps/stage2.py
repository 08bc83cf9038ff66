"""Step 5, stage2: hard-negative enhanced instruction tuning (Ray Train + DeepSpeed, LoRA).

Reads the ``mine_negatives`` table (small: the pairs and their negatives by reference) and
the pairs table it points into (each worker its share, :mod:`pipeline.train.rows`); starts from ``stage2.init`` (the merged stage-1
model by default); trains with :class:`pipeline.train.stage2.Stage2Spec` in the shared
loop (:mod:`pipeline.train.loop`).

Outputs under ``<run_root>/stage2/`` as in stage 1: ``ray/`` (checkpoints, resume),
``adapter/``, ``model/`` (merged, prompt mode ``instruction`` recorded), ``metrics.jsonl``
(with the per-step hard-negative statistics), ``curves.png``, ``tensorboard/``,
``train_summary.json``, ``export_check.json``, ``_manifest.json`` last. The ablation runs
variants of this step into other folders (``run(config, folder=...)``).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from pipeline import outputs, provenance, storage
from pipeline.config import Config
from pipeline.steps import base

logger = logging.getLogger(__name__)

NAME = "stage2"
READS = ("model", "train", "stage2")
USES_RAY = True


def inputs(config: Config) -> tuple[str, ...]:
    """The mined table, and stage 1 when it provides the starting model (``init=stage1``,
    or ``init=student`` with a tiny student, which stage 1 builds)."""
    from pipeline.models.student import tiny_family

    init = config.stage2.init
    tiny_student = init == "student" and tiny_family(config.model) is not None
    return ("stage1", "mine_negatives") if init == "stage1" or tiny_student else (
        "mine_negatives",)


def check(config: Config, num_pairs: int | None = None) -> None:
    """The starting model can load; the global batch fits in ``num_pairs`` when known."""
    from pipeline.models.student import check_model
    from pipeline.train.loop import check_global_batch

    check_global_batch("stage2.global_batch_pairs", config.stage2.global_batch_pairs,
                       num_pairs, "pairs of the mine_negatives step")
    check_model(config.model)


def check_sources(config: Config) -> None:
    """A folder ``stage2.init`` (or model.path for ``student``) exists."""
    from pipeline.models.student import check_model_exists

    if config.stage2.init == "student":
        check_model_exists(config.model)
    elif config.stage2.init != "stage1":
        _init_folder(config.stage2.init)


def preflight(config: Config) -> None:
    """Once prepare_data is done: every dataset (per_dataset) or the whole table (mixed)
    holds at least one global batch of pairs (mining can only reject more)."""
    from pipeline.train.stage2 import check_batch_groups

    prepared = base.upstream_manifest(config, "prepare_data")
    if prepared is None or "pairs" not in prepared.get("tables", {}):
        return
    check(config, prepared["tables"]["pairs"]["rows_out"])
    check_batch_groups(config, prepared.get("pairs_per_dataset") or {})


def _init_folder(uri: str) -> str:
    from pipeline.models import META_FILE

    if not (storage.exists(storage.join(uri, META_FILE))
            or storage.exists(storage.join(uri, "config.json"))):
        raise FileNotFoundError(f"stage2.init={uri}: no model folder there")
    return uri


def resolve_init(config: Config) -> Any:
    """The starting model of ``stage2.init`` (see the config help); errors name the key."""
    from pipeline.models.student import StudentSource, student_folder

    init, model = config.stage2.init, config.model
    if init == "stage1":
        base.input_manifest(config, NAME, "stage1")
        uri = storage.join(base.input_dir(config, NAME, "stage1"), "model")
    elif init == "student":
        return student_folder(model, config.run_root)
    else:
        uri = _init_folder(init)
    return StudentSource(storage.absolute_uri(uri), model.family, model.trust_remote_code)


def run(config: Config, folder: str | None = None) -> dict[str, Any]:
    """Train stage 2 into ``folder`` (default ``<run_root>/stage2``; ablations use others), or
    skip it when complete; returns its manifest."""
    from pipeline.train import loop
    from pipeline.train.stage2 import (
        Stage2Spec,
        batch_groups,
        hard_negative_summary,
        pairs_source,
        probe_rows,
        read_mined_index,
    )

    start = time.perf_counter()
    folder = folder or config.step_dir(NAME)
    check(config)
    mined_folder = base.input_dir(config, NAME, "mine_negatives")
    base.input_manifest(config, NAME, "mine_negatives")
    mined_manifest, shards = outputs.complete_input(mined_folder)
    num_pairs = mined_manifest["rows_out"]
    check(config, num_pairs)
    init = resolve_init(config)
    stage2 = config.stage2
    index = read_mined_index(shards, mined_negatives=stage2.mined_negatives,
                             given_negatives=stage2.given_negatives)
    if len(index.keys) != num_pairs:
        raise storage.StorageError(f"{mined_folder}: the manifest counts {num_pairs} pairs "
                                   f"but the shards hold {len(index.keys)}")
    source = pairs_source(pairs_shards(mined_manifest, mined_folder), index)
    settings = loop.build_settings(
        config, stage=NAME, folder=folder, keys=index.keys, optim=stage2.optim,
        epochs=stage2.epochs, max_steps=stage2.max_steps, scheduled_steps=stage2.steps,
        global_batch_rows=stage2.global_batch_pairs, sample_unit="items",
        row_groups=batch_groups(config, index.datasets), source=source)
    done = loop.finished_run(folder, base.step_hash(config, NAME), settings.stop_step, NAME,
                             base.job_record(config, NAME))
    if done is not None:
        return done
    spec = Stage2Spec(settings, init=init, config=config, probe_rows=probe_rows(source),
                      row_negatives=index.row_negatives)
    run_name = base.ray_run_name(config, NAME)
    loop.fit(spec, run_name)
    summary = storage.read_json(storage.join(settings.stage_dir, loop.SUMMARY_FILE))
    used = loop.rows_used(num_pairs, settings, summary["steps"])
    return outputs.write_manifest(folder, {
        "rows_in": num_pairs, "rows_out": num_pairs, "rows_rejected": 0,
        "rejects_by_reason": {}, "pairs_used": used, "pairs_never_used": num_pairs - used,
        "global_batch_pairs": settings.global_batch_rows, "batching": stage2.batching,
        "steps_per_epoch": settings.steps_per_epoch, "negative_slots": spec.negative_slots,
        **base.manifest_fields(config, NAME), "seconds": round(time.perf_counter() - start, 3),
        **summary,
        "hard_negatives": hard_negative_summary(settings.stage_dir),
        "init": dataclasses.asdict(init),
        "ray_run": {"storage": storage.join(folder, "ray"), "name": run_name},
        "inputs": {"mine_negatives": provenance.fingerprint(mined_folder),
                   "pairs": provenance.fingerprint(source.shards[0].rsplit("/", 1)[0])},
        "config": config.to_dict(),
    })


def pairs_shards(mined_manifest: dict[str, Any], mined_folder: str) -> list[str]:
    """The shards of the pairs table the mined rows point into (``pairs_table`` of the
    mining manifest), refused when they changed since mining."""
    uri = mined_manifest.get("pairs_table")
    if not uri:
        raise storage.StorageError(f"{mined_folder}: the mining manifest names no pairs_table "
                                   "(written by an older version): rerun mine_negatives")
    recorded = mined_manifest.get("inputs", {}).get("pairs", {})
    _, shards = outputs.complete_input(uri)
    now = provenance.fingerprint(uri)
    if {k: now.get(k) for k in ("files", "bytes", "sha256")} != {
            k: recorded.get(k) for k in ("files", "bytes", "sha256")}:
        raise storage.StorageError(f"{uri} changed since {mined_folder} was mined from it "
                                   "(the mined rows point into it): rerun mine_negatives")
    return shards


def summarize(manifest: dict[str, Any], folder: str) -> str:
    hn = manifest.get("hard_negatives", {})
    rate = hn.get("hn_false_negative_rate", {}).get("mean")
    margin = hn.get("hn_mean_margin", {}).get("last")
    extra = ""
    if rate is not None:
        extra += f"; queries with a false negative dropped {100 * rate:.1f}%"
    if margin is not None:
        extra += f"; pos-neg margin at the end {margin:.3f}"
    return (f"stage2 -> {folder}  ({manifest['seconds']:.1f} s)\n"
            f"{manifest['steps']} of {manifest['total_steps']} scheduled steps on "
            f"{manifest['world_size']} worker(s), {manifest['precision']}, ZeRO-"
            f"{manifest['zero_stage']}; loss {manifest['first_loss']:.4f} -> "
            f"{manifest['final_loss']:.4f}{extra}; merged model at {manifest['model']}")
