"""Training-step throughput of both stages, each mode against its baseline in the same process.

Everything runs through the training loop's own functions (``loop.build_engine``, the
stage's ``make_step``, ``loop.train_step``) on the demo's tiny LLaVA-NeXT student (or
``--student``), one process (world size 1, ZeRO-2): fp32 on CPU, bf16 on a CUDA device.
The modes of a stage alternate step by step, so machine load hits them alike; the median
step time gives the rates (tokenisation and image preprocessing included).

Stage 1 (text groups of the demo's NLI rows, random teacher vectors): ``plain`` (one
forward + backward over the local batch) vs ``grad_cache`` (no-grad forward of every chunk,
loss, re-forward + backward per chunk). The cache costs one extra forward: its floor is
about 1.5x the plain step when backward costs twice a forward; with LoRA the backward
computes no gradients of the frozen weights, and fixed per-step costs (tokenisation, the
optimizer step) are the same in both modes, so the measured ratio can be lower. Each
chunk is padded to its own longest text (``padded_tokens``).

Stage 2 (multimodal pairs of the demo's MMEB-train sets through the real data path:
``read_mmeb_train`` -> ``validate_pair`` (packed images, content keys) -> a ``mined``
table -> ``decode_pairs``; every batch mixes the four sets, so image queries and image
targets are in every step; a row's "mined" negatives are other rows' targets of its set
with distinct content keys, drawn at random: the speed does not depend on how they were
chosen). Three modes on the same global batch of ``--pairs`` pairs:

- ``in_batch``: ``stage2.negatives=batch``, queries + positives only, plain step;
- ``mined``: ``negatives=both`` with ``--mined`` negatives per row (given 0), plain step;
- ``mined_grad_cache``: as ``mined`` with the gradient cache (chunks of ``--stage2-chunk``
  items; the flat item list sorted by modality and length, then chunked).

Items = queries + positives + negatives embedded. ``hard_negative_cost_ratio`` = step time
mined / in_batch (cost per pair of carrying the negatives), ``grad_cache_overhead_ratio``
= mined_grad_cache / mined; the ``*_paired`` ratios are medians of the per-round ratios of
back-to-back steps (robust to load drifting during the run). Padding weighs on the
plain stage-2 step: text items are padded to the longest image item of the whole batch,
while each gradient-cache chunk is padded to its own longest item, so the cache computes
fewer positions (``padded_tokens``) and its overhead can fall well below stage 1's.

Model FLOPs (both stages): ``2 N T`` forward + ``4 N T`` backward, with ``N T`` summed over
the parts a token passes through: language-model parameters (input embeddings excluded)
x non-padding sequence tokens (image tokens included) + vision tower and projector
parameters x vision patch tokens. Attention scores, padding and the LoRA backward saving
(no weight gradients of frozen weights) are ignored: the usual 6N convention. The gradient
cache's extra forward (``+2 N T``) is counted in ``hardware_tflop_per_step`` and ``hfu``,
not in the model FLOPs (``mfu``), as in PaLM's MFU/HFU. MFU = model FLOP/s over the peak
bf16 FLOP/s (``--peak-tflops``, default 989 = H100 SXM dense); only on a CUDA device (bf16),
null on CPU.

    python bench/train_step.py [--stage both] [--groups 64] [--chunk 32] [--steps 8]
        [--pairs 32] [--mined 8] [--stage2-chunk 32] [--stage2-steps 16] [--threads 1]

Writes bench/results/train_step.json (sections ``stage1`` and ``stage2``, those run).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import os
import pathlib
import platform
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from pipeline.config import Config, OptimConfig, load_config  # noqa: E402
from pipeline.data.demo_world import DemoWorldFiles, generate_demo_world  # noqa: E402
from pipeline.models import build_tiny_model  # noqa: E402
from pipeline.models.student import StudentSource  # noqa: E402
from pipeline.train import loop  # noqa: E402
from pipeline.train.stage1 import Stage1Spec, TextGroup  # noqa: E402
from pipeline.train.stage2 import PairRow, Stage2Spec, decode_pairs  # noqa: E402

TEACHER_DIM = 384
DEMO_CONFIG = REPO / "jobs" / "configs" / "demo.yaml"
OUT = REPO / "bench" / "results" / "train_step.json"


# -- process and device --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_single_process(device: torch.device) -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return torch.device("cuda:0" if name == "cuda" else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free the engines of a finished stage before the next one builds its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- one timed step and the alternation ----------------------------------------------------------
@dataclasses.dataclass
class StepRecord:
    seconds: float
    samples: int        # texts (stage 1) or items (stage 2) embedded
    tokens: int         # non-padding sequence tokens
    padded_tokens: int  # sequence positions computed, padding included
    vision_tokens: int | None
    stats: dict[str, float]


@dataclasses.dataclass
class Run:
    """One mode: its context, engine and spec, ready to step."""

    ctx: loop.WorkerContext
    engine: Any
    spec: Any
    rows: list[Any]

    def step(self) -> StepRecord:
        synchronize(self.ctx.device)
        start = time.perf_counter()
        batch = self.spec.make_step(self.ctx, self.engine.module, self.rows)
        stats = loop.train_step(self.ctx, self.engine, self.spec, batch)
        synchronize(self.ctx.device)
        seconds = time.perf_counter() - start
        if not np.isfinite(stats["loss"]):
            raise RuntimeError(f"{self.ctx.settings.stage}: loss {stats['loss']}")
        padded = sum(int(chunk["input_ids"].numel()) for chunk in batch.chunks)
        return StepRecord(seconds, batch.num_samples, batch.num_tokens, padded,
                          vision_tokens(self.engine.module, batch.chunks), stats)


def build_run(spec: Any, rows: list[Any], device: torch.device, warmup: int) -> Run:
    ctx = loop.WorkerContext(settings=spec.settings, rank=0, world_size=1, device=device)
    engine = loop.build_engine(ctx, spec)
    spec.set_train_mode(engine.module)
    run = Run(ctx, engine, spec, rows)
    for _ in range(warmup):
        run.step()
    return run


def paired_ratio(records: dict[str, list[StepRecord]], mode: str, baseline: str) -> float:
    """Median over rounds of step time ``mode`` / ``baseline`` in the same round (the
    two ran back to back, so slow drifts of the machine's load cancel)."""
    return round(statistics.median(
        m.seconds / b.seconds for m, b in zip(records[mode], records[baseline], strict=True)), 3)


def alternate(runs: dict[str, Run], steps: int) -> dict[str, list[StepRecord]]:
    """``steps`` timed steps of every mode, the modes taking turns step by step."""
    records: dict[str, list[StepRecord]] = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            records[name].append(run.step())
    return records


# -- model FLOPs -----------------------------------------------------------------------------------
def parameter_split(module: Any) -> dict[str, int]:
    """Parameters a sequence token passes through (``language``: the core model without
    the vision parts and the input embeddings) and those a vision patch passes through
    (``vision``: tower + projector), LoRA weights included."""
    from pipeline.models import resolve_path, vision_parameters

    core = resolve_path(module.model, module.spec.core_path)
    vision = {id(p): p for p in vision_parameters(module.model, module.spec)}
    embeddings = {id(p) for p in core.get_input_embeddings().parameters()}
    language = [p for p in core.parameters() if id(p) not in vision and id(p) not in embeddings]
    return {"language": sum(p.numel() for p in language),
            "vision": sum(p.numel() for p in vision.values())}


def vision_tokens(module: Any, chunks: list[dict[str, torch.Tensor]]) -> int | None:
    """Patch tokens through the vision tower in ``chunks``: LLaVA-NeXT crops (base image +
    any-res tiles, ``image_sizes``) x (patches + CLS), or Qwen2-VL's ``image_grid_thw``;
    None for an input layout not known here."""
    total = 0
    for chunk in chunks:
        if "image_grid_thw" in chunk:
            total += int(chunk["image_grid_thw"].prod(dim=1).sum())
        elif "pixel_values" in chunk and chunk["pixel_values"].ndim == 5:
            from transformers.models.llava_next.modeling_llava_next import (
                image_size_to_num_patches,
            )

            config = module.model.config
            side = config.vision_config.image_size
            per_crop = (side // config.vision_config.patch_size) ** 2 + 1  # + CLS
            crops = sum(image_size_to_num_patches(size.tolist(), config.image_grid_pinpoints,
                                                  side) for size in chunk["image_sizes"])
            total += crops * per_crop
        elif "pixel_values" in chunk:
            return None
    return total


def flops_summary(record: StepRecord, params: dict[str, int], *, step_s: float,
                  extra_forward: bool, device: torch.device, precision: str,
                  peak_tflops: float) -> dict[str, Any]:
    """Model FLOPs of one step (6 N T), hardware FLOPs (+2 N T for the gradient cache's
    extra forward), the achieved rates and, on CUDA in bf16, MFU and HFU."""
    if record.vision_tokens is None:
        return {"mfu": None, "mfu_note": "unknown vision input layout: FLOPs not counted"}
    forward = 2 * (params["language"] * record.tokens + params["vision"] * record.vision_tokens)
    model_flop = 3 * forward
    hardware_flop = model_flop + (forward if extra_forward else 0)
    out: dict[str, Any] = {
        "model_tflop_per_step": float(f"{model_flop / 1e12:.4g}"),
        "hardware_tflop_per_step": float(f"{hardware_flop / 1e12:.4g}"),
        "model_tflops_achieved": float(f"{model_flop / step_s / 1e12:.4g}"),
        "mfu": None, "hfu": None}
    if device.type == "cuda" and precision == "bf16":
        out["mfu"] = round(model_flop / step_s / (peak_tflops * 1e12), 6)
        out["hfu"] = round(hardware_flop / step_s / (peak_tflops * 1e12), 6)
    else:
        out["mfu_note"] = (f"{device.type} {precision}: MFU is measured only on a CUDA device "
                           f"in bf16 against --peak-tflops; torch.cuda.is_available() = "
                           f"{torch.cuda.is_available()}")
    return out


def mode_summary(records: list[StepRecord], units: dict[str, int]) -> dict[str, Any]:
    """Median step time and the rates of one mode; ``units`` = {name: count per step}."""
    median = statistics.median(r.seconds for r in records)
    last = records[-1]
    out: dict[str, Any] = {"step_s_median": round(median, 4),
                           "step_s_min": round(min(r.seconds for r in records), 4),
                           "padded_tokens": last.padded_tokens}
    for name, count in units.items():
        out[f"{name}_per_s"] = round(count / median, 1)
    out["tokens_per_s"] = round(last.tokens / median, 1)
    return out


# -- stage 1 ----------------------------------------------------------------------------------------
def demo_groups(world: DemoWorldFiles, count: int) -> list[TextGroup]:
    """NLI groups of the demo world with random unit teacher vectors (speed only)."""
    with open(world.nli_csv, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:count]
    rng = np.random.default_rng(0)
    groups = []
    for i, row in enumerate(rows):
        emb = rng.standard_normal((3, TEACHER_DIM)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        texts = (row["sent0"], row["sent1"], row["hard_neg"])
        groups.append(TextGroup(f"nli:{i}", texts, emb.astype(np.float16)))
    return groups


def loop_settings(stage: str, stage_dir: str, train: Any, *, rows: list[Any], keys: tuple,
                  device: torch.device, sample_unit: str) -> loop.LoopSettings:
    return loop.LoopSettings(
        stage=stage, stage_dir=stage_dir, train=train,
        optim=OptimConfig(lr=1e-4, warmup_ratio=0.0, schedule="constant", weight_decay=0.0,
                          max_grad_norm=1.0),
        global_batch_rows=len(rows), row_keys=keys,
        precision="bf16" if device.type == "cuda" else "fp32", use_gpu=device.type == "cuda",
        sample_unit=sample_unit)


def bench_stage1(args: argparse.Namespace, config: Config, student: StudentSource,
                 groups: list[TextGroup], device: torch.device, tmp: str) -> dict[str, Any]:
    runs = {}
    for name, chunk in {"plain": 0, "grad_cache": args.chunk}.items():
        train = dataclasses.replace(config.train, num_workers=1, grad_cache_chunk_size=chunk)
        settings = loop_settings("stage1", f"{tmp}/stage1-{name}", train, rows=groups,
                                 keys=tuple(g.id for g in groups), device=device,
                                 sample_unit="texts")
        spec = Stage1Spec(settings, student=student, config=config, texts_per_group=3,
                          probe_texts=[])
        runs[name] = build_run(spec, groups, device, args.warmup)
    records = alternate(runs, args.steps)
    last = records["plain"][-1]
    precision = runs["plain"].ctx.settings.precision
    params = parameter_split(runs["plain"].engine.module)
    result: dict[str, Any] = {
        "device": device.type, "torch_threads": args.threads, "world_size": 1,
        "zero_stage": config.train.zero_stage, "precision": precision,
        "model": args.model_name, "texts_per_step": last.samples,
        "tokens_per_step": last.tokens, "chunk_size": args.chunk, "timed_steps": args.steps,
        "warmup_steps": args.warmup, "params": params}
    for name, mode_records in records.items():
        result[name] = mode_summary(mode_records, {"samples": last.samples})
        result[name].update(flops_summary(
            mode_records[-1], params, step_s=result[name]["step_s_median"],
            extra_forward=name == "grad_cache", device=device, precision=precision,
            peak_tflops=args.peak_tflops))
    result["overhead_ratio"] = round(result["grad_cache"]["step_s_median"]
                                     / result["plain"]["step_s_median"], 3)
    result["overhead_ratio_paired"] = paired_ratio(records, "grad_cache", "plain")
    del runs
    release(device)
    return result


# -- stage 2 ----------------------------------------------------------------------------------------
def mined_table(world: DemoWorldFiles, config: Config, *, mined: int,
                seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """The demo's MMEB-train pairs (``PAIR_COLUMNS`` + dataset), validated and packed by the
    data step's own functions, and their negatives' target rows (``TARGET_COLUMNS``,
    ``mined`` per pair, row after row): other targets of its set with distinct content
    keys (random choice); its given negative kept as the data gives it."""
    from pipeline.data.prepare import pack_options
    from pipeline.data.readers import read_mmeb_train
    from pipeline.data.validate import ImageLoader, validate_pair
    from pipeline.train.stage2 import PAIR_COLUMNS, TARGET_COLUMNS

    loader = ImageLoader(pack_options(config))
    raws = read_mmeb_train(str(world.mmeb_train_dir), str(world.root))
    pairs = [validate_pair(raw, loader, config.data.max_text_chars) for raw in raws]
    rng = np.random.default_rng(seed)
    negatives = []
    for pair in pairs:
        same_set = [p for p in pairs if p["dataset"] == pair["dataset"]]
        targets: dict[str, dict] = {}
        for i in rng.permutation(len(same_set)):
            other = same_set[i]
            if other["pos_key"] != pair["pos_key"]:
                targets.setdefault(other["pos_key"], other)
        chosen = list(targets.values())[:mined]
        if len(chosen) < mined:
            raise ValueError(f"{pair['dataset']}: only {len(chosen)} distinct other targets")
        negatives += [{k: t[k] for k in TARGET_COLUMNS} for t in chosen]
    own = pa.Table.from_pylist([{k: p[k] for k in (*PAIR_COLUMNS, "dataset")} for p in pairs])
    return own, pa.Table.from_pylist(negatives)


def demo_batch(tables: tuple[pa.Table, pa.Table], *, pairs: int, mined: int,
               seed: int = 0) -> list[PairRow]:
    """One global batch of ``pairs`` rows: the sets taken in turn, then shuffled."""
    own, negatives = tables
    per_row = negatives.num_rows // own.num_rows
    keep = np.arange(negatives.num_rows) % per_row < mined  # the first ``mined`` of each row
    decoded = decode_pairs(own, negatives.filter(pa.array(keep)), [mined] * own.num_rows,
                           given_negatives=0)
    by_set: dict[str, list[PairRow]] = {}
    for row, dataset in zip(decoded, own.column("dataset").to_pylist(), strict=True):
        by_set.setdefault(dataset, []).append(row)
    interleaved = [row for group in zip(*by_set.values(), strict=False) for row in group]
    if len(interleaved) < pairs:
        raise ValueError(f"{len(interleaved)} balanced pairs < --pairs {pairs}")
    batch = interleaved[:pairs]
    order = np.random.default_rng(seed).permutation(len(batch))
    return [batch[i] for i in order]


STAGE2_MODES = {  # name: (stage2.negatives, gradient cache on)
    "in_batch": ("batch", False),
    "mined": ("both", False),
    "mined_grad_cache": ("both", True),
}


def stage2_spec(args: argparse.Namespace, student: StudentSource, rows: list[PairRow],
                device: torch.device, stage_dir: str, negatives: str,
                chunk: int) -> Stage2Spec:
    config = load_config(str(DEMO_CONFIG), [
        f"stage2.negatives={negatives}", f"stage2.mined_negatives={args.mined}",
        "stage2.given_negatives=0", "train.num_workers=1",
        f"train.grad_cache_chunk_size={chunk}"])
    settings = loop_settings("stage2", stage_dir, config.train, rows=rows,
                             keys=tuple(r.id for r in rows), device=device,
                             sample_unit="items")
    return Stage2Spec(settings, init=student, config=config, probe_rows=[])


def bench_stage2(args: argparse.Namespace, config: Config, student: StudentSource,
                 world: DemoWorldFiles, device: torch.device, tmp: str) -> dict[str, Any]:
    table = mined_table(world, config, mined=args.mined)
    rows = demo_batch(table, pairs=args.pairs, mined=args.mined)
    runs = {}
    for name, (negatives, cached) in STAGE2_MODES.items():
        spec = stage2_spec(args, student, rows, device, f"{tmp}/stage2-{name}", negatives,
                           args.stage2_chunk if cached else 0)
        runs[name] = build_run(spec, rows, device, args.warmup)
    records = alternate(runs, args.stage2_steps)
    precision = runs["mined"].ctx.settings.precision
    params = parameter_split(runs["mined"].engine.module)
    stage2_cfg = runs["mined"].spec.stage2
    images = sum((r.query.image is not None) + (r.positive.image is not None)
                 + sum(n.image is not None for n in r.negatives) for r in rows)
    result: dict[str, Any] = {
        "device": device.type, "torch_threads": args.threads, "world_size": 1,
        "zero_stage": config.train.zero_stage, "precision": precision,
        "model": args.model_name, "params": params, "pairs_per_step": len(rows),
        "datasets": sorted({r.id.split(":")[0] for r in rows}),
        "image_items_with_negatives": images, "mined_negatives": args.mined,
        "given_negatives": 0, "num_hard_negatives": stage2_cfg.num_hard_negatives,
        "lora_vision": stage2_cfg.lora_vision, "prompt_mode": stage2_cfg.prompt_mode,
        "chunk_size": args.stage2_chunk, "timed_steps": args.stage2_steps,
        "warmup_steps": args.warmup}
    for name, mode_records in records.items():
        last = mode_records[-1]
        summary = {"items_per_step": last.samples, "tokens_per_step": last.tokens,
                   "vision_tokens_per_step": last.vision_tokens,
                   **mode_summary(mode_records, {"pairs": len(rows), "items": last.samples})}
        summary.update(flops_summary(
            last, params, step_s=summary["step_s_median"], device=device,
            extra_forward=STAGE2_MODES[name][1], precision=precision,
            peak_tflops=args.peak_tflops))
        summary["hn_num_candidates"] = last.stats.get("hn_num_candidates")
        result[name] = summary
    step = {name: result[name]["step_s_median"] for name in STAGE2_MODES}
    items = {name: result[name]["items_per_step"] for name in STAGE2_MODES}
    result["hard_negative_cost_ratio"] = round(step["mined"] / step["in_batch"], 3)
    result["hard_negative_cost_ratio_per_item"] = round(
        (step["mined"] / items["mined"]) / (step["in_batch"] / items["in_batch"]), 3)
    result["grad_cache_overhead_ratio"] = round(step["mined_grad_cache"] / step["mined"], 3)
    result["hard_negative_cost_ratio_paired"] = paired_ratio(records, "mined", "in_batch")
    result["grad_cache_overhead_ratio_paired"] = paired_ratio(records, "mined_grad_cache",
                                                              "mined")
    del runs
    release(device)
    return result


# -- output ------------------------------------------------------------------------------------------
def print_stage1(r: dict[str, Any]) -> None:
    print(f"stage-1 step, {r['texts_per_step']} texts / {r['tokens_per_step']} tokens, 1 "
          f"process, {r['device']} {r['precision']}:\n"
          f"  plain      {r['plain']['samples_per_s']:8.1f} texts/s "
          f"{r['plain']['tokens_per_s']:10.1f} tokens/s\n"
          f"  grad cache {r['grad_cache']['samples_per_s']:8.1f} texts/s "
          f"{r['grad_cache']['tokens_per_s']:10.1f} tokens/s (chunks of {r['chunk_size']})\n"
          f"  overhead ratio {r['overhead_ratio']:.2f}x, paired {r['overhead_ratio_paired']:.2f}x "
          "(floor ~1.5x: one extra forward)")


def print_stage2(r: dict[str, Any]) -> None:
    print(f"stage-2 step, {r['pairs_per_step']} pairs ({', '.join(r['datasets'])}), "
          f"{r['mined_negatives']} mined negatives, 1 process, {r['device']} {r['precision']}:")
    print(f"  {'mode':<18}{'items':>6}{'tokens':>8}{'step_s':>8}{'pairs/s':>9}{'items/s':>9}"
          f"{'tokens/s':>10}{'MFU':>8}")
    for name in STAGE2_MODES:
        m = r[name]
        mfu = "-" if m.get("mfu") is None else f"{100 * m['mfu']:.3f}%"
        print(f"  {name:<18}{m['items_per_step']:>6}{m['tokens_per_step']:>8}"
              f"{m['step_s_median']:>8.3f}{m['pairs_per_s']:>9.1f}{m['items_per_s']:>9.1f}"
              f"{m['tokens_per_s']:>10.1f}{mfu:>8}")
    print(f"  hard negatives: {r['hard_negative_cost_ratio']:.2f}x the in-batch step per pair "
          f"(paired {r['hard_negative_cost_ratio_paired']:.2f}x; "
          f"{r['hard_negative_cost_ratio_per_item']:.2f}x per item)\n"
          f"  gradient cache (chunks of {r['chunk_size']}): {r['grad_cache_overhead_ratio']:.2f}x "
          f"the plain step (paired {r['grad_cache_overhead_ratio_paired']:.2f}x); padded "
          f"positions {r['mined']['padded_tokens']} plain vs "
          f"{r['mined_grad_cache']['padded_tokens']} in chunks")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=("1", "2", "both"), default="both")
    parser.add_argument("--groups", type=int, default=64, help="stage 1: text groups per step "
                        "(x3 texts)")
    parser.add_argument("--chunk", type=int, default=32, help="stage 1: gradient-cache chunk, "
                        "texts")
    parser.add_argument("--steps", type=int, default=8, help="stage 1: timed steps per mode")
    parser.add_argument("--pairs", type=int, default=32, help="stage 2: pairs per step")
    parser.add_argument("--mined", type=int, default=8, help="stage 2: mined negatives per row")
    parser.add_argument("--stage2-chunk", type=int, default=32, help="stage 2: gradient-cache "
                        "chunk, items")
    parser.add_argument("--stage2-steps", type=int, default=16, help="stage 2: timed steps per "
                        "mode")
    parser.add_argument("--train-images", type=int, default=64, help="demo-world training "
                        "images (= pairs per MMEB-train set)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's peak "
                        "dense bf16 TFLOP/s for MFU (989 = H100 SXM)")
    parser.add_argument("--student", default="", help="an Embedder folder to bench instead "
                        "of the demo's tiny LLaVA-NeXT")
    return parser.parse_args()


def main() -> dict[str, Any]:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    load_start = os.getloadavg()
    start = time.perf_counter()
    init_single_process(device)
    config = load_config(str(DEMO_CONFIG))
    result: dict[str, Any] = {
        "command": " ".join([pathlib.Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "peak_tflops_bf16": args.peak_tflops if device.type == "cuda" else None,
                    "loadavg_start": [round(x, 2) for x in load_start]}}
    with tempfile.TemporaryDirectory(prefix="unime-bench-") as tmp:
        world = generate_demo_world(f"{tmp}/world", num_nli_groups=args.groups,
                                    num_train_images=args.train_images, num_eval_images=4,
                                    num_eval_candidates=2,
                                    image_size_px=config.data.demo.image_size_px)
        groups = demo_groups(world, args.groups)
        if args.student:
            student, args.model_name = StudentSource(args.student, "", False), args.student
        else:
            texts = [t for g in groups for t in g.texts]
            path = build_tiny_model("llava_next", f"{tmp}/student", seed=0, vocab_texts=texts)
            student = StudentSource(path, "llava_next", False)
            args.model_name = "tiny llava_next (2 layers, width 64)"
        if args.stage in ("1", "both"):
            result["stage1"] = bench_stage1(args, config, student, groups, device, tmp)
            print_stage1(result["stage1"])
        if args.stage in ("2", "both"):
            result["stage2"] = bench_stage2(args, config, student, world, device, tmp)
            print_stage2(result["stage2"])
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["machine"]["wall_s"] = round(time.perf_counter() - start, 1)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average {result['machine']['loadavg_start'][0]:.2f} -> "
          f"{result['machine']['loadavg_end'][0]:.2f} on {os.cpu_count()} CPUs; "
          f"{result['machine']['wall_s']:.0f} s; wrote {OUT.relative_to(REPO)}")
    torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
