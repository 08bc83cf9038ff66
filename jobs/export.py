"""Export: the trained embedder as a Hugging Face folder with a model card, checked by a round
trip against the embeddings of the model as trained. No Ray needed.

Local:    python jobs/export.py --config jobs/configs/demo.yaml
          python jobs/export.py --config jobs/configs/demo.yaml export.source=stage1 \
              export.dtype=bfloat16 export.destination=/models/unime-demo
Cluster:  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
              python jobs/export.py --config jobs/configs/qwen2vl_2b.yaml output_root=s3://BUCKET/runs/qwen2vl-2b
Needs:    <output_root>/<export.source>/model + _manifest.json (run jobs/stage2.py or
          jobs/stage1.py first), or export.source=<Embedder folder or s3:// prefix>;
          <output_root>/evaluate/report.json goes into the card when present
Outputs:  <export.destination> (default <output_root>/export/model: safetensors, tokenizer,
          README.md, unime_backbone.json) + <output_root>/export/_manifest.json
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (makes `pipeline` importable from a plain checkout)

from pipeline.cli import run_step


def main(argv: list[str] | None = None) -> None:
    run_step(argv, "export", __doc__)


if __name__ == "__main__":
    main()
