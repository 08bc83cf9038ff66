"""Run every step of the pipeline in order on one config (the README's main command).

Local:    python jobs/run_all.py --config jobs/configs/demo.yaml      (or: make demo)
Cluster:  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
              python jobs/run_all.py --config jobs/configs/demo.yaml output_root=s3://BUCKET/runs/demo
Steps:    prepare_data -> teacher_embed -> stage1 -> mine_negatives -> stage2 -> evaluate -> export
Each step skips work already complete under <output_root>/<step>/.
"""
from __future__ import annotations

import logging
import time

import _bootstrap  # noqa: F401  (makes `pipeline` importable from a plain checkout)

from pipeline import mine_negatives
from pipeline.cli import parse_config
from pipeline.data import prepare
from pipeline.eval import evaluate
from pipeline.models import teacher_embed
from pipeline.ray_utils import init_ray
from pipeline.train import stage1

logger = logging.getLogger("run_all")

# Steps not built yet: run_all says so instead of pretending.
NOT_YET_BUILT = ("stage2", "export")


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv, __doc__)
    start = time.perf_counter()
    init_ray(config)
    manifest = prepare.prepare_data(config)
    print(prepare.format_summary(manifest, config.step_dir(prepare.STEP)))
    manifest = teacher_embed.teacher_embed(config)
    print(teacher_embed.format_summary(manifest, config.step_dir(teacher_embed.STEP)))
    manifest = stage1.stage1(config)
    print(stage1.format_summary(manifest, config.step_dir(stage1.STEP)))
    manifest = mine_negatives.mine_negatives(config)
    print(mine_negatives.format_summary(manifest, config.step_dir(mine_negatives.STEP)))
    manifest = evaluate.evaluate(config)
    print(evaluate.format_summary(manifest, config.step_dir(evaluate.STEP)))
    print(f"\nrun {config.run_name}: finished in {time.perf_counter() - start:.1f} s; "
          f"outputs under {config.run_root}/")
    print("steps not built yet (skipped): " + ", ".join(NOT_YET_BUILT))


if __name__ == "__main__":
    main()
