"""Hard-negative mining core: blockwise top-k search and false-negative filtering.

Arrays in, arrays out (no Ray, files or configs):

- ``search_topk`` / ``search_within_groups`` (``search.py``): exact inner-product top-k
  (faiss, faiss GPU, torch), or IVF for very large corpora (``ivf.py``);
  ``measure_recall`` / ``estimate_recall`` (``recall.py``) for IVF.
- ``select_negatives``: the false-negative filter (self, duplicate content, UniME margin,
  positive-aware ratio, max score) and top / rank-range selection, with per-query counts
  (``filters.py``; margin and ratio are the rule of :mod:`pipeline.losses`).
- ``search_blocks`` (``blocks.py``): the same exact grouped top-k over candidates streamed
  block by block (:class:`CandidateBlock`), merged exactly, with only one block in memory.
- ``mine_within_groups`` (``exact.py``): search + filter, and search deeper where the filters
  left a row short, so the negatives equal an exhaustive search's after the same filters;
  in memory or over a stream of blocks (``candidates=``).

Imports within the package run one way only: ``recall -> search -> ivf -> common`` and
``search -> common``, ``blocks -> search``, ``exact -> blocks, search, filters``;
tests/test_mining_core.py checks that there is no cycle.
"""
from __future__ import annotations

from pipeline.mining.blocks import BlockSource, CandidateBlock, search_blocks
from pipeline.mining.common import FAISS_GPU_MAX_K
from pipeline.mining.exact import MinedNegatives, mine_within_groups
from pipeline.mining.filters import (
    COUNT_KEYS,
    NegativeSelection,
    select_negatives,
    summarize_counts,
)
from pipeline.mining.ivf import build_ivf_index
from pipeline.mining.recall import estimate_recall, measure_recall
from pipeline.mining.search import (
    SearchResult,
    faiss_gpu_available,
    resolve_backend,
    search_topk,
    search_within_groups,
)

__all__ = [
    "BlockSource",
    "COUNT_KEYS",
    "CandidateBlock",
    "FAISS_GPU_MAX_K",
    "MinedNegatives",
    "NegativeSelection",
    "SearchResult",
    "build_ivf_index",
    "estimate_recall",
    "faiss_gpu_available",
    "measure_recall",
    "mine_within_groups",
    "resolve_backend",
    "search_blocks",
    "search_topk",
    "search_within_groups",
    "select_negatives",
    "summarize_counts",
]
