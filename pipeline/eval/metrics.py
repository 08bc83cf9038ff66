"""Evaluation metrics: pure functions over scores and unit-norm embeddings (no Ray, no I/O).

Every metric is returned in percent (0..100).

Tie rule (one rule for every metric): **a tie counts against the ground truth.** A query
is correct at 1 only if its ground truth scores *strictly* higher than every other
candidate; in general the ground truth is within the top K only if fewer than K other
candidates score at least as high as it (``>=``). So a model that gives every candidate
the same score (a constant or collapsed model) scores 0, not 100 and not "1/C on
average". Libraries that break ties by candidate index (``argmax`` picks the first
maximum, i.e. candidate 0 = the ground truth in MMEB) would give such a model 100.

- MMEB (``precision_at_1``, ``mmeb_summary``): ground truth is candidate 0; per-dataset
  Precision@1, the mean of the datasets, and the mean of the four meta-task means
  (classification, VQA, retrieval, grounding): the UniME paper's "Overall".
- Caption retrieval (``retrieval_recall``, Flickr30K/COCO layout: several captions per
  image): text->image R@K (the caption's image in the top K images) and image->text R@K
  (any of the image's captions in the top K captions).
- Compositionality (``compositional_accuracy``, SugarCrepe): correct when
  sim(image, positive caption) > sim(image, negative caption), per category and their mean.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

METATASKS: tuple[str, ...] = ("classification", "vqa", "retrieval", "grounding")

# The 36 MMEB datasets (VLM2Vec, TIGER-Lab/MMEB-eval subset names): meta-task and whether
# the dataset's training split is in MMEB-train ("ind", 20) or not ("ood", 16).
MMEB_DATASETS: dict[str, tuple[str, str]] = {
    # classification: 5 IND + 5 OOD
    "ImageNet-1K": ("classification", "ind"), "N24News": ("classification", "ind"),
    "HatefulMemes": ("classification", "ind"), "VOC2007": ("classification", "ind"),
    "SUN397": ("classification", "ind"), "Place365": ("classification", "ood"),
    "ImageNet-A": ("classification", "ood"), "ImageNet-R": ("classification", "ood"),
    "ObjectNet": ("classification", "ood"), "Country211": ("classification", "ood"),
    # VQA: 6 IND + 4 OOD
    "OK-VQA": ("vqa", "ind"), "A-OKVQA": ("vqa", "ind"), "DocVQA": ("vqa", "ind"),
    "InfographicsVQA": ("vqa", "ind"), "ChartQA": ("vqa", "ind"), "Visual7W": ("vqa", "ind"),
    "ScienceQA": ("vqa", "ood"), "VizWiz": ("vqa", "ood"), "GQA": ("vqa", "ood"),
    "TextVQA": ("vqa", "ood"),
    # retrieval: 8 IND + 4 OOD
    "VisDial": ("retrieval", "ind"), "CIRR": ("retrieval", "ind"),
    "VisualNews_t2i": ("retrieval", "ind"), "VisualNews_i2t": ("retrieval", "ind"),
    "MSCOCO_t2i": ("retrieval", "ind"), "MSCOCO_i2t": ("retrieval", "ind"),
    "NIGHTS": ("retrieval", "ind"), "WebQA": ("retrieval", "ind"),
    "OVEN": ("retrieval", "ood"), "FashionIQ": ("retrieval", "ood"),
    "EDIS": ("retrieval", "ood"), "Wiki-SS-NQ": ("retrieval", "ood"),
    # visual grounding: 1 IND + 3 OOD
    "MSCOCO": ("grounding", "ind"), "RefCOCO": ("grounding", "ood"),
    "RefCOCO-Matching": ("grounding", "ood"), "Visual7W-Pointing": ("grounding", "ood"),
}

# The built-in demo world's MMEB-format sets (no in/out-of-distribution label).
DEMO_METATASKS: dict[str, str] = {
    "demo_cls": "classification", "demo_vqa": "vqa", "demo_t2i": "retrieval",
    "demo_i2t": "retrieval", "demo_compositional": "retrieval",
}


# ---------------------------------------------------------------------------------------
# MMEB: Precision@1 with the ground truth at candidate 0


def correct_at_1(scores: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """(Q,) bool: candidate 0 scores strictly higher than every other candidate.

    ``scores`` is a (Q, C) array or a list of per-query 1-D arrays of any length >= 1
    (a query with only its ground truth is correct). Ties count against candidate 0.
    """
    if isinstance(scores, np.ndarray) and scores.ndim == 2:
        if scores.shape[1] == 0:
            raise ValueError("every query needs at least one candidate (the ground truth)")
        others = scores[:, 1:]                                     # (Q, C-1)
        best_other = others.max(axis=1) if others.shape[1] else np.full(len(scores), -np.inf)
        return scores[:, 0] > best_other                           # (Q,)
    rows = [np.asarray(s, dtype=np.float64).reshape(-1) for s in scores]
    if any(len(s) == 0 for s in rows):
        raise ValueError("every query needs at least one candidate (the ground truth)")
    return np.asarray([len(s) == 1 or bool(s[0] > s[1:].max()) for s in rows], dtype=bool)


def precision_at_1(scores: np.ndarray | Sequence[np.ndarray]) -> float:
    """Precision@1 in percent over the queries (ground truth = candidate 0, strict ties)."""
    correct = correct_at_1(scores)
    if correct.size == 0:
        raise ValueError("precision_at_1 of zero queries is undefined")
    return 100.0 * float(correct.mean())


def metatask_map(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Dataset -> meta-task: MMEB's 36, the demo's, then ``extra`` (which wins)."""
    out = {name: task for name, (task, _) in MMEB_DATASETS.items()}
    out.update(DEMO_METATASKS)
    out.update(extra or {})
    unknown = sorted(set(out.values()) - set(METATASKS))
    if unknown:
        raise ValueError(f"unknown meta-task(s) {unknown}; allowed: {', '.join(METATASKS)}")
    return out


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def mmeb_summary(per_dataset: Mapping[str, float],
                 extra_metatasks: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Aggregate per-dataset P@1 (percent) the two ways MMEB results are reported.

    - ``overall_mean_of_datasets``: the mean over every dataset given (MMEB's standard
      "Overall", 61.3 for UniME Phi-3.5-V);
    - ``overall_mean_of_metatasks``: the mean of the meta-task means (the UniME paper's
      "Overall", 64.2): each meta-task weighs the same whatever its number of datasets.
      Meta-tasks with no dataset present are left out of it (listed in
      ``metatasks_missing``); datasets without a meta-task are left out of it too (listed
      in ``unmapped``) but count in the mean of the datasets;
    - ``metatask:<name>``: each present meta-task's mean;
    - ``in_distribution_mean`` / ``out_of_distribution_mean``: over the MMEB datasets with
      that label, when any is present.
    """
    if not per_dataset:
        raise ValueError("mmeb_summary needs at least one dataset")
    tasks = metatask_map(extra_metatasks)
    by_task: dict[str, list[float]] = {}
    for name, value in per_dataset.items():
        if name in tasks:
            by_task.setdefault(tasks[name], []).append(value)
    task_means = {t: _mean(by_task[t]) for t in METATASKS if t in by_task}
    out: dict[str, Any] = {f"metatask:{t}": v for t, v in task_means.items()}
    out["overall_mean_of_datasets"] = _mean(per_dataset.values())
    out["overall_mean_of_metatasks"] = _mean(task_means.values())
    for label, key in (("ind", "in_distribution_mean"), ("ood", "out_of_distribution_mean")):
        labelled = [v for n, v in per_dataset.items()
                    if n in MMEB_DATASETS and MMEB_DATASETS[n][1] == label]
        if labelled:
            out[key] = _mean(labelled)
    out["metatasks_missing"] = [t for t in METATASKS if t not in task_means]
    out["unmapped"] = sorted(n for n in per_dataset if n not in tasks)
    return out


# ---------------------------------------------------------------------------------------
# Caption retrieval (Flickr30K / COCO layout)


def retrieval_recall(img_emb: np.ndarray, txt_emb: np.ndarray, txt_to_img: np.ndarray,
                     ks: Sequence[int] = (1, 5, 10), *, block_size: int = 4096
                     ) -> dict[str, float]:
    """Text->image and image->text Recall@K in percent, by cosine of unit rows.

    ``img_emb`` (I, D), ``txt_emb`` (T, D), ``txt_to_img`` (T,) = the image of each
    caption. ``t2i_R@K``: share of captions whose image is in the top K images.
    ``i2t_R@K``: share of images (with at least one caption) with *any* of their captions
    in the top K captions. Ties count against the ground truth: the ground truth is in
    the top K iff fewer than K wrong items score >= it.
    """
    img_emb = np.asarray(img_emb, dtype=np.float32)
    txt_emb = np.asarray(txt_emb, dtype=np.float32)
    txt_to_img = np.asarray(txt_to_img, dtype=np.int64).reshape(-1)
    n_img, n_txt = len(img_emb), len(txt_emb)
    if len(txt_to_img) != n_txt:
        raise ValueError(f"{n_txt} captions but {len(txt_to_img)} caption->image indices")
    if n_txt == 0 or n_img == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if txt_to_img.min() < 0 or txt_to_img.max() >= n_img:
        raise ValueError(f"txt_to_img must lie in [0, {n_img})")
    ks = sorted({int(k) for k in ks})
    if ks[0] < 1:
        raise ValueError(f"ks must be >= 1, got {ks}")
    # text -> image: wrong images scoring >= the caption's image.
    t2i_wrong = np.empty(n_txt, dtype=np.int64)
    for start in range(0, n_txt, block_size):
        stop = min(start + block_size, n_txt)
        sim = txt_emb[start:stop] @ img_emb.T                            # (B, I)
        gt = sim[np.arange(stop - start), txt_to_img[start:stop]]        # (B,)
        t2i_wrong[start:stop] = (sim >= gt[:, None]).sum(axis=1) - 1     # (B,) minus itself
    # image -> text: wrong captions scoring >= the image's best caption.
    has_caption = np.bincount(txt_to_img, minlength=n_img) > 0           # (I,)
    i2t_wrong = np.empty(n_img, dtype=np.int64)
    for start in range(0, n_img, block_size):
        stop = min(start + block_size, n_img)
        sim = img_emb[start:stop] @ txt_emb.T                            # (B, T)
        own = txt_to_img[None, :] == np.arange(start, stop)[:, None]     # (B, T)
        best = np.where(own, sim, -np.inf).max(axis=1)                   # (B,)
        i2t_wrong[start:stop] = ((sim >= best[:, None]) & ~own).sum(axis=1)
    i2t_wrong = i2t_wrong[has_caption]
    out = {}
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * float((t2i_wrong < k).mean())
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * float((i2t_wrong < k).mean())
    return out


# ---------------------------------------------------------------------------------------
# Compositionality (SugarCrepe)


def compositional_correct(img_emb: np.ndarray, pos_txt_emb: np.ndarray,
                          neg_txt_emb: np.ndarray) -> np.ndarray:
    """(N,) bool: sim(image, positive) > sim(image, negative), strictly."""
    img_emb, pos, neg = (np.asarray(x, dtype=np.float32) for x in
                         (img_emb, pos_txt_emb, neg_txt_emb))
    if not img_emb.shape == pos.shape == neg.shape:
        raise ValueError(f"shapes differ: image {img_emb.shape}, positive {pos.shape}, "
                         f"negative {neg.shape}")
    return (img_emb * pos).sum(axis=1) > (img_emb * neg).sum(axis=1)   # (N,)


def compositional_accuracy(img_emb: np.ndarray, pos_txt_emb: np.ndarray,
                           neg_txt_emb: np.ndarray, categories: Sequence[str]
                           ) -> dict[str, float]:
    """Accuracy in percent per category (sorted by name) and ``mean`` (their mean).

    Row i is the image, its positive caption and its negative caption (all unit rows);
    correct when the positive scores strictly higher (a tie is wrong).
    """
    correct = compositional_correct(img_emb, pos_txt_emb, neg_txt_emb)
    categories = np.asarray(list(categories), dtype=object)
    if len(categories) != len(correct):
        raise ValueError(f"{len(correct)} rows but {len(categories)} categories")
    if len(correct) == 0:
        raise ValueError("compositional_accuracy of zero rows is undefined")
    out = {str(c): 100.0 * float(correct[categories == c].mean())
           for c in sorted(set(categories.tolist()))}
    out["mean"] = _mean(out.values())
    return out
