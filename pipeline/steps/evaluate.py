"""Step 6, evaluate: embed every eval set once per model, score, write the report.

Eval sets (each skipped with a log line when absent; :func:`pipeline.eval.sets.read_sets`):

- ``mmeb``: the prepared ``prepare_data/eval`` + ``eval_images`` tables (MMEB-format,
  candidate 0 = ground truth), texts as stored, prompt mode ``eval.prompt_mode``;
- ``sugarcrepe``: ``eval.sugarcrepe`` (a folder of ``<category>.json``);
- ``retrieval``: ``eval.retrieval_json`` (Karpathy layout), split ``eval.retrieval_split``.

The caption sets default ('') to the demo world's files when ``data.use_demo_world``, and
are skipped otherwise; 'off' skips them. Their images are read through storage and packed
at ``data.image_size`` by the embedding workers.

Models: ``eval.models`` ("label=path" or the run's ``student`` / ``stage1`` / ``stage2``;
:mod:`pipeline.eval.models`), or ``run(config, {"label": path}, folder)`` (the ablation).
Every distinct (prompt mode, text, image) item is embedded once per model by one Ray Data
actor pool (:mod:`pipeline.eval.embed`), then :mod:`pipeline.eval.scoring` runs on the
driver. Rows are scored only where every model could embed every item they need, so all
models are compared on the same rows; the others are rejects with a reason.

Outputs under ``<run_root>/evaluate``: ``embeddings/<label>/`` (vectors), ``report.json``,
``report.md``, ``<set>.png``, ``_rejects/part-00000.parquet`` and, last, ``_manifest.json``
(rows_in = eval rows read, rows_out = rows scored). The ``eval`` section moves neither the
run folder nor any other step: it is in this step's hash only.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import time
from typing import Any

import pyarrow as pa

from pipeline import outputs, storage
from pipeline.config import Config, ConfigError
from pipeline.steps import base

logger = logging.getLogger(__name__)

NAME = "evaluate"
READS = ("eval", "model", "data")
USES_RAY = True


def inputs(config: Config) -> tuple[str, ...]:
    """prepare_data (the MMEB-format tables) and the run's steps that eval.models names
    (``student`` with a tiny model.path: stage 1, which builds it)."""
    from pipeline.eval.models import parse_models
    from pipeline.models.student import tiny_family

    try:
        values = set(parse_models(config.eval.models).values())
    except ValueError:
        values = set()  # check() names the problem
    if "student" in values and tiny_family(config.model) is not None:
        values.add("stage1")
    needed = {"prepare_data"} if config.eval.mmeb else set()
    return tuple(name for name in base.ORDER if name in needed | values)


def check(config: Config) -> None:
    """eval.models and eval.extra_metatasks are well-formed."""
    from pipeline.eval.models import parse_models
    from pipeline.eval.scoring import parse_extra_metatasks

    try:
        parse_models(config.eval.models)
        parse_extra_metatasks(config.eval.extra_metatasks)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def check_sources(config: Config) -> None:
    """Model folders named by path, and caption-set files given by path, exist."""
    from pipeline.eval.models import SPECIAL_MODELS, parse_models

    for label, value in parse_models(config.eval.models).items():
        if value not in SPECIAL_MODELS and not storage.exists(value):
            raise FileNotFoundError(f"eval.models: model {label!r} not found at {value}")
    for key in ("sugarcrepe", "retrieval_json"):
        value = getattr(config.eval, key)
        if value not in ("", "off") and not storage.exists(value):
            raise FileNotFoundError(f"eval.{key}: {value} does not exist")


def owner_of(config: Config, models: dict[str, str] | None) -> str:
    """The folder's owner: the step hash, or for an explicit ``models`` map (the ablation)
    a hash of it with each model's identity (a step output's step_hash, else its path)."""
    owner = base.step_hash(config, NAME)
    if models is None:
        return owner
    identities = {label: _model_identity(config, value) for label, value in models.items()}
    return hashlib.sha256((owner + json.dumps(identities, sort_keys=True)).encode()).hexdigest()


def _model_identity(config: Config, value: str) -> str:
    if value in ("stage1", "stage2"):
        return base.step_hash(config, value)
    if value == "student":
        return json.dumps(dataclasses.asdict(config.model), sort_keys=True)
    manifest = outputs.read_manifest(value.rstrip("/").rsplit("/", 1)[0])
    return (manifest or {}).get("step_hash") or value


def run(config: Config, models: dict[str, str] | None = None,
        folder: str | None = None) -> dict[str, Any]:
    """Evaluate ``models`` (label -> folder or special value; default ``eval.models``) into
    ``folder`` (default ``<run_root>/evaluate``); returns the manifest (reused as is when
    already complete)."""
    from pipeline.eval import embed
    from pipeline.eval.models import resolve_models
    from pipeline.eval.report import build_report, write_report
    from pipeline.eval.scoring import parse_extra_metatasks, score_set, split_scorable
    from pipeline.eval.sets import Items, read_sets
    
    start = time.perf_counter()
    folder = storage.absolute_uri(folder or config.step_dir(NAME))
    owner = owner_of(config, models)
    if (done := base.finished(config, NAME, folder, owner)) is not None:
        return done
    check(config)
    extra_metatasks = parse_extra_metatasks(config.eval.extra_metatasks)
    refs = resolve_models(config, models)
    items = Items()
    sets, image_rows = read_sets(config, items)
    base.claim(config, NAME, folder, owner)
    logger.info("evaluate: %s; %d distinct items; models %s", ", ".join(
        f"{s.name} ({len(s.rows)} rows)" for s in sets), len(items), ", ".join(refs))
    embedded = embed.embed_items(config, refs, items.items, image_rows, folder, owner)
    results: dict[str, dict[str, Any]] = {label: {} for label in refs}
    set_info, all_rejects = {}, []
    for eval_set in sets:
        kept, rejects = split_scorable(eval_set, embedded)
        all_rejects += rejects
        for label in refs:
            results[label][eval_set.name] = score_set(eval_set, kept, embedded[label].emb,
                                                      extra_metatasks, config.eval.retrieval_ks)
        set_info[eval_set.name] = {
            "rows": len(eval_set.rows), "scored": len(kept),
            "per_group": dict(collections.Counter(r.group for r in kept if r.group))}
    if all_rejects:
        logger.warning("evaluate: %d row(s) not scored (every model must embed every item of a "
                       "row): %s; see %s/_rejects", len(all_rejects), dict(collections.Counter(
                           r["reason"] for r in all_rejects)), folder)
    report = build_report(config, refs, sets, set_info, results, extra_metatasks)
    files = write_report(report, folder)
    storage.write_table(pa.Table.from_pylist(all_rejects, schema=outputs.REJECTS),
                        storage.join(folder, outputs.REJECTS_DIR, outputs.shard_name(0)))
    reasons = collections.Counter(r["reason"] for r in all_rejects)
    return outputs.write_manifest(folder, {
        "rows_in": sum(info["rows"] for info in set_info.values()),
        "rows_out": sum(info["scored"] for info in set_info.values()),
        "rows_rejected": len(all_rejects), "rejects_by_reason": dict(sorted(reasons.items())),
        **base.manifest_fields(config, NAME), "step_hash": owner,
        "seconds": round(time.perf_counter() - start, 3), "files": files,
        "models": {label: dataclasses.asdict(ref) for label, ref in refs.items()},
        "distinct_items": len(items), "sets": set_info, "results": report["results"],
        "inputs": {k: v for s in sets for k, v in s.inputs.items()},
        "config": config.to_dict()})


def summarize(manifest: dict[str, Any], folder: str) -> str:
    """One screen: the headline numbers per model and set."""
    lines = [f"evaluate -> {folder}  ({manifest['seconds']:.1f} s, "
             f"{manifest['distinct_items']} distinct items)"]
    headline = ("overall_mean_of_metatasks", "overall_mean_of_datasets", "mean",
                "t2i_R@1", "i2t_R@1")
    for label, per_set in manifest["results"].items():
        parts = []
        for set_name, values in per_set.items():
            shown = [f"{k}={values[k]:.2f}" for k in headline if values.get(k) is not None]
            parts.append(f"{set_name}: {', '.join(shown) or '-'}")
        lines.append(f"{label:<12} " + "; ".join(parts))
    lines.append(f"rows in {manifest['rows_in']}, scored {manifest['rows_out']}, rejected "
                 f"{manifest['rows_rejected']} {manifest['rejects_by_reason'] or ''}")
    lines.append(f"report: {folder}/report.md, report.json, *.png")
    return "\n".join(lines)
