"""The machine beside every benchmark number, and its GEMM limit measured honestly.

``describe()``: CPU model, logical and usable cores, load average, the BLAS libraries loaded
in this process (``threadpoolctl``: numpy's OpenBLAS, faiss's OpenBLAS, OpenMP) with their
versions and threads, torch's BLAS, ``OPENBLAS_CORETYPE``.

``gemm_limit(d)``: the best fp32 GEMM rate among the BLAS libraries present, each measured in
this process with the same threads as the search: numpy's ``matmul``, torch's ``matmul``
(MKL here) and ``cblas_sgemm`` of every other OpenBLAS that exports it (faiss's, called
through ctypes: the one faiss's flat search runs on). The search's rate divided by the best
of them is the share of the machine it gets; dividing by one library alone can exceed 1
when another library is faster (the old ``mining.json`` did that: 91-117 % "of GEMM").
"""
from __future__ import annotations

import ctypes
import os
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

GEMM_M, GEMM_N = 4096, 8192  # a query block times a candidate block, as the search tiles


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def blas_libraries() -> list[dict]:
    """The BLAS / OpenMP libraries loaded in this process (import faiss first to see its)."""
    import faiss  # noqa: F401  (loads its OpenBLAS, so that it is listed)
    from threadpoolctl import threadpool_info

    return [{k: lib.get(k) for k in ("internal_api", "prefix", "version", "num_threads",
                                     "architecture", "threading_layer", "filepath")}
            for lib in threadpool_info()]


def describe() -> dict:
    torch_blas = next((part.split("=", 1)[1] for line in torch.__config__.show().splitlines()
                       for part in line.replace(",", " ").split() if part.startswith("BLAS_INFO=")),
                      "unknown")
    import faiss

    return {"cpu_model": _cpu_model(), "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__, "torch_blas": torch_blas,
            "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__,
            "faiss_omp_threads": faiss.omp_get_max_threads(),
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", ""),
            "blas_libraries": blas_libraries()}


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (thread pools, page faults)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _cblas_sgemm(path: str, a: np.ndarray, b: np.ndarray) -> Callable[[], None] | None:
    """C = A @ B through ``cblas_sgemm`` of the library at ``path`` (None if it has none)."""
    try:
        sgemm = ctypes.CDLL(path).cblas_sgemm
    except (OSError, AttributeError):
        return None
    out = np.empty((a.shape[0], b.shape[1]), np.float32)
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    sgemm.argtypes = [i32, i32, i32, i32, i32, i32, ctypes.c_float, ptr, i32, ptr, i32,
                      ctypes.c_float, ptr, i32]
    sgemm.restype = None
    m, k = a.shape
    n = b.shape[1]

    def call() -> None:  # row-major (101), no transposes (111)
        sgemm(101, 111, 111, m, n, k, 1.0, a.ctypes.data, k, b.ctypes.data, n, 0.0,
              out.ctypes.data, n)

    call()
    if not np.allclose(out, a @ b, rtol=1e-3, atol=1e-3):
        return None
    return call


def gemm_rates(d: int, repeats: int = 5) -> dict[str, float]:
    """Best fp32 GEMM rate (GFLOP/s) of (4096 x d) @ (d x 8192) per BLAS library present."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((GEMM_M, d), dtype=np.float32)
    b = rng.standard_normal((d, GEMM_N), dtype=np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    calls: dict[str, Callable[[], object]] = {"numpy": lambda: a @ b, "torch": lambda: ta @ tb}
    for lib in blas_libraries():
        if lib["internal_api"] == "openblas" and (call := _cblas_sgemm(lib["filepath"], a, b)):
            calls[f"{lib['prefix']} {lib['version']} (cblas_sgemm)"] = call
    flops = 2.0 * GEMM_M * GEMM_N * d
    return {name: round(flops / _best_seconds(call, repeats) / 1e9, 1)
            for name, call in calls.items()}


def gemm_limit(d: int, repeats: int = 5) -> dict:
    """``{"gflops": best rate, "library": its name, "rates": every library's}``."""
    rates = gemm_rates(d, repeats)
    library = max(rates, key=rates.__getitem__)
    return {"gflops": rates[library], "library": library, "rates": rates}
