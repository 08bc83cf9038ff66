"""Step 3, stage1: textual discriminative knowledge distillation (Ray Train + DeepSpeed, LoRA).

Reads the ``teacher_embed`` table (texts and teacher vectors), builds the tiny student when
``model.path`` is ``tiny:<family>`` (:mod:`pipeline.models.student`), and trains the
student's language model with :class:`pipeline.train.stage1.Stage1Spec` in the shared loop
(:mod:`pipeline.train.loop`).

Outputs under ``<run_root>/stage1/``::

    ray/<ray run name>/checkpoint_*/   Ray Train run: DeepSpeed state + data position (resume)
    adapter/                           the LoRA adapter (PEFT save_pretrained)
    model/                             merged Hugging Face folder for Embedder.from_pretrained
    metrics.jsonl, curves.png, tensorboard/, train_summary.json, export_check.json
    _manifest.json                     written last

A folder of this step identity with at least the requested steps is complete and skipped;
with fewer steps (an earlier launch with a smaller ``stage1.max_steps``), the run resumes
from its last checkpoint and writes new outputs.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from pipeline import outputs, provenance, storage
from pipeline.config import Config
from pipeline.steps import base

NAME = "stage1"
READS = ("model", "train", "stage1")
USES_RAY = True


def inputs(config: Config) -> tuple[str, ...]:
    return ("teacher_embed",)


def check(config: Config, num_groups: int | None = None) -> None:
    """The student can load; the global batch fits in ``num_groups`` when known."""
    from pipeline.models.student import check_model
    from pipeline.train.loop import check_global_batch

    check_global_batch("stage1.global_batch_groups", config.stage1.global_batch_groups,
                       num_groups, "text groups of the teacher step")
    check_model(config.model)


def check_sources(config: Config) -> None:
    from pipeline.models.student import check_model_exists

    check_model_exists(config.model)


def preflight(config: Config) -> None:
    """Once prepare_data is done: the global batch fits in the text groups it wrote."""
    prepared = base.upstream_manifest(config, "prepare_data")
    if prepared is not None and "text_groups" in prepared.get("tables", {}):
        check(config, prepared["tables"]["text_groups"]["rows_out"])


def run(config: Config) -> dict[str, Any]:
    """Train stage 1 (or skip it when complete); returns its manifest."""

    from pipeline.models.student import build_student
    from pipeline.train import loop
    from pipeline.train.rows import source_from_shards
    from pipeline.train.stage1 import (
        TEACHER_COLUMNS,
        Stage1Spec,
        group_index,
        loop_settings,
        read_group_texts,
        stop_step,
    )

    start = time.perf_counter()
    folder = config.step_dir(NAME)
    check(config)
    teacher_folder = base.input_dir(config, NAME, "teacher_embed")
    teacher_manifest = base.input_manifest(config, NAME, "teacher_embed")
    num_groups = teacher_manifest["rows_out"]
    check(config, num_groups)
    done = loop.finished_run(folder, base.step_hash(config, NAME),
                             stop_step(config, num_groups), NAME, base.job_record(config, NAME))
    if done is not None:
        return done
    _, shards = outputs.complete_input(teacher_folder)
    index = group_index(read_group_texts(shards))
    if len(index.keys) != num_groups:
        raise storage.StorageError(f"{teacher_folder}: the manifest counts {num_groups} groups "
                                   f"but the shards hold {len(index.keys)}")
    student = build_student(config.model, config.run_root, seed=config.train.seed,
                            vocab_texts=index.texts)
    source = source_from_shards(shards, TEACHER_COLUMNS, index.pointers)
    settings = loop_settings(config, folder, index.keys, source)
    spec = Stage1Spec(settings, student=student, config=config,
                      texts_per_group=index.texts_per_group, probe_texts=list(index.probe_texts))
    run_name = base.ray_run_name(config, NAME)
    loop.fit(spec, run_name)
    summary = storage.read_json(storage.join(folder, loop.SUMMARY_FILE))
    used = loop.rows_used(num_groups, settings, summary["steps"])
    return outputs.write_manifest(folder, {
        "rows_in": num_groups, "rows_out": num_groups, "rows_rejected": 0,
        "rejects_by_reason": {}, "groups_used": used, "groups_never_used": num_groups - used,
        "groups_dropped_last_per_epoch": num_groups - settings.steps_per_epoch
        * settings.global_batch_rows,
        "texts_per_group": index.texts_per_group,
        "global_batch_texts": settings.global_batch_rows * index.texts_per_group,
        **base.manifest_fields(config, NAME), "seconds": round(time.perf_counter() - start, 3),
        **summary,
        "student": dataclasses.asdict(student),
        "ray_run": {"storage": storage.join(folder, "ray"), "name": run_name},
        "teacher_dim": teacher_manifest.get("dim"),
        "inputs": {"teacher_embed": provenance.fingerprint(teacher_folder)},
        "config": config.to_dict(),
    })


def summarize(manifest: dict[str, Any], folder: str) -> str:
    return (f"stage1 -> {folder}  ({manifest['seconds']:.1f} s)\n"
            f"{manifest['steps']} of {manifest['total_steps']} scheduled steps on "
            f"{manifest['world_size']} worker(s), {manifest['precision']}, ZeRO-"
            f"{manifest['zero_stage']}; loss {manifest['first_loss']:.4f} -> "
            f"{manifest['final_loss']:.4f}; groups used {manifest['groups_used']} of "
            f"{manifest['rows_in']}; merged model at {manifest['model']}")
