"""Evaluation: MMEB-format P@1, caption retrieval R@K, compositional accuracy, the report."""
from __future__ import annotations

from pipeline.eval.metrics import (
    MMEB_DATASETS,
    compositional_accuracy,
    correct_at_1,
    mmeb_summary,
    precision_at_1,
    retrieval_recall,
)

__all__ = [
    "MMEB_DATASETS",
    "compositional_accuracy",
    "correct_at_1",
    "mmeb_summary",
    "precision_at_1",
    "retrieval_recall",
]
