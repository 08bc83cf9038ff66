"""Teacher embeddings: embed every stage-1 text group with the teacher (Ray Data actors).

Local:    python jobs/teacher_embed.py --config jobs/configs/demo.yaml
Cluster:  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
              python jobs/teacher_embed.py --config jobs/configs/demo.yaml output_root=s3://BUCKET/runs/demo
Needs:    <output_root>/prepare_data/text_groups (run jobs/prepare_data.py first)
Outputs:  <output_root>/teacher_embed/part-*.parquet (id, texts, teacher_emb float16) + _manifest.json
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (makes `pipeline` importable from a plain checkout)

from pipeline.cli import run_step


def main(argv: list[str] | None = None) -> None:
    run_step(argv, "teacher_embed", __doc__)


if __name__ == "__main__":
    main()
