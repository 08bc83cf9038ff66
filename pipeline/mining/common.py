"""Helpers shared by the exact (``search.py``) and the IVF (``ivf.py``) search.

A leaf module: it imports no other ``pipeline.mining`` module, so both searches can use
it without importing each other back.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import faiss

FAISS_GPU_MAX_K = 2048  # FAISS GPU kernels select at most 2048 results per query


def block_ranges(n: int, block: int) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``range(n)`` in steps of ``block``."""
    for start in range(0, n, block):
        yield start, min(start + block, n)


@contextlib.contextmanager
def faiss_threads(num_threads: int | None) -> Iterator[None]:
    """Run faiss with ``num_threads`` OpenMP threads, restoring the previous setting."""
    if num_threads is None:
        yield
        return
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(num_threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)
