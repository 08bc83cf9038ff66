"""Submit steps of the pipeline to a Ray cluster as jobs (deterministic ids: a rerun resumes).

Usage:
    python jobs/submit.py STEP --config jobs/configs/qwen2vl_2b.yaml output_root=s3://BUCKET/runs/qwen2vl-2b [key=value ...]
        [--address http://127.0.0.1:8265] [--runtime-env cluster/runtime_env.yaml] [--working-dir .] [--no-follow]

Examples:
    ray dashboard ray_cluster.yaml &     # tunnels the dashboard to http://127.0.0.1:8265
    python jobs/submit.py prepare_data --config jobs/configs/qwen2vl_2b.yaml output_root=s3://BUCKET/runs/qwen2vl-2b
    python jobs/submit.py all --config jobs/configs/qwen2vl_2b.yaml output_root=s3://BUCKET/runs/qwen2vl-2b
    python jobs/submit.py run_all --config jobs/configs/qwen2vl_2b.yaml output_root=s3://BUCKET/runs/qwen2vl-2b --no-follow
    python jobs/submit.py stage2 --config jobs/configs/qwen2vl_2b.yaml output_root=s3://BUCKET/runs/qwen2vl-2b stage2.negatives=mined

STEP:     one step (prepare_data, teacher_embed, stage1, mine_negatives, stage2, evaluate,
          export), all (each step its own job, in order, each followed to its end; stops at
          the first failure) or run_all (the whole chain as one job: jobs/run_all.py)
Address:  --address, else $RAY_ADDRESS, else http://127.0.0.1:8265
Job ids:  <name>-<step>-<10 hex of the step hash> (run_all: <name>-run_all-<10 hex>); the
          same command is the same id: a SUCCEEDED step is skipped, a running one followed
Resume:   rerun the same command: a FAILED/STOPPED job is resubmitted as <id>-retry<N+1>,
          which resumes from the step's checkpoints and finished shards
Refused before submitting (exit 2, one line): a bad config, output_root empty or relative,
          a --config outside --working-dir; exit 1: a missing file, a failed job
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (makes `pipeline` importable from a plain checkout)

from pipeline import submit


def main(argv: list[str] | None = None) -> int:
    return submit.main(argv, description=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
