"""Stage 1: textual discriminative knowledge distillation (Ray Train + DeepSpeed, LoRA).

Local:    python jobs/stage1.py --config jobs/configs/demo.yaml
Cluster:  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
              python jobs/stage1.py --config jobs/configs/qwen2vl_2b.yaml output_root=s3://BUCKET/runs/qwen2vl-2b
Needs:    <output_root>/teacher_embed (run jobs/prepare_data.py and jobs/teacher_embed.py first)
Outputs:  <output_root>/stage1/{ray/,adapter/,model/,metrics.jsonl,curves.png,tensorboard/} + _manifest.json
Resume:   relaunch the same command: it continues from the last checkpoint of its run
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (makes `pipeline` importable from a plain checkout)

from pipeline.cli import run_step


def main(argv: list[str] | None = None) -> None:
    run_step(argv, "stage1", __doc__)


if __name__ == "__main__":
    main()
