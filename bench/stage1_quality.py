"""Stage-1 quality on the demo: does the student's similarity structure follow the teacher's?

For held-out texts (caption-like eval targets that stage 1 never trained on), compare the
pairwise cosine similarities of the student with the teacher's: Spearman correlation of the
two lists of n(n-1)/2 similarities (``pipeline.train.stage1.similarity_agreement``), before
stage 1 (the starting student) and after it (``<run_root>/stage1/model``).

    python bench/stage1_quality.py --config jobs/configs/demo.yaml   (after jobs/stage1.py)

Writes bench/results/stage1_quality.json.
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import outputs  # noqa: E402
from pipeline.cli import parse_config  # noqa: E402
from pipeline.models import Embedder, Teacher  # noqa: E402
from pipeline.models.teacher import teacher_kwargs  # noqa: E402
from pipeline.train.stage1 import heldout_texts, similarity_agreement  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(argv, __doc__)
    manifest = outputs.require_complete(config.step_dir("stage1"))
    texts = heldout_texts(config)
    teacher_emb = Teacher(**teacher_kwargs(config.teacher)).encode(texts)  # (n, D_t)
    result = {"config": config.run_name, "texts": len(texts), "pairs": len(texts) * (len(texts) - 1) // 2,
              "stage1_steps": manifest["steps"], "stage1_seconds": manifest["seconds"],
              "final_loss": manifest["final_loss"]}
    for name, source in (("before", manifest["student"]["uri"]), ("after", manifest["model"])):
        start = time.perf_counter()
        student = Embedder.from_pretrained(source, family=manifest["student"]["family"] or None)
        emb = student.encode(texts).numpy()  # (n, D_s)
        result[f"spearman_{name}"] = round(similarity_agreement(emb, teacher_emb), 4)
        result[f"encode_seconds_{name}"] = round(time.perf_counter() - start, 2)
    print(f"held-out texts: {len(texts)} ({result['pairs']} pairs); Spearman of student vs "
          f"teacher similarities: before stage 1 {result['spearman_before']:.3f}, after "
          f"{result['spearman_after']:.3f} ({manifest['steps']} steps, "
          f"{manifest['seconds']:.0f} s)")
    out = REPO / "bench" / "results" / "stage1_quality.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
