"""Typed, frozen run configuration: YAML file + dotted ``key=value`` overrides.

A config is a tree of frozen dataclasses. ``load_config`` reads a YAML file, applies
overrides such as ``data.image_size=64`` and validates every value against its type
and bounds, so a bad config fails at start with a message naming the key (and the
allowed values), never an hour into a run.

The resolved config has a stable hash (``config_hash``) over the fields that change
what a run computes; runtime-only fields (Ray address, CPU counts, S3 endpoint) are
left out of it. The run name and the default output prefix derive from that hash,
never from the clock, so a relaunch finds and resumes its own outputs.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key."""


def _knob(default: Any, *, help: str, hashed: bool = True, min: float | None = None,
          max: float | None = None) -> Any:
    """A config field with documentation, bounds and whether it enters the config hash."""
    meta = {"help": help, "hashed": hashed, "min": min, "max": max}
    return field(default=default, metadata=meta)


def _section(cls: type, *, help: str, hashed: bool = True, run_hash: bool = True,
             **defaults: Any) -> Any:
    """A nested section; ``defaults`` override the section class's own defaults (e.g. the
    stage-1 and stage-2 ``optim`` sections share a class but not their learning rate).
    ``hashed=False``: runtime only, in no hash. ``run_hash=False``: it changes its own step's
    outputs (so it is in that step's hash) but not the run's ``config_hash`` and run folder."""
    return field(default_factory=lambda: cls(**defaults),
                 metadata={"help": help, "hashed": hashed, "run_hash": run_hash})


def _use_gpu_knob(what: str) -> Any:
    """``use_gpu`` of a pool of actors or training workers (``what``)."""
    return _knob("auto", hashed=False, help=f"GPU {what}: true = request their GPUs and wait "
                 "for the autoscaler to add them (ray.resource_wait_s), never a CPU fallback; "
                 "auto = GPUs only if the cluster has some now; false = CPUs")


def _gpus_knob(what: str) -> Any:
    """GPUs per actor / worker of a pool that uses GPUs."""
    return _knob(1.0, min=0.01, hashed=False, help=f"GPUs per {what} when use_gpu resolves "
                 "to true (a fraction shares a GPU)")


# ---------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class RayConfig:
    """Where and how Ray runs. Runtime-only: not part of the config hash."""

    address: str = _knob("", hashed=False, help="Ray cluster address; '' = RAY_ADDRESS env "
                         "or a new local instance")
    num_cpus: int = _knob(4, hashed=False, min=1, help="logical CPUs of a new local Ray "
                          "instance (more than physical cores avoids actor-pool starvation)")
    object_store_memory_mb: int = _knob(768, hashed=False, min=128,
                                        help="object store size of a new local instance, MiB")
    resource_wait_s: float = _knob(1800.0, hashed=False, min=0.0, help="how long a pool or "
                                   "training run that needs GPUs (use_gpu=true) waits for the "
                                   "autoscaler to add them before failing with the resource it "
                                   "waited for")
    max_task_retries: int = _knob(2, hashed=False, min=0, max=100, help="retries of a Ray "
                                  "Data task (or actor call) of the pipeline's shard jobs "
                                  "after a system failure (a dead worker or node, an argument "
                                  "that does not deserialise); errors raised by the step's "
                                  "code are not retried: a deterministic failure ends the job "
                                  "with its message instead of retrying for ever")
    start_timeout_s: float = _knob(120.0, hashed=False, min=1.0, help="how long a new local "
                                   "instance may take to start (its GCS and node registration) "
                                   "before the job fails; raise it on a loaded machine. Ray "
                                   "waits at least its own 30 s")
    progress_bars: Literal["auto", True, False] = _knob(
        "auto", hashed=False, help="Ray Data progress bars; auto = only when stderr is a "
        "terminal (a job log or CI keeps its size: a demo run prints ~20 MB of bar updates)")


@dataclass(frozen=True)
class StorageConfig:
    """S3 settings. Credentials never go here: they come from the environment or an
    instance role."""

    s3_endpoint_url: str = _knob("", hashed=False, help="S3-compatible endpoint; '' = "
                                 "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL env or AWS")
    s3_region: str = _knob("", hashed=False, help="S3 region; '' = AWS_DEFAULT_REGION env")
    max_attempts: int = _knob(5, hashed=False, min=1, max=20,
                              help="attempts per storage call on transient errors")
    shared_filesystem: bool = _knob(False, hashed=False, help="a local output_root is on a "
                                    "filesystem every Ray node mounts (NFS, FSx, EFS); without "
                                    "it a local output_root on a cluster of several nodes is "
                                    "refused (the workers cannot see the driver's disk)")


@dataclass(frozen=True)
class DemoConfig:
    """Size of the built-in synthetic world (coloured shapes with captions)."""

    seed: int = _knob(0, help="seed of the world generator")
    num_train_images: int = _knob(300, min=8, help="images behind the stage-2 pairs")
    num_eval_images: int = _knob(80, min=4, help="held-out images behind the eval sets")
    num_nli_groups: int = _knob(1000, min=8, help="stage-1 text groups")
    num_eval_candidates: int = _knob(16, min=2, help="candidates per eval query")
    image_size_px: int = _knob(64, min=8, max=2048, help="side of the generated PNGs")


@dataclass(frozen=True)
class SourcesConfig:
    """Raw inputs (local paths or s3:// URIs). Empty = not used."""

    nli_csv: str = _knob("", help="SimCSE NLI csv with columns sent0,sent1,hard_neg")
    mmeb_train: str = _knob("", help="MMEB-train folder (one .jsonl/.parquet/.csv per "
                            "dataset) or one such file")
    mmeb_train_images: str = _knob("", help="root that MMEB-train image paths are relative "
                                   "to; '' = the folder of mmeb_train")
    mmeb_eval: str = _knob("", help="MMEB-eval folder (one file per dataset) or one file")
    mmeb_eval_images: str = _knob("", help="root of MMEB-eval image paths; '' = folder of "
                                  "mmeb_eval")
    pairs_jsonl: str = _knob("", help="plain JSONL of pairs (id, dataset, qry_text, "
                             "qry_image, pos_text, pos_image, neg_text, neg_image)")
    pairs_images: str = _knob("", help="root of the JSONL image paths; '' = its folder")


@dataclass(frozen=True)
class DataConfig:
    """Sources and how they are turned into canonical shards."""

    use_demo_world: bool = _knob(True, help="generate the built-in demo world and use it "
                                 "as the sources (the sources section is then ignored)")
    demo: DemoConfig = _section(DemoConfig, help="built-in demo world")
    sources: SourcesConfig = _section(SourcesConfig, help="raw inputs")
    image_size: int = _knob(336, min=8, max=4096, help="side, in pixels, images are "
                            "resized to when packed into the shards")
    image_resize: Literal["stretch", "pad"] = _knob(
        "stretch", help="stretch to a square, or keep the aspect ratio and pad")
    image_format: Literal["png", "jpeg"] = _knob("png", help="encoding of packed images")
    jpeg_quality: int = _knob(95, min=1, max=100, help="quality when image_format=jpeg")
    rows_per_shard: int = _knob(2000, min=1, help="rows per output Parquet shard")
    max_text_chars: int = _knob(20000, min=1, help="texts longer than this are rejected")
    max_reject_fraction: float = _knob(0.5, min=0.0, max=1.0, hashed=False, help="a prepared "
                                       "table whose rejected share exceeds this (or with no "
                                       "row out, or no row in) fails the step, naming the top "
                                       "reasons and a rejected row; 1.0 = accept any share")


@dataclass(frozen=True)
class TeacherConfig:
    """The stage-1 teacher and the job that embeds the text groups with it."""

    model: str = _knob("packaged:all-minilm-l6-v2", help="sentence-transformers folder, "
                       "s3:// prefix, or packaged:all-minilm-l6-v2 (the bundled MiniLM)")
    instruction_prefix: str = _knob("", help="prepended to every text (NV-Embed-v2 style)")
    max_seq_length: int = _knob(0, min=0, help="token limit of the teacher; 0 = the "
                                "model's own; longer texts are truncated and counted")
    trust_remote_code: bool = _knob(False, help="run code shipped with the model folder "
                                    "(NV-Embed-v2 needs it); off unless set")
    batch_size: int = _knob(128, min=1, hashed=False, help="texts per forward pass")
    num_actors: int = _knob(0, min=0, hashed=False, help="teacher actors; 0 = one per GPU "
                            "the cluster has (at least one), or (cluster CPUs - 1) / "
                            "cpus_per_actor without GPUs")
    cpus_per_actor: float = _knob(1.0, min=0.1, hashed=False,
                                  help="CPUs (and torch threads) per teacher actor")
    use_gpu: Literal["auto", True, False] = _use_gpu_knob("actors")
    gpus_per_actor: float = _gpus_knob("actor")


@dataclass(frozen=True)
class MiningConfig:
    """Offline hard-negative mining over the stage-2 pairs (README: offline hard-negative mining)."""

    miner: str = _knob("stage1", help="model that embeds queries and targets: 'stage1' = "
                       "<run_root>/stage1/model, or an Embedder folder / s3:// prefix")
    miner_trust_remote_code: bool = _knob(False, help="run code shipped with the miner "
                                          "folder (phi3_v needs it)")
    prompt_mode: Literal["instruction", "one_word", "raw"] = _knob(
        "instruction", help="how texts are wrapped for the miner (stage 2 uses instruction)")
    scope: Literal["dataset", "global"] = _knob("dataset", help="search negatives within "
                                                "each dataset (same task) or globally")
    backend: Literal["auto", "faiss", "faiss_gpu", "torch"] = _knob(
        "auto", help="exact search backend; auto = faiss_gpu with a GPU, else faiss")
    search_k: int = _knob(64, min=1, help="candidates retrieved per query before filtering")
    num_negatives: int = _knob(8, min=1, help="hard negatives kept per query (k)")
    fn_margin: float | None = _knob(0.1, help="drop candidates with sim > pos_sim + margin "
                                    "(UniME beta); null = off")
    fn_ratio: float | None = _knob(None, help="drop candidates with sim > ratio * pos_sim "
                                   "(positive-aware, e.g. 0.95); null = off")
    max_score: float | None = _knob(None, help="drop candidates with sim > max_score; "
                                    "null = off")
    unique_negatives: bool = _knob(True, help="one negative per distinct target content")
    selection: Literal["top", "range"] = _knob("top", help="top-k of the survivors, or k "
                                               "sampled from ranks [range_min, range_max)")
    range_min: int = _knob(0, min=0, help="first survivor rank for selection=range")
    range_max: int = _knob(0, min=0, help="end survivor rank for selection=range; 0 = all")
    index: Literal["flat", "ivf"] = _knob("flat", help="exact search, or IVF for corpora too "
                                          "large for it (recall is measured)")
    ivf_nlist: int = _knob(256, min=1, help="IVF lists")
    ivf_nprobe: int = _knob(16, min=1, help="IVF lists probed per query")
    recall_sample: int = _knob(1000, min=1, help="queries whose IVF recall vs exact search "
                               "is measured and written to the manifest")
    block_size: int = _knob(65536, min=1, hashed=False, help="candidates per search block")
    query_block_size: int = _knob(4096, min=1, hashed=False, help="queries per search block")
    embed_batch_size: int = _knob(32, min=1, hashed=False, help="rows per miner forward")
    num_actors: int = _knob(0, min=0, hashed=False, help="miner actors; 0 = one per GPU "
                            "the cluster has (at least one), or (cluster CPUs - 1) / "
                            "cpus_per_actor")
    cpus_per_actor: float = _knob(1.0, min=0.1, hashed=False, help="CPUs per miner actor "
                                  "and per search task")
    use_gpu: Literal["auto", True, False] = _use_gpu_knob("miner actors and search tasks "
                                                          "(with a GPU backend)")
    gpus_per_actor: float = _gpus_knob("actor")
    seed: int = _knob(0, help="seed of selection=range sampling")


@dataclass(frozen=True)
class ModelConfig:
    """The student MLLM that the training stages turn into an embedding model."""

    path: str = _knob("tiny:llava_next", help="student backbone: a local folder, an s3:// "
                      "prefix, or tiny:<family> = a random-weight tiny model of that family "
                      "built once under <run_root>/models/tiny-<family> (tests, the demo)")
    family: Literal["", "llava_next", "qwen2_vl", "qwen2_5_vl", "phi3_v"] = _knob(
        "", help="backbone family; '' = from the folder (unime_backbone.json or config.json "
        "model_type) or from tiny:<family>")
    trust_remote_code: bool = _knob(False, help="run Python code shipped with the checkpoint "
                                    "(Phi-3.5-V has no other way to load); off unless set")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _knob(
        "auto", help="dtype of the exported merged model (<stage>/model); auto = the "
        "training precision (float32 for fp32, bfloat16 for bf16, float16 for fp16)")


@dataclass(frozen=True)
class TrainConfig:
    """Ray Train + DeepSpeed settings shared by both training stages."""

    num_workers: int = _knob(2, min=1, hashed=False, help="Ray Train workers (data-parallel "
                             "ranks). Each takes an equal slice of every global batch and the "
                             "loss is computed on the gathered global batch, so the math does "
                             "not depend on it (not hashed); resume with the same number")
    use_gpu: Literal["auto", True, False] = _use_gpu_knob("workers")
    gpus_per_worker: float = _gpus_knob("worker")
    accelerator_type: str = _knob("", hashed=False, help="keep a training run on one GPU "
                                  "kind, e.g. A100 or H100 (Ray's accelerator_type:<kind> "
                                  "node resource); '' = any GPU")
    cpus_per_worker: float = _knob(1.0, min=0.1, hashed=False, help="CPUs reserved per "
                                   "worker (also its torch threads on CPU)")
    zero_stage: int = _knob(2, min=0, max=3, help="DeepSpeed ZeRO stage: 2 partitions "
                            "optimizer state and gradients; 3 also the parameters (the model "
                            "is then loaded under HfDeepSpeedConfig)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _knob(
        "auto", help="training precision; auto = bf16 on GPU, fp32 on CPU")
    grad_cache_chunk_size: int = _knob(0, min=0, hashed=False, help="rows per forward of "
                                       "the gradient cache; 0 = one plain forward/backward "
                                       "over the worker's whole local batch (same gradient, "
                                       "tested; only memory and speed change)")
    grad_cache_reduce_once: bool = _knob(True, hashed=False, help="one gradient reduction "
                                         "per step instead of one per chunk (needs "
                                         "zero_stage >= 1; holds the full LoRA gradients)")
    gradient_checkpointing: bool = _knob(False, hashed=False, help="activation "
                                         "checkpointing (not the training checkpoints below): "
                                         "the language model and vision tower keep only each "
                                         "layer's input and recompute the rest in the backward "
                                         "pass (non-reentrant): about one extra forward, far "
                                         "less memory; same gradient, tested (a 7B student's "
                                         "chunk of 32 image rows needs it on a 40 GB GPU)")
    checkpoint_every_steps: int = _knob(100, min=1, hashed=False, help="checkpoint (DeepSpeed "
                                        "state + data position) every N steps and at the end")
    checkpoints_to_keep: int = _knob(2, min=1, hashed=False, help="latest checkpoints kept "
                                     "in storage")
    max_failures: int = _knob(1, min=-1, hashed=False, help="restarts of the worker group "
                              "from the latest checkpoint after a failure; -1 = unlimited")
    log_every_steps: int = _knob(10, min=1, hashed=False, help="progress line and metrics "
                                 "flush every N steps (rank 0)")
    seed: int = _knob(0, help="seed of the data order, LoRA init, dropout and tiny students")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (one such section per training stage)."""

    lr: float = _knob(1e-4, min=1e-9, help="peak learning rate of AdamW (paper: stage 1 5e-4; "
                      "stage 2 1e-4 Phi-3.5-V, 2e-5 LLaVA-1.6)")
    warmup_ratio: float = _knob(0.05, min=0.0, max=1.0, help="share of the scheduled steps "
                                "spent warming up linearly to lr (rounded up)")
    schedule: Literal["linear", "cosine", "constant"] = _knob(
        "linear", help="decay after warm-up, over all scheduled steps")
    weight_decay: float = _knob(0.0, min=0.0, help="AdamW weight decay")
    max_grad_norm: float = _knob(1.0, min=0.0, help="gradient clipping by global norm; 0 = off")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters of a training stage (one such section per stage)."""

    rank: int = _knob(16, min=1, help="LoRA rank (paper: 32 in stage 1, 4..64 within 0.4 "
                      "points; 16 in stage 2)")
    alpha: int = _knob(32, min=1, help="LoRA alpha (scale = alpha / rank); open")
    dropout: float = _knob(0.05, min=0.0, max=0.9, help="dropout on the LoRA input; open")


@dataclass(frozen=True)
class Stage1Config:
    """Stage 1: textual discriminative knowledge distillation (LoRA on the language model)."""

    lora: LoraConfig = _section(LoraConfig, help="LoRA on the language model (paper: r 32)",
                                rank=32, alpha=64)
    optim: OptimConfig = _section(OptimConfig, help="AdamW and its schedule over epochs x "
                                  "steps per epoch (paper: lr 5e-4)", lr=5e-4)
    epochs: int = _knob(2, min=1, help="passes over the text groups")
    max_steps: int = _knob(0, min=0, hashed=False, help="stop after this many optimizer "
                           "steps (0 = all). Not hashed and not part of the LR schedule: a "
                           "run stopped early resumes on the same schedule")
    global_batch_groups: int = _knob(256, min=1, help="text groups per optimizer step over "
                                     "all workers (256 NLI groups = 768 texts, the paper's "
                                     "batch); a multiple of train.num_workers")
    temperature: float = _knob(0.05, min=1e-4, help="softmax temperature of both "
                               "similarity distributions (tau)")
    kl_direction: Literal["student||teacher", "teacher||student"] = _knob(
        "student||teacher", help="KL(P_s || P_t) as printed in the paper, or KL(P_t || P_s)")
    mask_self: bool = _knob(True, help="leave each text's self-similarity out of its "
                            "distribution")
    reduction: Literal["sum", "mean", "batchmean"] = _knob(
        "sum", help="over the rows of the global batch: sum (the paper) or mean")


@dataclass(frozen=True)
class Stage2Config:
    """Stage 2: hard-negative enhanced instruction tuning (LoRA over the whole MLLM)."""

    init: str = _knob("stage1", help="starting model: stage1 = <run_root>/stage1/model (the "
                      "merged stage-1 model, the paper), student = model.path (stage 2 only), "
                      "or an Embedder folder / s3:// prefix")
    lora: LoraConfig = _section(LoraConfig, help="fresh LoRA over the merged starting model "
                                "(paper: r 16)", rank=16, alpha=32)
    lora_vision: bool = _knob(True, help="LoRA on the vision tower and projector too (the "
                              "paper: the whole MLLM); false = language model only, vision "
                              "frozen")
    optim: OptimConfig = _section(OptimConfig, help="AdamW and its schedule over stage2.steps "
                                  "(paper: lr 1e-4 Phi-3.5-V, 2e-5 LLaVA-1.6)", lr=1e-4)
    steps: int = _knob(1000, min=0, help="scheduled optimizer steps (paper: 1000); the pairs "
                       "are visited epoch after epoch in a fresh order as long as needed; "
                       "0 = stage2.epochs full passes")
    epochs: int = _knob(1, min=1, help="passes over the pairs when stage2.steps = 0")
    max_steps: int = _knob(0, min=0, hashed=False, help="stop after this many optimizer "
                           "steps (0 = all scheduled). Not hashed and not part of the LR "
                           "schedule: a run stopped early resumes on the same schedule")
    global_batch_pairs: int = _knob(1024, min=2, help="query-positive pairs per optimizer "
                                    "step over all workers (paper: 1024 with GradCache); a "
                                    "multiple of train.num_workers")
    batching: Literal["mixed", "per_dataset"] = _knob(
        "mixed", help="what a global batch holds: mixed = pairs of every dataset shuffled "
        "together; per_dataset = each global batch from one dataset (batches of all datasets "
        "shuffled together), so in-batch negatives share the query's task and cannot be told "
        "apart by the instruction alone. Every dataset needs >= global_batch_pairs pairs")
    negatives: Literal["both", "batch", "mined"] = _knob(
        "both", help="hard-negative candidates of a query: the targets of the global batch "
        "(batch, the paper), the row's mined and given negatives (mined), or both")
    mode: Literal["hard_negative", "full_batch"] = _knob(
        "hard_negative", help="hard_negative = UniME (filter + top-k); full_batch = the "
        "VLM2Vec-style InfoNCE over every candidate (baseline for ablations)")
    infonce_warmup_steps: int = _knob(0, min=0, help="first steps trained with mode "
                                      "full_batch before the hard-negative loss takes over "
                                      "(0 = off, the paper). Hard negatives need a model that "
                                      "already discriminates: from a weak start they collapse "
                                      "every embedding onto one point (loss ln(k+1))")
    infonce_warmup_negatives: Literal["same", "batch", "mined", "both"] = _knob(
        "same", help="candidates during the InfoNCE warm-up: same = stage2.negatives; batch "
        "= the batch's targets only, which also skips embedding the carried negatives (the "
        "demo's steps take about half the time: its t2i rows carry negative images)")
    num_hard_negatives: int = _knob(8, min=1, help="k hard negatives per query (paper: 8)")
    mined_negatives: int = _knob(8, min=0, help="mined negatives carried per row from the "
                                 "mine_negatives table (the first ones, best first)")
    given_negatives: int = _knob(1, min=0, help="negatives given by the data (MMEB-train "
                                 "neg_text / neg_image) carried per row")
    temperature: float = _knob(0.02, min=1e-4, help="softmax temperature tau (paper: 0.02)")
    fn_margin: float | None = _knob(0.1, help="drop candidates with sim > pos_sim + margin "
                                    "(UniME beta = 0.1); null = off")
    fn_ratio: float | None = _knob(None, help="drop candidates with sim > ratio * pos_sim "
                                   "(positive-aware, e.g. 0.95); null = off")
    prompt_mode: Literal["instruction", "one_word", "raw"] = _knob(
        "instruction", help="how query and target texts are wrapped (the paper: task "
        "instructions, VLM2Vec style)")


@dataclass(frozen=True)
class ExportConfig:
    """The export step: a merged Hugging Face folder with a model card."""

    source: str = _knob("stage2", help="model to export: stage2 / stage1 (<run_root>/<stage>"
                        "/model) or an Embedder folder / s3:// prefix")
    destination: str = _knob("", help="where the exported folder goes; '' = "
                             "<run_root>/export/model")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _knob(
        "auto", help="dtype of the exported weights; auto = as the source folder stores them")
    base_model: str = _knob("", help="card metadata base_model: the Hugging Face Hub id of the "
                            "student backbone (e.g. Qwen/Qwen2-VL-2B-Instruct); '' = model.path "
                            "(set the hub id before publishing)")
    license: str = _knob("other", help="card metadata license: the base model's license id "
                         "(apache-2.0, mit, ...); other = unknown, check before publishing")
    datasets: tuple[str, ...] = _knob((), help="card metadata datasets: Hub ids of the "
                                      "training data (e.g. TIGER-Lab/MMEB-train)")


@dataclass(frozen=True)
class EvalConfig:
    """The evaluate step. Not part of the run's config hash (evaluating another way must not
    move or retrain the run): the step hashes these settings itself (``eval_hash``)."""

    models: tuple[str, ...] = _knob(
        ("base=student", "stage1", "stage2"), help="models to evaluate, 'label=path' or a "
        "special value: student (model.path), stage1 / stage2 (<run_root>/<stage>/model); "
        "a path is a local folder or s3:// prefix that Embedder.from_pretrained loads")
    prompt_mode: Literal["instruction", "one_word", "raw"] = _knob(
        "instruction", help="prompt mode of the MMEB-format sets (texts carry their task "
                            "instructions as stored)")
    caption_prompt_mode: Literal["instruction", "one_word", "raw"] = _knob(
        "one_word", help="prompt mode of the caption sets (SugarCrepe, retrieval): one_word = "
        "E5-V prompts; instruction = VLM2Vec image/caption instructions")
    mmeb: bool = _knob(True, help="evaluate the prepared MMEB-format eval table when present")
    sugarcrepe: str = _knob("", help="folder of SugarCrepe <category>.json files; '' = the demo "
                            "world's when data.use_demo_world, else skipped; 'off' = skip")
    sugarcrepe_images: str = _knob("", help="root of the SugarCrepe image filenames; '' = the "
                                   "demo world root (demo) or the sugarcrepe folder")
    retrieval_json: str = _knob("", help="Karpathy-style caption file (Flickr30K / COCO / "
                                "long captions); '' = the demo world's when "
                                "data.use_demo_world, else skipped; 'off' = skip")
    retrieval_images: str = _knob("", help="root of its image paths (filepath/filename); '' "
                                  "= the demo world root (demo) or the JSON's folder")
    retrieval_split: str = _knob("test", help="Karpathy split to evaluate; '' = every image")
    retrieval_ks: tuple[int, ...] = _knob((1, 5, 10), help="K of the Recall@K metrics")
    extra_metatasks: tuple[str, ...] = _knob((), help="'dataset=metatask' for MMEB-format "
                                             "datasets outside MMEB's 36 and the demo's")
    batch_size: int = _knob(16, min=1, hashed=False, help="rows per Embedder forward")
    items_per_task: int = _knob(1024, min=1, hashed=False, help="distinct items per Ray Data "
                                "task (one embedding shard each)")
    num_actors: int = _knob(0, min=0, hashed=False, help="Embedder actors; 0 = one per GPU "
                            "the cluster has (at least one), or (cluster CPUs - 1) / "
                            "cpus_per_actor")
    cpus_per_actor: float = _knob(1.0, min=0.1, hashed=False, help="CPUs (and torch threads) "
                                  "per Embedder actor")
    use_gpu: Literal["auto", True, False] = _use_gpu_knob("actors")
    gpus_per_actor: float = _gpus_knob("actor")


@dataclass(frozen=True)
class Config:
    """The whole run."""

    name: str = _knob("run", help="human part of the run name; the hash is appended")
    output_root: str = _knob("", hashed=False, help="local path or s3:// URI of the run "
                             "folder; '' = ./runs/<run_name>")
    log_level: Literal["DEBUG", "INFO", "WARNING"] = _knob("INFO", hashed=False,
                                                           help="logging level")
    ablation: bool = _knob(False, hashed=False, help="run_all also trains the ablation "
                           "variants of stage 2 (stage 2 only; no hard negatives; in-batch "
                           "hard negatives only) under <run_root>/ablation and evaluates them")
    ray: RayConfig = _section(RayConfig, help="Ray runtime", hashed=False)
    storage: StorageConfig = _section(StorageConfig, help="S3 settings", hashed=False)
    data: DataConfig = _section(DataConfig, help="data preparation")
    teacher: TeacherConfig = _section(TeacherConfig, help="stage-1 teacher embeddings")
    mining: MiningConfig = _section(MiningConfig, help="offline hard-negative mining")
    model: ModelConfig = _section(ModelConfig, help="the student MLLM")
    train: TrainConfig = _section(TrainConfig, help="Ray Train + DeepSpeed, both stages")
    stage1: Stage1Config = _section(Stage1Config, help="stage 1: textual distillation")
    stage2: Stage2Config = _section(Stage2Config, help="stage 2: hard-negative instruction "
                                    "tuning")
    export: ExportConfig = _section(ExportConfig, help="the export step", run_hash=False)
    eval: EvalConfig = _section(EvalConfig, help="the evaluate step", run_hash=False)

    # -- derived ------------------------------------------------------------------------
    @property
    def config_hash(self) -> str:
        """sha256 of the hashed fields, canonical JSON; stable across processes."""
        payload = json.dumps(_hashed_dict(self, run=True), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def run_name(self) -> str:
        """``<name>-<first 10 hex digits of the config hash>``."""
        return f"{self.name}-{self.config_hash[:10]}"

    @property
    def run_root(self) -> str:
        """The run folder: ``output_root`` or ``./runs/<run_name>``."""
        return self.output_root.rstrip("/") if self.output_root else f"runs/{self.run_name}"

    def step_dir(self, step: str) -> str:
        """Output folder of one step, e.g. ``<run_root>/prepare_data``."""
        return f"{self.run_root}/{step}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------
# Loading and validation


def read_yaml_mapping(path: str, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds (empty file: {}); ConfigError names ``what`` and the
    path when it is missing, not YAML or not a mapping at the top level."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"{what} not found: {path}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path} must hold a mapping at the top level")
    return raw


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()
                ) -> Config:
    """Config from a YAML file (or the defaults when ``path`` is None) plus overrides.

    Overrides are ``dotted.key=value`` strings; values are parsed as YAML scalars
    (``data.image_size=64``, ``data.use_demo_world=false``, ``output_root=s3://b/x``).
    Keys of an older layout (:data:`RENAMED_KEYS`) are moved to their new place with a
    warning. Every value is checked alone (type, bounds, allowed values) and then against
    the others (:func:`validate`); the first problem raises :class:`ConfigError`.
    """
    raw = read_yaml_mapping(path, "config file") if path is not None else {}
    for item in overrides:
        _apply_override(raw, item)
    _move_renamed_keys(raw)
    return validate(build(Config, raw, prefix=""))


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like dotted.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


# Keys of the earlier flat layout -> their place now (both stages share the optim and lora
# sections). An old key still works, with a warning; giving both is an error.
RENAMED_KEYS: dict[str, str] = {
    f"{stage}.{old}": f"{stage}.{new}"
    for stage in ("stage1", "stage2")
    for old, new in (("lora_rank", "lora.rank"), ("lora_alpha", "lora.alpha"),
                     ("lora_dropout", "lora.dropout"), ("lr", "optim.lr"),
                     ("warmup_ratio", "optim.warmup_ratio"), ("schedule", "optim.schedule"),
                     ("weight_decay", "optim.weight_decay"),
                     ("max_grad_norm", "optim.max_grad_norm"))
}


def _move_renamed_keys(raw: dict[str, Any]) -> None:
    """Move keys of :data:`RENAMED_KEYS` in ``raw`` (YAML + overrides) to their new place."""
    for old, new in RENAMED_KEYS.items():
        section, leaf = old.split(".")
        node = raw.get(section)
        if not isinstance(node, dict) or leaf not in node:
            continue
        group, new_leaf = new.split(".")[1:]
        target = node.setdefault(group, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{section}.{group}: expected a mapping, got {target!r}")
        if new_leaf in target:
            raise ConfigError(f"both {old} and {new} are set; {old} is the old name of {new}: "
                              "keep only the new one")
        target[new_leaf] = node.pop(leaf)
        logger.warning("config key %s is now %s (the old name still works)", old, new)


def build(cls: type, raw: Any, *, prefix: str, base: Any = None) -> Any:
    """Build dataclass ``cls`` from a mapping, validating every key and value; keys not
    in the mapping keep their value in ``base`` (default: ``cls()``)."""
    where = prefix.rstrip(".") or "<top level>"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{prefix}{key}'{hint}; allowed keys in "
                          f"{where}: {', '.join(sorted(fields))}")
    base = cls() if base is None else base
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, f"{prefix}{name}", fields[name].metadata,
                               getattr(base, name))
    return dataclasses.replace(base, **values)


def _coerce(hint: Any, value: Any, key: str, meta: Any, current: Any = None) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, prefix=f"{key}.", base=current)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if not any(value == a and type(value) is type(a) for a in allowed):  # 1 is not True
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: "
                              f"{', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key, meta)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_hint, _ellipsis) = typing.get_args(hint)
        return tuple(_coerce(item_hint, v, f"{key}[{i}]", {}) for i, v in enumerate(value))
    return _check_scalar(hint, value, key, meta)


def _check_scalar(hint: type, value: Any, key: str, meta: Any) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif hint is float:
        value = _as_float(value, key)
        if not math.isfinite(value):  # a NaN passes every bound check and compares False
            raise ConfigError(f"{key}={value}: not a finite number")
    elif hint is str:
        if isinstance(value, bool) or value is None or isinstance(value, dict | list):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        value = str(value)
    else:  # pragma: no cover - a new field type needs handling here
        raise TypeError(f"{key}: unsupported config type {hint!r}")
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low:
        raise ConfigError(f"{key}: {value!r} is below the minimum {low}")
    if high is not None and value > high:
        raise ConfigError(f"{key}: {value!r} is above the maximum {high}")
    return value


def _as_float(value: Any, key: str) -> float:
    """A number; also numeric strings such as '1e-3', which YAML 1.1 reads as text."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    return float(value)


def validate(config: Config) -> Config:
    """Rules between fields (each value is fine alone, not with the other): the first one
    broken raises :class:`ConfigError` naming both keys. Returns ``config``.

    Checks that need a library's knowledge (backbone families, the FAISS GPU limit) are the
    steps' own ``check(config)``; both run before Ray starts (``pipeline.steps``)."""
    for problem in _cross_field_problems(config):
        raise ConfigError(problem)
    return config


def _cross_field_problems(config: Config) -> typing.Iterator[str]:
    mining, stage2, train = config.mining, config.stage2, config.train
    if mining.search_k < mining.num_negatives:
        yield (f"mining.search_k={mining.search_k} is below mining.num_negatives="
               f"{mining.num_negatives}: too few candidates to choose from")
    if mining.selection == "range" and mining.range_max and mining.range_max <= mining.range_min:
        yield (f"mining.range_max={mining.range_max} must exceed mining.range_min="
               f"{mining.range_min}")
    if mining.index == "ivf" and mining.backend == "torch":
        yield "mining.index=ivf needs a faiss mining.backend (auto, faiss, faiss_gpu), not torch"
    if mining.index == "ivf" and mining.ivf_nprobe > mining.ivf_nlist:
        yield (f"mining.ivf_nprobe={mining.ivf_nprobe} is more than mining.ivf_nlist="
               f"{mining.ivf_nlist} lists")
    for key, ratio in (("mining.fn_ratio", mining.fn_ratio), ("stage2.fn_ratio", stage2.fn_ratio)):
        if ratio is not None and ratio <= 0:
            yield f"{key}={ratio} must be > 0 (or null)"
    for key, size in (("stage1.global_batch_groups", config.stage1.global_batch_groups),
                      ("stage2.global_batch_pairs", stage2.global_batch_pairs)):
        if size % train.num_workers:
            yield f"{key}={size} is not a multiple of train.num_workers={train.num_workers}"
    if train.grad_cache_chunk_size and train.grad_cache_reduce_once and train.zero_stage == 0:
        yield "train.grad_cache_reduce_once needs train.zero_stage >= 1"
    if train.accelerator_type and train.use_gpu is False:
        yield (f"train.accelerator_type={train.accelerator_type} asks for a GPU kind but "
               "train.use_gpu=false")
    if train.precision in ("bf16", "fp16") and train.use_gpu is False:
        yield (f"train.precision={train.precision} needs GPUs but train.use_gpu=false; use "
               "fp32 (or auto)")
    yield from _stage2_negative_problems(config)
    if not stage2.init:
        yield "stage2.init is empty: use stage1, student or a model folder"
    if not config.export.source.strip():
        yield "export.source is empty: use stage2, stage1 or a model folder"
    if not config.eval.retrieval_ks or min(config.eval.retrieval_ks) < 1:
        yield f"eval.retrieval_ks: need K >= 1, got {list(config.eval.retrieval_ks)}"
    yield from _model_location_problems(config)


def _stage2_negative_problems(config: Config) -> typing.Iterator[str]:
    stage2 = config.stage2
    carried = stage2.mined_negatives + stage2.given_negatives
    uses = {("negatives", stage2.negatives),
            ("infonce_warmup_negatives", stage2.infonce_warmup_negatives)}
    for key, negatives in sorted(uses):
        if negatives in ("mined", "both") and carried == 0:
            yield (f"stage2.{key}={negatives} needs stage2.mined_negatives or "
                   "stage2.given_negatives > 0")
    if stage2.mined_negatives > config.mining.num_negatives:
        yield (f"stage2.mined_negatives={stage2.mined_negatives} is more than the "
               f"mining.num_negatives={config.mining.num_negatives} the mined table holds per "
               "pair")


_URI_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
TINY_PREFIX = "tiny:"


def _model_location_problems(config: Config) -> typing.Iterator[str]:
    """Model locations of a form nothing loads: ``tiny:`` with an unknown family, an s3://
    URI without a bucket, another URI scheme. Whether a local folder exists is checked
    before Ray starts by the steps that load it (``pipeline.cli.check_model_path``)."""
    path = config.model.path
    families = [f for f in typing.get_args(typing.get_type_hints(ModelConfig)["family"]) if f]
    if path.startswith(TINY_PREFIX):
        if path[len(TINY_PREFIX):] not in families:
            yield (f"model.path={path}: unknown family {path[len(TINY_PREFIX):]!r}; "
                   f"tiny:<family> takes one of {', '.join(families)}")
    elif problem := uri_form_problem(path):
        yield f"model.path={path}: {problem}"
    if problem := uri_form_problem(config.mining.miner):
        yield f"mining.miner={config.mining.miner}: {problem}"
    for entry in config.eval.models:
        if problem := uri_form_problem(entry.partition("=")[2].strip() or entry.strip()):
            yield f"eval.models entry {entry!r}: {problem}"


def uri_form_problem(uri: str) -> str | None:
    """Why ``uri`` is neither a local path nor an ``s3://bucket/prefix`` URI; None if it is."""
    match = _URI_SCHEME_RE.match(uri)
    if match is None or match.group(1) == "file":
        return None
    if match.group(1) != "s3":
        return (f"unsupported URI scheme {match.group(1)!r} (use a local folder or "
                "s3://BUCKET/prefix)")
    rest = uri[len("s3://"):]
    if not rest.strip("/") or rest.startswith("/"):
        return "an s3:// URI needs a bucket: s3://BUCKET/prefix"
    return None


def _hashed_dict(obj: Any, *, run: bool = False) -> dict[str, Any]:
    """The fields of a section that change outputs (``hashed``), recursively; with ``run``
    also without the sections that only their own step hashes (``run_hash=False``)."""
    out = {}
    for f in dataclasses.fields(obj):
        if not f.metadata.get("hashed", True) or (run and not f.metadata.get("run_hash", True)):
            continue
        value = getattr(obj, f.name)
        out[f.name] = _hashed_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def hashed_value(config: Config, key: str) -> Any:
    """The value of a dotted key or section as it enters a step's hash: a section as the
    dict of its hashed fields, a runtime-only key as None."""
    value: Any = config
    owner: Any = None
    for part in key.split("."):
        owner, value = value, getattr(value, part)
    declared = next(f for f in dataclasses.fields(owner) if f.name == key.rsplit(".", 1)[-1])
    if not declared.metadata.get("hashed", True):
        return None
    return _hashed_dict(value) if dataclasses.is_dataclass(value) else value


def iter_fields(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    """Every leaf field as (dotted key, dataclasses.Field); used by docs and tests."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def describe(config: Config) -> str:
    """The resolved config as YAML, for logs and manifests."""
    header = f"# run {config.run_name} (config_hash {config.config_hash[:16]})\n"
    return header + yaml.safe_dump(config.to_dict(), sort_keys=False)


def describe_knobs(config: Config | None = None) -> str:
    """Every knob, one per line: ``key = value`` (``config``'s, else the default), its type or
    allowed values, bounds, whether it enters the hashes, and its help text."""
    config = config or Config()
    lines = []
    for key, f in iter_fields():
        value: Any = config
        for part in key.split("."):
            value = getattr(value, part)
        hint = typing.get_type_hints(_owner_class(key))[key.rsplit(".", 1)[-1]]
        kind = (" | ".join(map(str, typing.get_args(hint))) if typing.get_origin(hint) is Literal
                else getattr(hint, "__name__", str(hint).replace("typing.", "")))
        bounds = "".join(f" {name} {f.metadata[name]}" for name in ("min", "max")
                         if f.metadata.get(name) is not None)
        runtime = "" if _is_hashed(key) else " [runtime: not hashed]"
        lines.append(f"{key} = {json.dumps(value, default=list)}  ({kind}{bounds}){runtime}\n"
                     f"    {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _owner_class(key: str) -> type:
    """The dataclass that declares the leaf of a dotted key."""
    cls: type = Config
    for part in key.split(".")[:-1]:
        cls = typing.get_type_hints(cls)[part]
    return cls


def _is_hashed(key: str) -> bool:
    """False if the key or one of its sections is marked runtime-only (in no hash)."""
    cls: type = Config
    for part in key.split("."):
        f = next(f for f in dataclasses.fields(cls) if f.name == part)
        if not f.metadata.get("hashed", True):
            return False
        cls = typing.get_type_hints(cls)[part]
    return True
