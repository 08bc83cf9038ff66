"""Evaluate: MMEB-format Precision@1, caption retrieval R@K and SugarCrepe accuracy for one or
more models, with a report (json, markdown, bar plots).

Local:    python jobs/evaluate.py --config jobs/configs/demo.yaml
          python jobs/evaluate.py --config jobs/configs/demo.yaml 'eval.models=[base=student,stage2]'
Cluster:  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
              python jobs/evaluate.py --config jobs/configs/demo.yaml output_root=s3://BUCKET/runs/demo
Needs:    <output_root>/prepare_data/{eval,eval_images} (MMEB-format sets) and the models of
          eval.models ('label=path', or student / stage1 / stage2 = the run's folders)
Outputs:  <output_root>/evaluate/report.json, report.md, <set>.png, embeddings/, _manifest.json
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (makes `pipeline` importable from a plain checkout)

from pipeline.cli import run_step


def main(argv: list[str] | None = None) -> None:
    run_step(argv, "evaluate", __doc__)


if __name__ == "__main__":
    main()
