"""The evaluate step: embed every eval set once per model, score, write the report.

Eval sets (each skipped with a log line when absent):

- ``mmeb``: the prepared ``prepare_data/eval`` + ``eval_images`` tables (MMEB-format,
  candidate 0 = ground truth), texts as stored, prompt mode ``eval.prompt_mode``;
- ``sugarcrepe``: ``eval.sugarcrepe`` (a folder of ``<category>.json``);
- ``retrieval``: ``eval.retrieval_json`` (Karpathy layout), split ``eval.retrieval_split``.

The caption sets default ('') to the demo world's files when ``data.use_demo_world``, and
are skipped otherwise; 'off' skips them. Their images are read through storage and packed
with ``pack_image`` at ``data.image_size`` by the embedding workers.

Models: ``evaluate(config, {"label": path})`` or ``eval.models`` ("label=path" strings);
the special values ``student`` (``model.path``; for ``tiny:<family>`` the folder stage 1
builds, ``<run_root>/models/tiny-<family>``), ``stage1`` and ``stage2``
(``<run_root>/<stage>/model``) resolve to the run's folders. Every distinct (prompt mode,
text, image) item is embedded once per model (``pipeline.eval.embed``), then the metrics
of ``pipeline.eval.metrics`` run on the driver. Rows are scored only where every model could embed every item they
need, so all models are compared on the same rows; the others are rejects with a reason.

Outputs under ``<run_root>/evaluate``: ``embeddings/<label>/`` (vectors),
``report.json``, ``report.md``, ``<set>.png``, ``_rejects/part-00000.parquet`` and, last,
``_manifest.json`` (rows_in = eval rows read, rows_out = rows scored). The ``eval``
section is not part of the run's config hash (evaluating another way must not move or
retrain the run); the step keeps its own ``eval_hash`` (run hash + eval settings), and a
complete folder of the same ``eval_hash`` is reused, one of another refused.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import outputs, storage
from pipeline.config import Config, EvalConfig
from pipeline.eval import embed, metrics
from pipeline.eval.embed import Embedded, ModelRef
from pipeline.eval.sets import (
    EvalRow,
    EvalSet,
    Items,
    field_name,
    read_mmeb,
    read_retrieval,
    read_sugarcrepe,
)
from pipeline.outputs import REJECTS, OutputConflictError, ShardedOutput

logger = logging.getLogger(__name__)

STEP = "evaluate"
SPECIAL_MODELS = ("student", "stage1", "stage2")
TIE_RULE = ("ties count against the ground truth: a query is correct at 1 only if its "
            "ground truth scores strictly higher than every other candidate (a constant "
            "model scores 0); in the top K only if fewer than K wrong candidates score >= it")
_LABEL_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


# ---------------------------------------------------------------------------------------
# Models


def eval_hash(config: Config) -> str:
    """sha256 of the run's config hash and the eval settings that change results."""
    hashed = {f.name: getattr(config.eval, f.name) for f in dataclasses.fields(EvalConfig)
              if f.metadata.get("hashed", True)}
    payload = json.dumps([config.config_hash, hashed], sort_keys=True, default=list)
    return hashlib.sha256(payload.encode()).hexdigest()


def parse_models(entries: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``["base=student", "stage1", "x=/models/x"]`` -> {label: value}; a bare entry is
    its own label (``stage1``) or, for a path, the folder's name."""
    out: dict[str, str] = {}
    for entry in entries:
        label, sep, value = entry.partition("=")
        if not sep:
            value = label
            label = label if label in SPECIAL_MODELS else label.rstrip("/").rsplit("/", 1)[-1]
        label, value = label.strip(), value.strip()
        if not _LABEL_RE.match(label) or not value:
            raise ValueError(f"eval.models: {entry!r} must look like label=path (label of "
                             "letters, digits, '_', '.', '-') or one of "
                             f"{', '.join(SPECIAL_MODELS)}")
        if label in out:
            raise ValueError(f"eval.models: label {label!r} appears twice")
        out[label] = value
    if not out:
        raise ValueError("eval.models is empty: name at least one model to evaluate")
    return out


def absolute(uri: str) -> str:
    """``uri`` with a local path made absolute (Ray workers may run in another folder)."""
    return uri if storage.is_s3(uri) else os.path.abspath(uri)


def student_model(config: Config) -> ModelRef:
    """``model.path``, or for ``tiny:<family>`` the folder stage 1 builds it in
    (``<run_root>/models/tiny-<family>``, its tokenizer trained on the stage-1 texts):
    evaluate never builds one itself, so "student" is exactly stage 1's starting point."""
    if not config.model.path.startswith("tiny:"):
        return ModelRef(config.model.path, config.model.family or None)
    from pipeline.models import META_FILE

    family = config.model.path.removeprefix("tiny:")
    path = storage.join(config.run_root, "models", f"tiny-{family}")
    if not storage.exists(storage.join(path, META_FILE)):
        raise FileNotFoundError(f"eval.models: the tiny student (model.path="
                                f"{config.model.path}) is built by stage1 at {path}; run "
                                "stage1 first, or evaluate a model folder instead")
    return ModelRef(path, family)


def resolve_models(config: Config, models: dict[str, str] | None = None) -> dict[str, ModelRef]:
    """Label -> model, from ``models`` or ``eval.models``; every folder must exist."""
    entries = models if models is not None else parse_models(config.eval.models)
    out = {}
    for label, value in entries.items():
        if not _LABEL_RE.match(label):
            raise ValueError(f"model label {label!r}: use letters, digits, '_', '.', '-'")
        if value == "student":
            continue  # below: a tiny student is built only once the others are known to exist
        ref = ModelRef(absolute(storage.join(config.run_root, value, "model")
                                if value in ("stage1", "stage2") else value))
        if not storage.exists(ref.path):
            raise FileNotFoundError(f"eval.models: model {label!r} ({value}) not found at "
                                    f"{ref.path}" + (f"; run {value} first" if value in
                                                     ("stage1", "stage2") else ""))
        out[label] = ref
    for label, value in entries.items():
        if value == "student":
            ref = student_model(config)
            if not storage.exists(ref.path):
                raise FileNotFoundError(f"eval.models: student model {label!r} not found at "
                                        f"{ref.path} (model.path)")
            out[label] = ModelRef(absolute(ref.path), ref.family)
    return {label: out[label] for label in entries}


# ---------------------------------------------------------------------------------------
# Eval sets


def _caption_source(config: Config, value: str, images: str, demo_rel: str,
                    key: str) -> tuple[str, str] | None:
    """(source URI, image root) of a caption set, the demo world's, or None (skipped)."""
    if value == "off" or (not value and not config.data.use_demo_world):
        logger.info("evaluate: %s skipped (%s=%r)", key, key, value)
        return None
    if value:
        value = absolute(value)
        root = value.rsplit("/", 1)[0] if value.endswith(".json") else value
        return value, absolute(images or root)
    from pipeline.data.prepare import ensure_demo_world

    root = absolute(storage.join(config.run_root, "sources", "demo_world"))
    ensure_demo_world(root, config)
    return storage.join(root, *demo_rel.split("/")), absolute(images or root)


def read_sets(config: Config, items: Items) -> tuple[list[EvalSet], dict[str, Any]]:
    """The eval sets present, as rows over ``items``; and the eval_images row index."""
    sets, image_rows = [], {}
    prepared = absolute(config.step_dir("prepare_data"))
    eval_folder = storage.join(prepared, "eval")
    if not config.eval.mmeb:
        logger.info("evaluate: MMEB-format sets skipped (eval.mmeb=false)")
    elif outputs.is_complete(eval_folder):
        from pipeline.eval.sets import eval_image_rows

        images_folder = storage.join(prepared, "eval_images")
        outputs.require_complete(images_folder)
        image_rows = eval_image_rows(images_folder)
        sets.append(read_mmeb(eval_folder, items, config.eval.prompt_mode))
    elif outputs.is_complete(prepared):
        logger.warning("evaluate: prepare_data has no eval table (no data.sources.mmeb_eval): "
                       "MMEB-format sets skipped")
    else:
        outputs.require_complete(eval_folder)  # raises: run prepare_data first
    mode = config.eval.caption_prompt_mode
    source = _caption_source(config, config.eval.sugarcrepe, config.eval.sugarcrepe_images,
                             "sugarcrepe", "eval.sugarcrepe")
    if source:
        sets.append(read_sugarcrepe(*source, items, mode))
    source = _caption_source(config, config.eval.retrieval_json, config.eval.retrieval_images,
                             "retrieval/captions.json", "eval.retrieval_json")
    if source:
        sets.append(read_retrieval(*source, config.eval.retrieval_split, items, mode))
    if not sets:
        raise ValueError("nothing to evaluate: no prepared MMEB-format eval table and no "
                         "eval.sugarcrepe / eval.retrieval_json")
    return sets, image_rows


# ---------------------------------------------------------------------------------------
# Scoring


def split_scorable(eval_set: EvalSet, embedded: dict[str, Embedded]
                   ) -> tuple[list[EvalRow], list[dict[str, Any]]]:
    """Rows every model can score, and a reject for each other row (first failure)."""
    bad = np.zeros(len(next(iter(embedded.values())).error), dtype=bool)
    for e in embedded.values():
        bad |= e.error != ""
    kept, rejects = [], []
    for row in eval_set.rows:
        idx = row.items
        if not bad[idx].any():
            kept.append(row)
            continue
        label, e = next((lb, e) for lb, e in embedded.items() if (e.error[idx] != "").any())
        pos = int(np.flatnonzero(e.error[idx] != "")[0])
        item = idx[pos]
        rejects.append({"id": row.id, "source": row.source,
                        "field": field_name(eval_set.name, pos), "reason": e.error[item],
                        "detail": f"model {label}: {e.detail[item]}",
                        "row_json": json.dumps(row.payload, ensure_ascii=False, default=repr)})
    return kept, rejects


def score_mmeb(rows: list[EvalRow], emb: np.ndarray, extra_metatasks: dict[str, str],
               block_size: int = 256) -> dict[str, float]:
    """Per-dataset P@1 (blockwise over each dataset's distinct candidates) + summaries."""
    by_dataset: dict[str, list[EvalRow]] = {}
    for row in rows:
        by_dataset.setdefault(row.group, []).append(row)
    tasks = metrics.metatask_map(extra_metatasks)
    order = sorted(by_dataset, key=lambda d: (metrics.METATASKS.index(tasks[d])
                                              if d in tasks else len(metrics.METATASKS), d))
    per_dataset = {}
    for dataset in order:
        drows = by_dataset[dataset]
        cands = [r.items[1:] for r in drows]
        uniq = np.unique(np.concatenate(cands))
        correct = []
        for start in range(0, len(drows), block_size):
            block = drows[start:start + block_size]
            q_idx = np.asarray([r.items[0] for r in block], dtype=np.int64)
            sim = emb[q_idx] @ emb[uniq].T                                  # (B, U)
            correct.append(metrics.correct_at_1(
                [sim[b, np.searchsorted(uniq, c)]
                 for b, c in enumerate(cands[start:start + block_size])]))
        per_dataset[dataset] = 100.0 * float(np.concatenate(correct).mean())
    summary = metrics.mmeb_summary(per_dataset, extra_metatasks)
    scalars = {k: v for k, v in summary.items() if not isinstance(v, list)}
    return {**per_dataset, **scalars}


def score_sugarcrepe(rows: list[EvalRow], emb: np.ndarray) -> dict[str, float]:
    idx = np.stack([r.items for r in rows])                                # (N, 3)
    return metrics.compositional_accuracy(emb[idx[:, 0]], emb[idx[:, 1]], emb[idx[:, 2]],
                                          [r.group for r in rows])


def score_retrieval(rows: list[EvalRow], emb: np.ndarray, ks: tuple[int, ...]
                    ) -> dict[str, float]:
    img_idx = np.asarray([r.items[0] for r in rows], dtype=np.int64)          # (I,)
    txt_idx = np.concatenate([r.items[1:] for r in rows])                     # (T,)
    txt_to_img = np.repeat(np.arange(len(rows)), [len(r.items) - 1 for r in rows])  # (T,)
    return metrics.retrieval_recall(emb[img_idx], emb[txt_idx], txt_to_img, ks)


def score_set(config: Config, eval_set: EvalSet, rows: list[EvalRow], emb: np.ndarray,
              extra_metatasks: dict[str, str]) -> dict[str, float]:
    if not rows:
        return {}
    if eval_set.name == "mmeb":
        return score_mmeb(rows, emb, extra_metatasks)
    if eval_set.name == "sugarcrepe":
        return score_sugarcrepe(rows, emb)
    return score_retrieval(rows, emb, config.eval.retrieval_ks)


# ---------------------------------------------------------------------------------------
# The step


def parse_extra_metatasks(entries: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for entry in entries:
        name, sep, task = entry.rpartition("=")
        if not sep or not name or task not in metrics.METATASKS:
            raise ValueError(f"eval.extra_metatasks: {entry!r} must look like dataset=metatask "
                             f"with metatask one of {', '.join(metrics.METATASKS)}")
        out[name] = task
    return out


def check_config(config: Config) -> dict[str, str]:
    """Fail before heavy work; returns the extra meta-task map."""
    if not config.eval.retrieval_ks or min(config.eval.retrieval_ks) < 1:
        raise ValueError(f"eval.retrieval_ks: need K >= 1, got {config.eval.retrieval_ks}")
    return parse_extra_metatasks(config.eval.extra_metatasks)


def _reuse(folder: str, owner: str) -> dict[str, Any] | None:
    manifest = outputs.read_manifest(folder)
    if manifest is None:
        return None
    if manifest.get("eval_hash") != owner:
        raise OutputConflictError(f"{folder} holds an evaluation with other settings "
                                  f"(eval_hash {str(manifest.get('eval_hash')):.12}, now "
                                  f"{owner:.12}); delete the folder to evaluate again")
    logger.info("evaluate: complete already at %s", folder)
    return manifest


def evaluate(config: Config, models: dict[str, str] | None = None,
             folder: str | None = None) -> dict[str, Any]:
    """Run the evaluate step for ``models`` (label -> folder or special value; default
    ``eval.models``) into ``folder`` (default ``<run_root>/evaluate``); return its
    manifest (reused as is when already complete)."""
    start = time.perf_counter()
    folder = absolute(folder or config.step_dir(STEP))
    owner = eval_hash(config) if models is None else hashlib.sha256(
        (eval_hash(config) + json.dumps(models, sort_keys=True)).encode()).hexdigest()
    if (done := _reuse(folder, owner)) is not None:
        return done
    extra_metatasks = check_config(config)
    refs = resolve_models(config, models)
    items = Items()
    sets, image_rows = read_sets(config, items)
    ShardedOutput(folder, owner, REJECTS).claim()
    logger.info("evaluate: %s; %d distinct items; models %s", ", ".join(
        f"{s.name} ({len(s.rows)} rows)" for s in sets), len(items), ", ".join(refs))
    embedded = embed.embed_items(config, refs, items.items, image_rows, folder, owner)
    results: dict[str, dict[str, Any]] = {label: {} for label in refs}
    set_info, all_rejects = {}, []
    for eval_set in sets:
        kept, rejects = split_scorable(eval_set, embedded)
        all_rejects += rejects
        for label in refs:
            results[label][eval_set.name] = score_set(config, eval_set, kept,
                                                      embedded[label].emb, extra_metatasks)
        set_info[eval_set.name] = {
            "rows": len(eval_set.rows), "scored": len(kept),
            "per_group": dict(collections.Counter(r.group for r in kept if r.group))}
    if all_rejects:
        logger.warning("evaluate: %d row(s) not scored (every model must embed every item of a "
                       "row): %s; see %s/_rejects", len(all_rejects), dict(collections.Counter(
                           r["reason"] for r in all_rejects)), folder)
    report = build_report(config, refs, sets, set_info, results, extra_metatasks)
    files = _write_outputs(report, folder, all_rejects)
    reasons = collections.Counter(r["reason"] for r in all_rejects)
    rows_in = sum(info["rows"] for info in set_info.values())
    return outputs.write_manifest(folder, {
        "rows_in": rows_in, "rows_out": sum(info["scored"] for info in set_info.values()),
        "rows_rejected": len(all_rejects), "rejects_by_reason": dict(sorted(reasons.items())),
        "config_hash": config.config_hash, "eval_hash": owner,
        "seconds": round(time.perf_counter() - start, 3), "files": files,
        "models": {label: dataclasses.asdict(ref) for label, ref in refs.items()},
        "distinct_items": len(items), "sets": set_info, "results": report["results"],
        "inputs": {k: v for s in sets for k, v in s.inputs.items()},
        "config": config.to_dict()})


def build_report(config: Config, refs: dict[str, ModelRef], sets: list[EvalSet],
                 set_info: dict[str, Any], results: dict[str, Any],
                 extra_metatasks: dict[str, str]) -> dict[str, Any]:
    from pipeline.eval.report import clean, training_summary

    report: dict[str, Any] = {
        "run_name": config.run_name, "unit": "percent", "tie_rule": TIE_RULE,
        "models": {label: {"path": ref.path} for label, ref in refs.items()},
        "prompt_modes": {"mmeb": config.eval.prompt_mode,
                         "captions": config.eval.caption_prompt_mode},
        "sets": set_info, "results": clean(results),
        "training": clean(training_summary(config.run_root)),
    }
    mmeb = next((s for s in sets if s.name == "mmeb"), None)
    if mmeb is not None:
        datasets = sorted({r.group for r in mmeb.rows})
        summary = metrics.mmeb_summary(dict.fromkeys(datasets, 0.0), extra_metatasks)
        report["mmeb"] = {"metatasks_missing": summary["metatasks_missing"],
                          "unmapped": summary["unmapped"],
                          "metatask_of": {d: metrics.metatask_map(extra_metatasks).get(d)
                                          for d in datasets}}
    return report


def _write_outputs(report: dict[str, Any], folder: str,
                   rejects: list[dict[str, Any]]) -> list[str]:
    from pipeline.eval.report import write_report

    files = write_report(report, folder)
    storage.write_table(pa.Table.from_pylist(rejects, schema=REJECTS),
                        storage.join(folder, outputs.REJECTS_DIR, outputs.shard_name(0)))
    return files


def format_summary(manifest: dict[str, Any], folder: str) -> str:
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
