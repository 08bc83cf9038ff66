"""Hard-negative mining: embed the stage-2 pairs with the miner, exact kNN, false-negative
filters, and the stage-2 training table. Runs standalone as an offline job.

Local:    python jobs/mine_negatives.py --config jobs/configs/demo.yaml
Cluster:  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
              python jobs/mine_negatives.py --config jobs/configs/demo.yaml output_root=s3://BUCKET/runs/demo
Needs:    <output_root>/prepare_data/pairs and the miner (mining.miner: 'stage1' = the stage-1
          model, or any Embedder folder / s3:// prefix)
Outputs:  <output_root>/mine_negatives/part-*.parquet (mined), embeddings/, scores.png, _manifest.json
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (makes `pipeline` importable from a plain checkout)

from pipeline.cli import run_step


def main(argv: list[str] | None = None) -> None:
    run_step(argv, "mine_negatives", __doc__)


if __name__ == "__main__":
    main()
