"""The pipeline's seven steps, in order, each a module of this package with the same shape
(:mod:`pipeline.steps.base` documents it): prepare_data -> teacher_embed -> stage1 ->
mine_negatives -> stage2 -> evaluate -> export.

Each step module holds orchestration only (what it reads, what it checks, where it writes);
the work is done by the libraries it calls: :mod:`pipeline.data`, :mod:`pipeline.models`,
:mod:`pipeline.mining`, :mod:`pipeline.train`, :mod:`pipeline.eval`.
"""
from __future__ import annotations

from types import ModuleType

from pipeline.steps.base import ORDER, get


def all_steps() -> tuple[ModuleType, ...]:
    """Every step module, in pipeline order."""
    return tuple(get(name) for name in ORDER)


__all__ = ["ORDER", "all_steps", "get"]
