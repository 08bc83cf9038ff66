"""Prepare: raw sources (or the built-in demo world) -> canonical Parquet shards.

Local:    python jobs/prepare_data.py --config jobs/configs/demo.yaml
Cluster:  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
              python jobs/prepare_data.py --config jobs/configs/demo.yaml output_root=s3://BUCKET/runs/demo
Outputs:  <output_root>/prepare_data/{text_groups,pairs,eval_images,eval}/ + _manifest.json
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (makes `pipeline` importable from a plain checkout)

from pipeline.cli import run_step


def main(argv: list[str] | None = None) -> None:
    run_step(argv, "prepare_data", __doc__)


if __name__ == "__main__":
    main()
