"""Run every step of the pipeline in order on one config (the README's main command).

Local:    python jobs/run_all.py --config jobs/configs/demo.yaml      (or: make demo)
Ablation: python jobs/run_all.py --config jobs/configs/demo.yaml ablation=true
Cluster:  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
              python jobs/run_all.py --config jobs/configs/demo.yaml output_root=s3://BUCKET/runs/demo
Steps:    prepare_data -> teacher_embed -> stage1 -> mine_negatives -> stage2 -> evaluate -> export
Each step skips work already complete under <output_root>/<step>/; the end prints a table of
Precision@1 per eval set for the untrained, stage-1 and stage-2 models.
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (makes `pipeline` importable from a plain checkout)

from pipeline.cli import run_pipeline


def main(argv: list[str] | None = None) -> None:
    run_pipeline(argv, __doc__)


if __name__ == "__main__":
    main()
