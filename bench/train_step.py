"""One stage-1 training step with and without the gradient cache, in the same process.

Builds the demo's tiny LLaVA-NeXT student and two DeepSpeed engines (world size 1, gloo,
ZeRO-2, fp32 on CPU) through the training loop's own functions (``build_engine``,
``Stage1Spec.make_step``, ``train_step``): one with ``grad_cache_chunk_size=0`` (one plain
forward + backward over the local batch) and one with the gradient cache (no-grad forward
of every chunk, loss, re-forward + backward per chunk). Steps of the two alternate, so
machine load hits both alike; the median step time gives samples/s and tokens/s (texts
and non-padding tokens, tokenisation included). The cache costs one extra forward: its
floor is about 1.5x the plain step when backward costs twice a forward; with LoRA the
backward computes no gradients of the frozen weights, and fixed per-step costs
(tokenisation, the optimizer step) are the same in both modes, so the measured ratio can
be lower. Each chunk is padded to its own longest text (``padded_tokens``).

    python bench/train_step.py [--groups 64] [--chunk 32] [--steps 8] [--threads 1]

Writes bench/results/train_step.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import socket
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.data.demo_world import generate_demo_world  # noqa: E402
from pipeline.models import build_tiny_model  # noqa: E402
from pipeline.train import loop  # noqa: E402
from pipeline.train.stage1 import Stage1Spec, StudentSource, TextGroup  # noqa: E402

TEACHER_DIM = 384


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_single_process() -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.distributed.init_process_group("gloo")


def demo_groups(folder: str, count: int) -> list[TextGroup]:
    """NLI groups of the demo world with random unit teacher vectors (speed only)."""
    import csv

    world = generate_demo_world(folder, num_nli_groups=count, num_train_images=8,
                                num_eval_images=4, num_eval_candidates=2, image_size_px=32)
    with open(world.nli_csv, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rng = np.random.default_rng(0)
    groups = []
    for i, row in enumerate(rows):
        emb = rng.standard_normal((3, TEACHER_DIM)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        texts = (row["sent0"], row["sent1"], row["hard_neg"])
        groups.append(TextGroup(f"nli:{i}", texts, emb.astype(np.float16)))
    return groups


def make_spec(config, student: StudentSource, groups: list[TextGroup], chunk: int) -> Stage1Spec:
    settings = loop.LoopSettings(
        stage="stage1", stage_dir=tempfile.mkdtemp(prefix="unime-bench-"),
        train=dataclasses.replace(config.train, num_workers=1, grad_cache_chunk_size=chunk),
        optim=loop.OptimSettings(lr=1e-4, warmup_ratio=0.0, schedule="constant",
                                 weight_decay=0.0, max_grad_norm=1.0, epochs=1, max_steps=0),
        global_batch_rows=len(groups), row_keys=tuple(g.id for g in groups), precision="fp32",
        use_gpu=False, sample_unit="texts")
    return Stage1Spec(settings, student=student, config=config, texts_per_group=3,
                      probe_texts=[])


def timed_step(ctx: loop.WorkerContext, engine, spec: Stage1Spec,
               groups: list[TextGroup]) -> tuple[float, int, int, int]:
    start = time.perf_counter()
    batch = spec.make_step(ctx, engine.module, groups)
    stats = loop.train_step(ctx, engine, spec, batch)
    assert np.isfinite(stats["loss"])
    padded = sum(int(chunk["input_ids"].numel()) for chunk in batch.chunks)
    return time.perf_counter() - start, batch.num_samples, batch.num_tokens, padded


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=64, help="text groups per step (x3 texts)")
    parser.add_argument("--chunk", type=int, default=32, help="gradient-cache chunk, texts")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    init_single_process()
    config = load_config(str(REPO / "jobs" / "configs" / "demo.yaml"))
    with tempfile.TemporaryDirectory(prefix="unime-bench-") as tmp:
        groups = demo_groups(f"{tmp}/world", args.groups)
        texts = [t for g in groups for t in g.texts]
        path = build_tiny_model("llava_next", f"{tmp}/student", seed=0, vocab_texts=texts)
        student = StudentSource(path, "llava_next", False)
        modes = {"plain": 0, "grad_cache": args.chunk}
        runs = {}
        for name, chunk in modes.items():
            spec = make_spec(config, student, groups, chunk)
            ctx = loop.WorkerContext(settings=spec.settings, rank=0, world_size=1,
                                     device=torch.device("cpu"))
            engine = loop.build_engine(ctx, spec)
            spec.set_train_mode(engine.module)
            timed_step(ctx, engine, spec, groups)  # warm-up
            runs[name] = (ctx, engine, spec)
        times: dict[str, list[float]] = {name: [] for name in modes}
        padded: dict[str, int] = {}
        for _ in range(args.steps):
            for name, (ctx, engine, spec) in runs.items():
                seconds, samples, tokens, padded[name] = timed_step(ctx, engine, spec, groups)
                times[name].append(seconds)
    result = {"device": "cpu", "torch_threads": args.threads, "world_size": 1, "zero_stage": 2,
              "precision": "fp32", "model": "tiny llava_next (2 layers, width 64)",
              "texts_per_step": samples, "tokens_per_step": tokens, "chunk_size": args.chunk,
              "timed_steps": args.steps}
    for name in modes:
        median = statistics.median(times[name])
        result[name] = {"step_s_median": round(median, 4), "padded_tokens": padded[name],
                        "samples_per_s": round(samples / median, 1),
                        "tokens_per_s": round(tokens / median, 1)}
    result["overhead_ratio"] = round(result["grad_cache"]["step_s_median"]
                                     / result["plain"]["step_s_median"], 3)
    print(f"stage-1 step, {samples} texts / {tokens} tokens, 1 process, CPU:\n"
          f"  plain      {result['plain']['samples_per_s']:8.1f} texts/s "
          f"{result['plain']['tokens_per_s']:10.1f} tokens/s\n"
          f"  grad cache {result['grad_cache']['samples_per_s']:8.1f} texts/s "
          f"{result['grad_cache']['tokens_per_s']:10.1f} tokens/s (chunks of {args.chunk})\n"
          f"  overhead ratio {result['overhead_ratio']:.2f}x (floor ~1.5x: one extra forward)")
    out = REPO / "bench" / "results" / "train_step.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
