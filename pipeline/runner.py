"""The whole pipeline in order (``jobs/run_all.py``), its summary table and the ablation.

``run_all(config)`` runs the steps of :mod:`pipeline.steps` in their declared order
(prepare_data -> teacher_embed -> stage1 -> mine_negatives -> stage2 -> evaluate -> export).
A step whose folder holds outputs of this step identity reuses them; one of another identity
(a setting it reads, or an input, changed) is replaced. After each step, the later steps'
``preflight`` checks run against what is now there (e.g. the pairs per dataset against the
stage-2 batch, as soon as prepare_data is done). The run folder records every step's hash
in ``_run.json``. At the end: one table of Precision@1 per MMEB-format eval set (and the
caption sets' headline numbers) for every evaluated model (by default untrained / stage 1 /
stage 2), and where the outputs are.

``config.ablation = true`` also runs the paper's ablation at the config's scale, under
``<run_root>/ablation/``: no training, stage 1 only, the run's stage 2 from the untrained
student ("stage 2 only"), and stage 2 from stage 1 with each loss: InfoNCE over the
in-batch targets (``full_batch``, VLM2Vec-style), the same with the mined negatives added,
UniME's online hard negatives from the batch (the paper) and with the mined negatives added
(both after the run's InfoNCE warm-up, and the latter also without it); then one evaluation of every model and one table. The variants share the run's inputs
(same data, teacher, stage 1 and mined negatives) and differ only in their ``stage2``
settings, so each gets its own folder and config hash.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from pipeline import storage
from pipeline.config import Config, validate

logger = logging.getLogger(__name__)

ABLATION_DIR = "ablation"
RUN_FILE = "_run.json"
# variant -> stage2 settings that differ from the run's own stage 2 ("both")
ABLATION_VARIANTS: dict[str, dict[str, Any]] = {
    "stage2_only": {"init": "student"},                      # the run's stage 2 from scratch
    "in_batch_infonce": {"mode": "full_batch", "negatives": "batch",       # VLM2Vec-style
                         "infonce_warmup_steps": 0},
    "infonce_with_mined": {"mode": "full_batch", "negatives": "both",
                           "infonce_warmup_steps": 0},
    "unime_in_batch_hn": {"mode": "hard_negative", "negatives": "batch"},   # the paper
    "unime_mined_hn": {"mode": "hard_negative", "negatives": "both"},       # + offline mining
    "unime_mined_hn_no_warmup": {"mode": "hard_negative", "negatives": "both",
                                 "infonce_warmup_steps": 0},
}
SUMMARY_METRICS = {"sugarcrepe": ("mean",), "retrieval": ("t2i_R@1", "i2t_R@1")}


def run_all(config: Config) -> dict[str, Any]:
    """Every step in order; returns {"evaluate": manifest, "export": manifest, ...}."""
    from pipeline.steps import all_steps, base

    start = time.perf_counter()
    steps = all_steps()
    write_run_record(config)
    manifests: dict[str, Any] = {}
    for position, step in enumerate(steps):
        step_start = time.perf_counter()
        base.replace_stale_step(config, step.NAME)
        manifests[step.NAME] = step.run(config)
        print(step.summarize(manifests[step.NAME], config.step_dir(step.NAME)))
        logger.info("run_all: %s done in %.1f s", step.NAME, time.perf_counter() - step_start)
        for later in steps[position + 1:]:
            base.hook(later, "preflight")(config)
    if config.ablation:
        manifests["ablation"] = run_ablation(config)
    manifests["seconds"] = round(time.perf_counter() - start, 1)
    print()
    print(summary_table(manifests["evaluate"]["results"],
                        title=f"run {config.run_name}: Precision@1 (%) per eval set"))
    if config.ablation:
        print()
        print(summary_table(manifests["ablation"]["results"],
                            title="ablation (same data, teacher, stage 1, mined negatives)"))
    print(f"\nfinished in {manifests['seconds']:.1f} s; outputs under {config.run_root}/:")
    print(f"  evaluation report  {config.step_dir('evaluate')}/report.md (+ report.json, PNGs)")
    print(f"  exported model     {manifests['export']['destination']}")
    print(f"  training curves    {config.step_dir('stage1')}/curves.png, "
          f"{config.step_dir('stage2')}/curves.png")
    print(f"  mined negatives    {config.step_dir('mine_negatives')} (scores.png)")
    return manifests


def write_run_record(config: Config) -> None:
    """``<run_root>/_run.json``: the run's config hash and every step's hash (what each
    step folder must hold to be reused)."""
    from pipeline.steps import ORDER, base

    storage.write_json(storage.join(config.run_root, RUN_FILE), {
        "run_name": config.run_name, "config_hash": config.config_hash,
        "steps": {name: base.step_hash(config, name) for name in ORDER},
        "config": config.to_dict()})


def variant_config(config: Config, changes: dict[str, Any]) -> Config:
    """``config`` with other stage-2 settings, reading the same run folder's inputs."""
    return validate(dataclasses.replace(config, output_root=config.run_root,
                                        stage2=dataclasses.replace(config.stage2, **changes)))


def run_ablation(config: Config) -> dict[str, Any]:
    """Train the ablation variants and evaluate every model once; returns the evaluate
    manifest of ``<run_root>/ablation/evaluate``. A variant whose stage-2 settings equal
    the run's own is the run's ``stage2`` folder (not trained twice)."""
    from pipeline.steps import base, evaluate, stage2

    folder = storage.join(config.run_root, ABLATION_DIR)
    models = {"untrained": "student", "stage1_only": "stage1"}
    for name, changes in ABLATION_VARIANTS.items():
        variant = variant_config(config, changes)
        if variant.stage2 == config.stage2:
            models[name] = "stage2"
            continue
        variant_dir = storage.join(folder, name)
        base.replace_stale(variant_dir, base.step_hash(variant, stage2.NAME),
                           base.identity(variant, stage2.NAME))
        manifest = stage2.run(variant, folder=variant_dir)
        print(stage2.summarize(manifest, variant_dir))
        models[name] = storage.join(variant_dir, "model")
    eval_dir = storage.join(folder, evaluate.NAME)
    base.replace_stale(eval_dir, evaluate.owner_of(config, models))
    manifest = evaluate.run(config, models=models, folder=eval_dir)
    print(evaluate.summarize(manifest, eval_dir))
    return manifest


def summary_table(results: dict[str, dict[str, dict[str, Any]]], *, title: str) -> str:
    """A plain-text table: one row per MMEB-format dataset and overall number, SugarCrepe
    mean and caption-retrieval R@1; one column per model (values in percent)."""
    labels = list(results)
    rows: list[tuple[str, list[Any]]] = []
    mmeb_names = list(next(iter(results.values())).get("mmeb", {}))
    for name in mmeb_names:
        if not name.startswith("metatask:"):
            rows.append((name, [results[label]["mmeb"].get(name) for label in labels]))
    for set_name, metrics in SUMMARY_METRICS.items():
        for metric in metrics:
            if any(metric in results[label].get(set_name, {}) for label in labels):
                rows.append((f"{set_name}:{metric}",
                             [results[label].get(set_name, {}).get(metric) for label in labels]))
    width = max([len(name) for name, _ in rows] + [10])
    cell = max([len(label) for label in labels] + [7])
    lines = [title, f"{'':<{width}}  " + "  ".join(f"{label:>{cell}}" for label in labels)]
    for name, values in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(
            f"{'-' if value is None else f'{value:.2f}':>{cell}}" for value in values))
    return "\n".join(lines)
