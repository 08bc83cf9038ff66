"""The Ray Train worker loop shared by both training stages.

Plug-in
-------
A stage is a :class:`StageSpec`: it builds the model (an ``Embedder`` with LoRA; the
parameters with ``requires_grad`` train), decodes rows of its input table, turns the rows
of one rank's slice of a global batch into a :class:`StepBatch` (chunks of model inputs,
the embed function, the loss over the *gathered global* embeddings, sample and token
counts), says which parts are frozen, and exports its outputs at the end. The loop owns
everything else, once for both stages: ``TorchTrainer`` + ``ScalingConfig``, DeepSpeed
(ZeRO-2/3, precision, AdamW, warm-up + decay, clipping), the gradient cache, the data
order, checkpoint/resume, frozen-weight guards and rank-0 metrics. Stage 1 is
:class:`pipeline.train.stage1.Stage1Spec`; stage 2 plugs in its pairs, instruction
prompts and hard-negative loss the same way.

Data split (determinism) and the data path
-------------------------------------------
The driver passes the sorted list of row keys (group ids, unique: the data layer rejects
duplicates) and a :class:`pipeline.train.rows.RowSource` (where each row and the rows it
refers to live: shard and row). No Ray Dataset is involved:

- epoch ``e`` visits the keys in the order ``permutation(seed, e)``; global batch ``b`` is
  positions ``[b*G, (b+1)*G)`` of that order and rank ``r`` takes the ``r``-th of ``W``
  equal consecutive slices of it (``G % W == 0``; the last partial batch is dropped);
- at the start of an epoch (or of a resumed launch) the ranks exchange the rows of the
  steps still to run (:func:`pipeline.train.rows.exchange_epoch`): each reads about 1/W of
  the shards and receives its own slices' rows (and their referred rows) as Arrow tables;
- a background thread decodes each step's rows and runs the processor and tokeniser up to
  ``PREFETCH_STEPS`` steps ahead (pinned memory on GPU); the collectives of a step (the
  gathered teacher vectors or item layout) run inside its loss, on the training thread;
- the data position is the global step: ``divmod(step, steps_per_epoch)`` gives the epoch
  and the batch, so a checkpoint resumes mid-epoch exactly.

The global batch (and its order after the gather) does not depend on ``W``: the number of
workers changes who computes which rows, not the loss. All ranks must run the same
number of steps (a rank that stops early leaves the others hanging in a collective):
:func:`steps_per_rank` checks the counts of complete local batches gathered from every
rank and fails fast with a clear error.

Randomness: a stage seeds its LoRA init with ``seed`` alone (identical on every rank and
ZeRO stage); dropout uses the generator seeded by (seed, step, rank) at every step, so a
resumed step draws the same masks.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from pipeline import outputs, storage
from pipeline.config import Config, OptimConfig, TrainConfig
from pipeline.train import checkpoint as ckpt
from pipeline.train.metrics import MetricsLogger
from pipeline.train.rows import prefetched

logger = logging.getLogger(__name__)

SUMMARY_FILE = "train_summary.json"
PREFETCH_STEPS = 2  # steps whose inputs are prepared ahead of the training step
SCHEDULES = ("linear", "cosine", "constant")
EXPORT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class StepMismatchError(RuntimeError):
    """Ranks would run different numbers of steps (and hang in a collective)."""


# -- settings ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """Everything the worker loop needs besides the stage itself (built on the driver)."""

    stage: str                    # e.g. "stage1"; also the metrics prefix
    stage_dir: str                # absolute URI of the stage's output folder
    train: TrainConfig
    optim: OptimConfig            # the stage's AdamW and LR schedule knobs
    global_batch_rows: int        # rows (e.g. text groups) per optimizer step, all ranks
    row_keys: tuple[str, ...]     # sorted keys of every input row
    precision: str                # resolved: fp32 | bf16 | fp16
    use_gpu: bool
    log_level: str = "INFO"
    source: Any = None            # rows.RowSource: where each key's row (and refs) live
    sample_unit: str = "samples"  # what samples/s counts, e.g. "texts"
    row_groups: tuple[int, ...] = ()  # per row key: its group (e.g. dataset); () = one group
    epochs: int = 1               # passes over the rows when scheduled_steps is 0
    max_steps: int = 0            # stop this launch after this step (0 = the whole schedule)
    scheduled_steps: int = 0      # the schedule's horizon; 0 = epochs x steps per epoch

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.row_keys), self.global_batch_rows,
                               self.train.num_workers, groups=self.row_groups)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s visiting order (see :func:`epoch_order`)."""
        return epoch_order(len(self.row_keys), self.train.seed, epoch, groups=self.row_groups,
                           global_batch_rows=self.global_batch_rows)

    @property
    def total_steps(self) -> int:
        """The LR schedule's horizon: ``scheduled_steps``, else every epoch (``max_steps``
        does not change it). Steps past the end of an epoch start the next one."""
        return self.scheduled_steps or self.epochs * self.steps_per_epoch

    @property
    def stop_step(self) -> int:
        """Step after which this launch stops: ``max_steps`` or the whole schedule."""
        if self.max_steps:
            return min(self.max_steps, self.total_steps)
        return self.total_steps


@dataclasses.dataclass
class WorkerContext:
    """One worker's place in the run."""

    settings: LoopSettings
    rank: int
    world_size: int
    device: torch.device
    hf_deepspeed_config: Any = None  # kept alive while a ZeRO-3 model is built
    step: int = 0                    # optimizer steps done (the step being made is step + 1)
    node_id: str = ""                # the Ray node this worker runs on

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16,
                "fp16": torch.float16}[self.settings.precision]


@dataclasses.dataclass
class StepBatch:
    """One rank's part of one optimizer step, as a stage prepares it."""

    chunks: list[Any]                             # model inputs; one chunk = no grad cache
    loss_fn: Callable[[torch.Tensor], torch.Tensor]  # gathered (W * n_local, D) -> ()
    num_samples: int                              # local samples (rows embedded)
    num_tokens: int                               # local non-padding tokens
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # filled by loss_fn
    prepare_s: float = 0.0                        # building it (prefetch thread)


class StageSpec(Protocol):
    """What a training stage plugs into the loop (see the module docstring)."""

    settings: LoopSettings
    key_column: str

    def build_model(self, ctx: WorkerContext) -> torch.nn.Module:
        """The model to train, on ``ctx.device``; parameters with requires_grad train. Random
        init (LoRA) must depend on ``settings.train.seed`` only: the same on every rank."""

    def set_train_mode(self, module: torch.nn.Module) -> None:
        """Train mode for what trains, eval mode for the frozen parts."""

    def check_frozen(self, module: torch.nn.Module) -> None:
        """Raise if a part that must stay frozen is trainable or in train mode."""

    def decode_rows(self, batch: Any) -> list[Any]:
        """One step's :class:`pipeline.train.rows.RowBatch` -> this rank's rows, in order."""

    def make_step(self, ctx: WorkerContext, module: torch.nn.Module, rows: list[Any],
                  positions: np.ndarray) -> StepBatch:
        """This rank's rows of one global batch (whose sorted-key positions are
        ``positions``, all ranks) -> model inputs and the global loss. Runs in the prefetch
        thread: no collectives here (they belong in ``loss_fn``)."""

    def embed(self, engine: Any, chunk: Any) -> torch.Tensor:
        """(n_chunk, D) embeddings of one chunk through the engine (``engine(...)``)."""

    def export(self, ctx: WorkerContext, engine: Any) -> dict[str, Any]:
        """Called on every rank after training; rank 0 returns what it wrote."""


# -- schedule ------------------------------------------------------------------------------------
def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """``ceil(warmup_ratio * total_steps)`` (a float-safe ceil), at most ``total_steps``."""
    return min(total_steps, math.ceil(warmup_ratio * total_steps - 1e-9))


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Factor of the peak LR for the update with 0-based index ``step``.

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (the first update
    already moves; the last warm-up update uses the peak). Then, with
    ``progress = (step - warmup_steps) / (total_steps - warmup_steps)`` in [0, 1):
    ``linear`` = ``1 - progress``, ``cosine`` = ``(1 + cos(pi * progress)) / 2``,
    ``constant`` = 1. The last update keeps a small positive LR.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# -- data order ----------------------------------------------------------------------------------
def steps_per_epoch(num_rows: int, global_batch_rows: int, world_size: int, *,
                    groups: Sequence[int] = ()) -> int:
    """Full global batches per epoch (drop last; with ``groups``, within each group);
    errors name the config keys."""
    if global_batch_rows % world_size:
        raise ValueError(f"the global batch of {global_batch_rows} rows does not split into "
                         f"{world_size} equal worker slices: make the stage's global batch "
                         f"a multiple of train.num_workers")
    if len(groups) and len(groups) != num_rows:
        raise ValueError(f"{len(groups)} row groups for {num_rows} rows")
    sizes = np.bincount(np.asarray(groups, dtype=np.int64)) if len(groups) else [num_rows]
    steps = sum(int(size) // global_batch_rows for size in sizes)
    if steps == 0:
        where = f" (largest group: {max(sizes)} rows)" if len(groups) else ""
        raise ValueError(f"{num_rows} input rows{where} are fewer than one global batch of "
                         f"{global_batch_rows}: lower the stage's global batch")
    return steps


def epoch_order(num_rows: int, seed: int, epoch: int, *, groups: Sequence[int] = (),
                global_batch_rows: int = 0) -> np.ndarray:
    """Positions into the sorted keys in epoch ``epoch``'s visiting order: global batch
    ``b`` is ``order[b*G:(b+1)*G]``.

    Without ``groups``: a permutation of every row (the last partial batch is never
    reached). With ``groups`` (one int per row, e.g. its dataset) every global batch holds
    one group's rows: each group is shuffled and cut into whole batches (its remainder
    waits for the next epoch's shuffle), then the batches of all groups are shuffled
    together. Only the complete batches are returned.
    """
    rng = np.random.default_rng([seed, epoch])
    if not len(groups):
        return rng.permutation(num_rows)
    if global_batch_rows <= 0:
        raise ValueError("grouped batches need global_batch_rows > 0")
    labels = np.asarray(groups, dtype=np.int64)  # (num_rows,)
    batches = []
    for group in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == group))
        whole = len(members) // global_batch_rows * global_batch_rows
        batches.extend(members[:whole].reshape(-1, global_batch_rows))
    if not batches:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([batches[i] for i in rng.permutation(len(batches))])


def local_positions(order: np.ndarray, step_in_epoch: int, rank: int, *,
                    global_batch_rows: int, world_size: int) -> np.ndarray:
    """(G / W,) positions of rank ``rank``'s slice of batch ``step_in_epoch``."""
    per_rank = global_batch_rows // world_size
    start = step_in_epoch * global_batch_rows + rank * per_rank
    return order[start:start + per_rank]


def steps_per_rank(complete_steps_by_rank: Sequence[int]) -> int:
    """The number of steps every rank runs, from each rank's count of complete local
    batches; :class:`StepMismatchError` when they differ (a rank would stop early and
    leave the others waiting in a collective forever)."""
    counts = list(complete_steps_by_rank)
    if not counts:
        raise ValueError("no ranks")
    if len(set(counts)) > 1:
        detail = ", ".join(f"rank {r}: {n}" for r, n in enumerate(counts))
        raise StepMismatchError(
            f"ranks have different numbers of complete batches this epoch ({detail}); "
            "they would run unequal steps and hang in a collective. Every worker must get "
            "the same loop settings (row keys, schedule) from the driver")
    return counts[0]


def epoch_rows(ctx: WorkerContext, order: np.ndarray, start: int, count: int,
               group: Any = None) -> Any:
    """This rank's :class:`pipeline.train.rows.EpochRows` for ``count`` steps from step
    ``start`` of the epoch on (a collective: every rank exchanges its share of the input)."""
    from pipeline.train.rows import exchange_epoch

    settings = ctx.settings
    steps = range(start, start + count)
    wanted = [np.concatenate([local_positions(order, s, rank, world_size=ctx.world_size,
                                              global_batch_rows=settings.global_batch_rows)
                              for s in steps]) if len(steps) else np.zeros(0, np.int64)
              for rank in range(ctx.world_size)]
    rows = exchange_epoch(settings.source, wanted, ctx.rank, group=group)
    logger.info("%s rank %d: epoch rows exchanged in %.1f s (read %.1f MiB of input, hold "
                "%.1f MiB)", settings.stage, ctx.rank, rows.seconds, rows.bytes_read / 2**20,
                rows.bytes_received / 2**20)
    return rows


def global_positions(order: np.ndarray, step_in_epoch: int, global_batch_rows: int
                     ) -> np.ndarray:
    """(G,) positions of global batch ``step_in_epoch`` (rank r's slice is the r-th of W)."""
    return order[step_in_epoch * global_batch_rows:(step_in_epoch + 1) * global_batch_rows]


# -- engine ----------------------------------------------------------------------------------------
def deepspeed_settings(settings: LoopSettings, *, micro_batch_rows: int) -> dict[str, Any]:
    """The DeepSpeed config dict of a run."""
    from pipeline.train.deepspeed_utils import deepspeed_config

    return deepspeed_config(zero_stage=settings.train.zero_stage,
                            micro_batch_size_per_gpu=micro_batch_rows,
                            precision=settings.precision,  # type: ignore[arg-type]
                            lr=settings.optim.lr, weight_decay=settings.optim.weight_decay,
                            gradient_clipping=settings.optim.max_grad_norm)


def build_engine(ctx: WorkerContext, spec: StageSpec) -> Any:
    """``deepspeed.initialize`` on the stage's model: AdamW on the trainable parameters,
    warm-up + decay schedule, clipping; ZeRO-3 models are built under HfDeepSpeedConfig."""
    import deepspeed

    from pipeline.train.deepspeed_utils import disable_shm_comm_op

    settings = ctx.settings
    if ctx.device.type == "cpu":
        disable_shm_comm_op()  # plain gloo collectives; no 50 s JIT build on CPU workers
    if torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    config = deepspeed_settings(settings, micro_batch_rows=max(
        1, settings.global_batch_rows // ctx.world_size))
    if settings.train.zero_stage == 3:
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        ctx.hf_deepspeed_config = HfDeepSpeedConfig(config)  # must outlive from_pretrained
    model = spec.build_model(ctx)
    if settings.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"{settings.stage}: the model has no trainable parameters")
    multiplier = functools.partial(
        lr_multiplier, total_steps=settings.total_steps, schedule=settings.optim.schedule,
        warmup_steps=warmup_steps(settings.total_steps, settings.optim.warmup_ratio))

    def scheduler(optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: multiplier(step))

    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config,
                                      lr_scheduler=scheduler)
    return engine


def export_lora(ctx: WorkerContext, engine: Any, *, load_fresh: Callable[[], Any],
                export_dtype: str, probe_texts: list[str],
                probe_images: list[bytes | None] | None = None,
                probe_mode: str | None = None) -> dict[str, Any]:
    """A stage's export, on every rank: gather the trained LoRA weights (a collective under
    ZeRO) and embed the probe with the model as trained; rank 0 then writes the adapter and
    the merged model (``checkpoint.export_lora_model`` on ``load_fresh()``, the untrained
    model with the same LoRA layers, float32 on CPU) and returns what it wrote."""
    trainable = ckpt.gather_trainable_state(engine.module)
    probe_emb = engine.module.encode(probe_texts, probe_images, mode=probe_mode)  # (P, D)
    if not ctx.is_rank_zero:
        return {}
    release_hf_deepspeed_config(ctx)
    dtype = getattr(torch, export_dtype)
    exact = ctx.settings.precision == "fp32" and dtype == torch.float32
    return ckpt.export_lora_model(load_fresh(), trainable, stage_dir=ctx.settings.stage_dir,
                                  dtype=dtype, probe_texts=probe_texts, probe_emb=probe_emb,
                                  probe_images=probe_images, probe_mode=probe_mode,
                                  check_device=ctx.device, min_cosine=0.9999 if exact else 0.99)


def check_global_batch(key: str, size: int, num_rows: int | None, rows: str) -> None:
    """A stage's global batch must fit in its input (that it splits into equal worker
    slices is the config's own rule: ``pipeline.config.validate``)."""
    from pipeline.config import ConfigError

    if num_rows is not None and num_rows < size:
        raise ConfigError(f"{key}={size} is larger than the {num_rows} {rows}")


def release_hf_deepspeed_config(ctx: WorkerContext) -> None:
    """Forget the ZeRO-3 HfDeepSpeedConfig, so later ``from_pretrained`` calls load normally."""
    if ctx.hf_deepspeed_config is not None:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        ctx.hf_deepspeed_config = None


# -- one step --------------------------------------------------------------------------------------
def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the RNG for (step, rank): dropout masks do not depend on the history."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def train_step(ctx: WorkerContext, engine: Any, spec: StageSpec,
               batch: StepBatch) -> dict[str, float]:
    """Backward of the global loss (gradient cache or plain) and one optimizer step."""
    from pipeline.train.grad_cache import full_batch_backward, grad_cache_backward

    start = time.perf_counter()
    lr = float(engine.get_lr()[0])
    embed = functools.partial(spec.embed, engine)
    if ctx.settings.train.grad_cache_chunk_size > 0:
        loss = grad_cache_backward(engine, batch.chunks, embed, batch.loss_fn,
                                   reduce_once=ctx.settings.train.grad_cache_reduce_once)
    else:
        if len(batch.chunks) != 1:
            raise ValueError("without the gradient cache a step must be one chunk")
        loss = full_batch_backward(engine, batch.chunks[0], embed, batch.loss_fn)
    engine.step()
    grad_norm = engine.get_global_grad_norm()
    counts = torch.tensor([batch.num_samples, batch.num_tokens], dtype=torch.float64,
                          device=ctx.device)  # (2,)
    if ctx.world_size > 1:
        torch.distributed.all_reduce(counts)
    seconds = time.perf_counter() - start
    return {"loss": float(loss), "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "samples_per_s": float(counts[0]) / seconds,
            "tokens_per_s": float(counts[1]) / seconds, "step_s": seconds,
            **batch.metrics}


def with_data_time(stats: dict[str, float], batch: StepBatch, *, wait_s: float,
                   wall_s: float) -> dict[str, float]:
    """A step's metrics over its whole time: ``step_s`` = wall time since the previous step
    ended (waiting for data, an epoch's row exchange, the previous step's logging and
    checkpoint included), ``compute_s`` = forward, backward and optimizer, ``data_wait_s`` =
    the part spent waiting for this step's inputs, ``prepare_s`` = what building them took
    in the prefetch thread (hidden behind compute when ``data_wait_s`` is near 0); samples/s
    and tokens/s over ``step_s``."""
    compute_s = stats["step_s"]
    scale = compute_s / wall_s if wall_s > 0 else 1.0
    return {**stats, "samples_per_s": stats["samples_per_s"] * scale,
            "tokens_per_s": stats["tokens_per_s"] * scale, "step_s": wall_s,
            "compute_s": compute_s, "data_wait_s": wait_s, "prepare_s": batch.prepare_s}


def chunk_rows(items: list[Any], chunk_size: int) -> list[list[Any]]:
    """``items`` in chunks of ``chunk_size`` (0 = one chunk: the plain full-batch path)."""
    if chunk_size <= 0:
        return [items]
    return [items[i:i + chunk_size] for i in range(0, len(items), chunk_size)]


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """``cat`` of ``x`` over ranks in rank order, without autograd (e.g. teacher vectors)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    shards = [torch.empty_like(x) for _ in range(dist.get_world_size())]  # W x (n, ...)
    dist.all_gather(shards, x.contiguous())
    return torch.cat(shards)  # (W * n, ...)


def all_gather_ints(value: int, ctx: WorkerContext) -> list[int]:
    """``value`` of every rank, in rank order."""
    if ctx.world_size == 1:
        return [value]
    local = torch.tensor([value], dtype=torch.int64, device=ctx.device)
    shards = [torch.empty_like(local) for _ in range(ctx.world_size)]
    torch.distributed.all_gather(shards, local)
    return [int(s.item()) for s in shards]


def all_gather_strings(value: str) -> list[str]:
    """Every rank's ``value``, in rank order (e.g. the Ray node each worker ran on)."""
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return [str(v) for v in gathered]


# -- the worker loop -----------------------------------------------------------------------------
def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point on every worker: ``{"spec": StageSpec}``."""
    import ray
    import ray.train
    import ray.train.torch

    spec: StageSpec = loop_config["spec"]
    settings = spec.settings
    _setup_worker_logging(settings.log_level)
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("%s: Ray gave this worker GPU(s) %s but torch sees no CUDA device: "
                       "it trains on the CPU", settings.stage, ray.get_gpu_ids())
        device = torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(settings.train.cpus_per_worker)))
    ctx = WorkerContext(settings=settings, rank=context.get_world_rank(),
                        world_size=context.get_world_size(), device=device,
                        node_id=ray.get_runtime_context().get_node_id())
    run_worker(ctx, spec, ray.train.get_checkpoint(), ray.train.report)


def run_worker(ctx: WorkerContext, spec: StageSpec, checkpoint: Any,
               report: Callable[..., None]) -> None:
    """Train from the checkpoint (or from scratch) to ``stop_step``, then export."""
    settings = ctx.settings
    engine = build_engine(ctx, spec)
    group = data_group(ctx)
    data_path = {"bytes_read": 0, "bytes_held_max": 0, "exchange_s": 0.0}
    state = ckpt.TrainState(world_size=ctx.world_size)
    if checkpoint is not None:
        state = ckpt.load_checkpoint(engine, checkpoint, world_size=ctx.world_size)
    frozen = ckpt.frozen_fingerprint(engine.module)
    metrics = None
    if ctx.is_rank_zero:
        metrics = MetricsLogger(settings.stage_dir, name=settings.stage,
                                total_steps=settings.stop_step, resume_step=state.step,
                                log_every_steps=settings.train.log_every_steps,
                                sample_unit=settings.sample_unit)
        logger.info("%s: %d rows, %d steps/epoch, %d scheduled steps; this launch runs "
                    "steps %d..%d on %d worker(s), %s, ZeRO-%d", settings.stage,
                    len(settings.row_keys), settings.steps_per_epoch, settings.total_steps,
                    state.step + 1, settings.stop_step, ctx.world_size, settings.precision,
                    settings.train.zero_stage)
    attempt_start, elapsed_before, resumed_from = time.perf_counter(), state.elapsed_s, state.step
    spec.set_train_mode(engine.module)
    tick = time.perf_counter()  # end of the previous step: each step's wall time starts here
    while state.step < settings.stop_step:
        state.epoch, start = divmod(state.step, settings.steps_per_epoch)
        order = settings.epoch_order(state.epoch)
        count = min(settings.steps_per_epoch, start + settings.stop_step - state.step) - start
        steps_per_rank(all_gather_ints(count, ctx))
        rows = epoch_rows(ctx, order, start, count, group)
        data_path["bytes_read"] += rows.bytes_read
        data_path["bytes_held_max"] = max(data_path["bytes_held_max"], rows.bytes_received)
        data_path["exchange_s"] += rows.seconds
        prepare = functools.partial(_prepare_step, ctx, spec, engine.module, rows, order,
                                    start, state.step)
        for batch in prefetched(prepare, count, PREFETCH_STEPS):
            torch.manual_seed(step_seed(settings.train.seed, state.step, ctx.rank))
            ctx.step = state.step
            spec.check_frozen(engine.module)
            received = time.perf_counter()
            stats = train_step(ctx, engine, spec, batch)
            done = time.perf_counter()
            stats = with_data_time(stats, batch, wait_s=received - tick, wall_s=done - tick)
            tick = done
            state.step += 1
            state.loss = stats["loss"]
            state.elapsed_s = elapsed_before + time.perf_counter() - attempt_start
            row = {"step": state.step, "epoch": state.epoch, **stats,
                   "elapsed_s": state.elapsed_s}
            checkpoint_now = (state.step % settings.train.checkpoint_every_steps == 0
                              or state.step == settings.stop_step)
            if metrics is not None:
                metrics.log(row)
                if checkpoint_now or state.step % settings.train.log_every_steps == 0:
                    metrics.flush(plot=checkpoint_now)
            if checkpoint_now:
                ckpt.save_checkpoint(engine, state, rank=ctx.rank, report=report, metrics=row)
    frozen_checked = ckpt.verify_frozen(engine.module, frozen)
    export = spec.export(ctx, engine)
    worker_nodes = all_gather_strings(ctx.node_id)
    data = [json.loads(d) for d in all_gather_strings(json.dumps(
        {**data_path, "peak_rss_mb": round(peak_rss_mb(), 1)}))]
    if metrics is not None:
        metrics.close()
        _write_summary(ctx, state, metrics.rows, frozen_checked,
                       {"resumed_from_step": resumed_from, "worker_nodes": worker_nodes,
                        "data_path": data, **export})


def _prepare_step(ctx: WorkerContext, spec: StageSpec, module: torch.nn.Module, rows: Any,
                  order: np.ndarray, start: int, first_step: int, i: int) -> StepBatch:
    """The :class:`StepBatch` of the ``i``-th step of this epoch's run (prefetch thread)."""
    settings = ctx.settings
    step_in_epoch = start + i
    positions = global_positions(order, step_in_epoch, settings.global_batch_rows)
    local = local_positions(order, step_in_epoch, ctx.rank, world_size=ctx.world_size,
                            global_batch_rows=settings.global_batch_rows)
    step_ctx = dataclasses.replace(ctx, step=first_step + i)
    begin = time.perf_counter()
    batch = spec.make_step(step_ctx, module, spec.decode_rows(rows.batch(local)), positions)
    if ctx.device.type == "cuda":
        batch.chunks = [pin_memory(chunk) for chunk in batch.chunks]
    batch.prepare_s = time.perf_counter() - begin
    return batch


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB; Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pin_memory(chunk: Any) -> Any:
    """A chunk's CPU tensors in pinned memory (copied to the GPU with non_blocking)."""
    if isinstance(chunk, dict):
        return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                for k, v in chunk.items()}
    return chunk


def data_group(ctx: WorkerContext) -> Any:
    """The process group of the row exchange: gloo (CPU tensors), whatever the training
    backend; None (the default group) when that is gloo already or there is one rank."""
    dist = torch.distributed
    if ctx.world_size == 1 or not dist.is_initialized() or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def _write_summary(ctx: WorkerContext, state: ckpt.TrainState, rows: list[dict[str, Any]],
                   frozen_checked: int, export: dict[str, Any]) -> None:
    settings = ctx.settings
    summary = {
        "steps": state.step, "stop_step": settings.stop_step,
        "total_steps": settings.total_steps, "steps_per_epoch": settings.steps_per_epoch,
        "epochs_started": state.step // settings.steps_per_epoch
        + bool(state.step % settings.steps_per_epoch),
        "first_loss": rows[0]["loss"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "train_seconds": round(state.elapsed_s, 3), "world_size": ctx.world_size,
        "precision": settings.precision, "zero_stage": settings.train.zero_stage,
        "grad_cache_chunk_size": settings.train.grad_cache_chunk_size,
        "frozen_params_checked": frozen_checked, "frozen_params_unchanged": True,
        **export,
    }
    storage.write_json(storage.join(settings.stage_dir, SUMMARY_FILE), summary)


def _setup_worker_logging(level: str) -> None:
    root = logging.getLogger("pipeline")
    root.setLevel(level)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.propagate = False


# -- the driver side -----------------------------------------------------------------------------
def resolve_precision(precision: str, use_gpu: bool) -> str:
    """``auto`` -> bf16 on GPU, fp32 on CPU; fp16/bf16 on CPU are refused."""
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if precision in ("bf16", "fp16") and not use_gpu:
        raise ValueError(f"train.precision={precision} needs GPUs; use fp32 (or auto) on CPU")
    return precision


def resolve_use_gpu(train: TrainConfig, resource_wait_s: float) -> bool:
    """``train.use_gpu`` (auto = the Ray cluster has GPUs now). With GPUs, waits until the
    cluster has ``num_workers x gpus_per_worker`` of them (of ``train.accelerator_type``),
    asking the autoscaler, so the run never starts on a cluster that cannot hold it."""
    from pipeline.ray_utils import uses_gpu, wait_for_gpus

    if not uses_gpu(train.use_gpu, "train.use_gpu"):
        return False
    wait_for_gpus(train.num_workers, train.gpus_per_worker, key="train.use_gpu",
                  timeout_s=resource_wait_s, accelerator_type=train.accelerator_type)
    return True


def fit(spec: StageSpec, run_name: str) -> Any:
    """Run the stage on Ray Train; returns the ``ray.train.Result``.

    The run is ``RunConfig(name=run_name, storage_path=<stage folder>/ray)``, with the run
    name derived from the step's hash (``pipeline.steps.base.ray_run_name``): a relaunch of
    the same step settings finds its checkpoints there and resumes.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    settings = spec.settings
    train = settings.train
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < train.num_workers * train.cpus_per_worker:
        logger.warning("the Ray cluster has %.0f CPUs now; %d workers x %.1f CPUs need more: "
                       "the run waits until they are available",
                       cpus, train.num_workers, train.cpus_per_worker)
    fs, path = storage.resolve(storage.join(settings.stage_dir, "ray"))
    run_config = ray.train.RunConfig(
        name=run_name, storage_path=path, storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.checkpoints_to_keep))
    scaling = ray.train.ScalingConfig(num_workers=train.num_workers, use_gpu=settings.use_gpu,
                                      resources_per_worker=worker_resources(settings),
                                      accelerator_type=train.accelerator_type or None)
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config={"spec": spec},
                           scaling_config=scaling, run_config=run_config)
    start = time.perf_counter()
    result = trainer.fit()
    logger.info("%s: Ray Train run %s finished in %.1f s", settings.stage, run_name,
                time.perf_counter() - start)
    return result


def worker_resources(settings: LoopSettings) -> dict[str, float]:
    """Ray resources of one training worker: its CPUs, and its GPUs when it uses them."""
    train = settings.train
    if settings.use_gpu:
        return {"CPU": train.cpus_per_worker, "GPU": train.gpus_per_worker}
    return {"CPU": train.cpus_per_worker}


def build_settings(config: Config, *, stage: str, folder: str, keys: tuple[str, ...],
                   optim: OptimConfig, global_batch_rows: int, sample_unit: str,
                   epochs: int = 1, max_steps: int = 0, scheduled_steps: int = 0,
                   row_groups: tuple[int, ...] = (), source: Any = None) -> LoopSettings:
    """A stage's loop settings (resolves GPU use and precision; errors name the key)."""
    from pipeline.config import ConfigError

    use_gpu = resolve_use_gpu(config.train, config.ray.resource_wait_s)
    try:
        precision = resolve_precision(config.train.precision, use_gpu)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return LoopSettings(stage=stage, stage_dir=storage.absolute_uri(folder), train=config.train,
                        optim=optim, global_batch_rows=global_batch_rows, row_keys=keys,
                        precision=precision, use_gpu=use_gpu, log_level=config.log_level,
                        source=source,
                        sample_unit=sample_unit, row_groups=row_groups, epochs=epochs,
                        max_steps=max_steps, scheduled_steps=scheduled_steps)


def finished_run(folder: str, owner: str, target_steps: int, stage: str,
                 record: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a finished run of this step identity (``owner``) with >=
    ``target_steps`` steps, else None (after claiming the folder and removing the manifest
    of a shorter run, which then resumes). Another identity's folder is refused."""
    import pyarrow as pa

    manifest = outputs.read_manifest(folder)
    if (manifest is not None and manifest.get("step_hash") == owner
            and manifest.get("steps", -1) >= target_steps):
        logger.info("%s: complete already at %s (%d steps)", stage, folder, manifest["steps"])
        return manifest
    outputs.ShardedOutput(folder, owner, pa.schema([])).claim(record)
    if manifest is not None:
        logger.info("%s: %s has %d steps, %d requested: resuming", stage, folder,
                    manifest.get("steps", 0), target_steps)
        storage.delete(storage.join(folder, outputs.MANIFEST_NAME))
    return None


def rows_used(num_rows: int, settings: LoopSettings, steps: int) -> int:
    """Distinct input rows that entered at least one of the first ``steps`` steps."""
    used = np.zeros(num_rows, dtype=bool)
    per_epoch = settings.steps_per_epoch
    for epoch in range(-(-steps // per_epoch)):
        order = settings.epoch_order(epoch)
        used[order[:min(per_epoch, steps - epoch * per_epoch) * settings.global_batch_rows]] = True
    return int(used.sum())


def export_dtype(precision: str, model_dtype: str) -> str:
    """dtype of a stage's merged model: ``model.dtype``, or for auto the training precision's."""
    return EXPORT_DTYPES[precision] if model_dtype == "auto" else model_dtype
