"""Every benchmark in one command, with a summary others can read.

    make bench                   # .venv/bin/python bench/run_all.py
    make bench ARGS=--quick      # fewer sizes and texts: a few minutes
    make bench ARGS=--demo       # also time the two-command demo (jobs/run_all.py)

Runs, one after the other (each in its own process, as a user would run it):
``bench/mining.py`` (our search + filters vs ``mine_hard_negatives``, and the search's share
of the machine's GEMM limit), ``bench/teacher_embed.py`` (the teacher job vs a single-process
``SentenceTransformer.encode``) and ``bench/train_step.py --stage 2`` (a stage-2 step with and
without the gradient cache). Every ratio is the median of at least 3 alternating
repetitions, with its min and max. Writes ``bench/results/summary.json`` (top-level keys:
``mining_vs_st_min``, ``mining_gemm_fraction_min``, ``teacher_vs_st``, ``gc_overhead_stage2``,
``demo_seconds`` when timed, ``machine``, ``targets``, ``details``) and
``bench/results/summary.md``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))

# Targets of the issue that asked for this summary (issue 18); the summary says met or not.
TARGETS = {"mining_vs_st_min": (">=", 1.0), "mining_gemm_fraction_min": (">=", 0.7),
           "teacher_vs_st": (">=", 1.0)}
PLANS = {
    "quick": {"mining": ["--sizes", "20000", "40000", "--dims", "384", "--repeats", "3"],
              "teacher": ["--texts", "3000", "--actors", "2", "--repeats", "3",
                          "--rows-per-shard", "250"],
              "train_step": ["--stage", "2", "--stage2-steps", "6"]},
    "full": {"mining": ["--sizes", "20000", "40000", "80000", "160000", "--dims", "384",
                        "1024", "--repeats", "3"],
             "teacher": ["--texts", "12000", "--actors", "2", "--repeats", "3"],
             "train_step": ["--stage", "2"]},
}


def run(script: str, args: list[str]) -> float:
    """Run ``bench/<script>`` with ``args``; returns its wall time (it writes its JSON)."""
    start = time.perf_counter()
    print(f"\n== {script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(REPO / "bench" / script), *args], check=True, cwd=REPO)
    return round(time.perf_counter() - start, 1)


def time_demo() -> float:
    """Seconds of the embedded-default pipeline (jobs/run_all.py) into a fresh folder."""
    with tempfile.TemporaryDirectory(prefix="unime-demo-") as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "jobs/run_all.py", "--config", "jobs/configs/demo.yaml",
                        f"output_root={tmp}/run"], check=True, cwd=REPO)
        return round(time.perf_counter() - start, 1)


def summarize(mining: dict, teacher: dict, train: dict, demo_s: float | None,
              seconds: dict[str, float]) -> dict:
    speedups = {f"N={r['n']} d={r['d']}": r["speedup"] for r in mining["runs"]}
    fractions = {f"N={r['n']} d={r['d']}": r["fraction_of_gemm_limit"] for r in mining["runs"]}
    teacher_run = teacher["runs"][0]
    stage2 = train["stage2"]
    summary = {
        "mining_vs_st_min": min(s["median"] for s in speedups.values()),
        "mining_gemm_fraction_min": min(fractions.values()),
        "teacher_vs_st": teacher_run["ratio_vs_baseline"]["median"],
        "gc_overhead_stage2": stage2["grad_cache_overhead_ratio_paired"],
        **({"demo_seconds": demo_s} if demo_s is not None else {}),
        "machine": mining["machine"],
        "details": {
            "mining_speedup_by_size": speedups, "mining_gemm_fraction_by_size": fractions,
            "mining_identical_negatives_min": min(r["identical_negatives"]
                                                  for r in mining["runs"]),
            "gemm_limit": mining["gemm_limit"],
            "teacher": {k: teacher_run[k] for k in ("actors", "ratio_vs_baseline",
                                                    "ratio_vs_baseline_with_startup",
                                                    "baseline_texts_per_s", "job_texts_per_s",
                                                    "shards")},
            "teacher_texts": teacher["texts"],
            "stage2_step_s": {mode: stage2[mode]["step_s_median"]
                              for mode in ("in_batch", "mined", "mined_grad_cache")},
            "bench_seconds": seconds},
    }
    summary["targets"] = {key: {"target": f"{op} {value}", "value": summary[key],
                                "met": summary[key] >= value}
                          for key, (op, value) in TARGETS.items()}
    return summary


def markdown(summary: dict) -> str:
    details, machine = summary["details"], summary["machine"]
    blas = ", ".join(f"{lib['internal_api']} {lib['version']} ({lib['prefix']}, "
                     f"{lib['num_threads']} threads)" for lib in machine["blas_libraries"])
    lines = ["# Benchmark summary", "",
             f"Machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, load "
             f"{machine['loadavg'][0]}; torch {machine['torch']} ({machine['torch_blas']}), "
             f"faiss {machine['faiss']}, numpy {machine['numpy']}; libraries: {blas}; "
             f"OPENBLAS_CORETYPE={machine['OPENBLAS_CORETYPE'] or '(unset)'}.", "",
             "| number | value | target | met |", "|---|---:|---|---|"]
    for key, target in summary["targets"].items():
        lines.append(f"| `{key}` | {target['value']:.3g} | {target['target']} | "
                     f"{'yes' if target['met'] else '**no**'} |")
    lines.append(f"| `gc_overhead_stage2` | {summary['gc_overhead_stage2']:.3g} | - | - |")
    if "demo_seconds" in summary:
        lines.append(f"| `demo_seconds` | {summary['demo_seconds']:.0f} | <= 300 | "
                     f"{'yes' if summary['demo_seconds'] <= 300 else '**no**'} |")
    limit = details["gemm_limit"]
    lines += ["", "Mining, median speed-up over `mine_hard_negatives` [min, max] and the "
              "search's share of the GEMM limit:", "",
              "| size | speed-up | share of GEMM limit |", "|---|---:|---:|"]
    for size, s in details["mining_speedup_by_size"].items():
        lines.append(f"| {size} | {s['median']:.2f} [{s['min']:.2f}, {s['max']:.2f}] | "
                     f"{details['mining_gemm_fraction_by_size'][size]:.0%} |")
    lines += ["", "GEMM limit per d (GFLOP/s, best library first): " + "; ".join(
        f"d={d}: " + ", ".join(f"{name} {rate:.0f}" for name, rate in sorted(
            v["rates"].items(), key=lambda kv: -kv[1])) for d, v in limit.items()), ""]
    t = details["teacher"]
    lines += [f"Teacher job ({t['actors']} actors, {details['teacher_texts']} texts, "
              f"{t['shards']} shards) vs `SentenceTransformer.encode`: "
              f"{t['ratio_vs_baseline']['median']:.2f} [{t['ratio_vs_baseline']['min']:.2f}, "
              f"{t['ratio_vs_baseline']['max']:.2f}] without start-up, "
              f"{t['ratio_vs_baseline_with_startup']['median']:.2f} with it.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and texts")
    parser.add_argument("--demo", action="store_true", help="also time jobs/run_all.py")
    args = parser.parse_args(argv)
    plan = PLANS["quick" if args.quick else "full"]
    seconds = {"mining": run("mining.py", plan["mining"]),
               "teacher_embed": run("teacher_embed.py", plan["teacher"]),
               "train_step": run("train_step.py", plan["train_step"])}
    demo_s = time_demo() if args.demo else None
    results = {name: json.loads((RESULTS / f"{name}.json").read_text())
               for name in ("mining", "teacher_embed", "train_step")}
    summary = summarize(results["mining"], results["teacher_embed"], results["train_step"],
                        demo_s, seconds)
    summary["plan"] = "quick" if args.quick else "full"
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (RESULTS / "summary.md").write_text(markdown(summary))
    print("\n" + markdown(summary))
    print(f"wrote {RESULTS / 'summary.json'} and summary.md")
    return summary


if __name__ == "__main__":
    main()
