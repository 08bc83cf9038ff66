"""Stage 2: hard-negative enhanced instruction tuning (Ray Train + DeepSpeed, LoRA).

Local:    python jobs/stage2.py --config jobs/configs/demo.yaml
Cluster:  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
              python jobs/stage2.py --config jobs/configs/qwen2vl_2b.yaml output_root=s3://BUCKET/runs/qwen2vl-2b
Needs:    <output_root>/mine_negatives and, with stage2.init=stage1 (the default), <output_root>/stage1
Outputs:  <output_root>/stage2/{ray/,adapter/,model/,metrics.jsonl,curves.png,tensorboard/} + _manifest.json
Resume:   relaunch the same command: it continues from the last checkpoint of its run
Ablation: stage2.negatives=batch|mined|both, stage2.mode=full_batch, stage2.init=student
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (makes `pipeline` importable from a plain checkout)

from pipeline.cli import run_step


def main(argv: list[str] | None = None) -> None:
    run_step(argv, "stage2", __doc__)


if __name__ == "__main__":
    main()
