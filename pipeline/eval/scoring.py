"""Scoring an eval set from its items' vectors: which rows every model can score, then
MMEB P@1 (per dataset, meta-task and overall means), SugarCrepe accuracy and caption
retrieval R@K (:mod:`pipeline.eval.metrics` does the arithmetic)."""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipeline.eval import metrics
from pipeline.eval.embed import Embedded
from pipeline.eval.sets import EvalRow, EvalSet, field_name

TIE_RULE = ("ties count against the ground truth: a query is correct at 1 only if its "
            "ground truth scores strictly higher than every other candidate (a constant "
            "model scores 0); in the top K only if fewer than K wrong candidates score >= it")


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


def score_set(eval_set: EvalSet, rows: list[EvalRow], emb: np.ndarray,
              extra_metatasks: dict[str, str], retrieval_ks: tuple[int, ...]) -> dict[str, float]:
    if not rows:
        return {}
    if eval_set.name == "mmeb":
        return score_mmeb(rows, emb, extra_metatasks)
    if eval_set.name == "sugarcrepe":
        return score_sugarcrepe(rows, emb)
    return score_retrieval(rows, emb, retrieval_ks)


def parse_extra_metatasks(entries: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for entry in entries:
        name, sep, task = entry.rpartition("=")
        if not sep or not name or task not in metrics.METATASKS:
            raise ValueError(f"eval.extra_metatasks: {entry!r} must look like dataset=metatask "
                             f"with metatask one of {', '.join(metrics.METATASKS)}")
        out[name] = task
    return out
