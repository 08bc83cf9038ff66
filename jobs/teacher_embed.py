"""Teacher embeddings: embed every stage-1 text group with the teacher (Ray Data actors).

Local:    python jobs/teacher_embed.py --config jobs/configs/demo.yaml
Cluster:  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
              python jobs/teacher_embed.py --config jobs/configs/demo.yaml output_root=s3://BUCKET/runs/demo
Needs:    <output_root>/prepare_data/text_groups (run jobs/prepare_data.py first)
Outputs:  <output_root>/teacher_embed/part-*.parquet (id, texts, teacher_emb float16) + _manifest.json
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (makes `pipeline` importable from a plain checkout)

from pipeline.cli import parse_config
from pipeline.models.teacher_embed import STEP, format_summary, teacher_embed
from pipeline.ray_utils import init_ray


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv, __doc__)
    init_ray(config)
    print(format_summary(teacher_embed(config), config.step_dir(STEP)))


if __name__ == "__main__":
    main()
