"""Stage 1 of UniME: textual discriminative knowledge distillation (the training step is
:mod:`pipeline.steps.stage1`; this module is its plug-in for the shared loop).

The student MLLM's language model (LoRA; vision tower and projector frozen, in eval mode
and unused) embeds texts in the family's one-word prompt; for a global batch of whole
text groups (anchor, paraphrase, contradiction: every text's distribution holds its
paraphrase and its contradiction) the in-batch similarity distribution of the student is
pulled towards the teacher's with :func:`pipeline.losses.distillation_loss`. Teacher
vectors come from the ``teacher_embed`` shards; each rank holds those of its own slice
and they are all-gathered without grad into the global teacher batch, in the same rank
order as the gathered student embeddings.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline import outputs, storage
from pipeline.config import Config
from pipeline.models.student import StudentSource
from pipeline.train import loop
from pipeline.train.lora import attach_lora, check_lora_only, parameter_counts, train_mode
from pipeline.train.rows import RowBatch, RowSource

logger = logging.getLogger(__name__)

NUM_PROBE_GROUPS = 3
TEACHER_COLUMNS = ("id", "texts", "teacher_emb")  # what a worker reads of a teacher row


@dataclasses.dataclass(frozen=True)
class TextGroup:
    """One input row: texts of one group and their teacher vectors."""

    id: str
    texts: tuple[str, ...]
    teacher_emb: np.ndarray  # (k, D_t) float16


@dataclasses.dataclass(frozen=True)
class GroupIndex:
    """What the driver reads of the teacher shards before training."""

    keys: tuple[str, ...]        # sorted group ids
    pointers: np.ndarray         # (G, 1) int64: shard << 32 | row of each key's group
    texts_per_group: int
    probe_texts: tuple[str, ...]
    texts: tuple[str, ...]       # every text (tiny-student tokenizer corpus)


# -- the stage plug-in -----------------------------------------------------------------------------
class Stage1Spec:
    """:class:`pipeline.train.loop.StageSpec` of stage 1."""

    key_column = "id"

    def __init__(self, settings: loop.LoopSettings, *, student: StudentSource,
                 config: Config, texts_per_group: int, probe_texts: list[str]) -> None:
        self.settings = settings
        self.student = student
        self.stage1 = config.stage1
        self.export_dtype = loop.export_dtype(settings.precision, config.model.dtype)
        self.texts_per_group = texts_per_group
        self.probe_texts = probe_texts

    # -- model -------------------------------------------------------------------------------
    def load_student(self, *, dtype: torch.dtype, device: torch.device | str) -> Any:
        """The student with frozen vision parts and LoRA on the language model only."""
        from pipeline.models import Embedder

        embedder = Embedder.from_pretrained(self.student.uri, family=self.student.family or None,
                                            trust_remote_code=self.student.trust_remote_code,
                                            dtype=dtype, device=device)
        return attach_lora(embedder, self.stage1.lora, include_vision=False,
                           seed=self.settings.train.seed)

    def build_model(self, ctx: loop.WorkerContext) -> torch.nn.Module:
        embedder = self.load_student(dtype=ctx.dtype, device=ctx.device)
        if ctx.is_rank_zero:
            n_train, n_all = parameter_counts(embedder)
            logger.info("stage1 student %s (%s): %d of %d parameters train (LoRA r=%d on the "
                        "language model)", self.student.uri, embedder.spec.family, n_train,
                        n_all, self.stage1.lora.rank)
        return embedder

    def set_train_mode(self, module: torch.nn.Module) -> None:
        train_mode(module, vision_frozen=True)

    def check_frozen(self, module: torch.nn.Module) -> None:
        check_lora_only(module, vision_frozen=True, stage="stage 1")

    # -- data --------------------------------------------------------------------------------
    def decode_rows(self, batch: RowBatch) -> list[TextGroup]:
        return list(decode_groups(batch.own, self.texts_per_group).values())

    def make_step(self, ctx: loop.WorkerContext, module: torch.nn.Module,
                  rows: list[TextGroup], positions: np.ndarray | None = None) -> loop.StepBatch:
        texts = [text for group in rows for text in group.texts]  # n_local, group-major
        teacher_local = torch.from_numpy(
            np.concatenate([group.teacher_emb for group in rows]).astype(np.float32))  # (n, D_t)
        chunks = [module.prepare(piece, mode="one_word")
                  for piece in loop.chunk_rows(texts, ctx.settings.train.grad_cache_chunk_size)]
        loss_fn = functools.partial(self.global_loss, teacher_local=teacher_local,
                                    device=ctx.device)
        tokens = sum(int(chunk["attention_mask"].sum()) for chunk in chunks)
        return loop.StepBatch(chunks=chunks, loss_fn=loss_fn, num_samples=len(texts),
                              num_tokens=tokens)

    def global_loss(self, student_emb: torch.Tensor, *, teacher_local: torch.Tensor,
                    device: torch.device) -> torch.Tensor:
        """The distillation loss of the gathered batch: gathers the teacher vectors here, on
        the training thread (``make_step`` runs ahead in the prefetch thread)."""
        from pipeline.losses import distillation_loss

        teacher_emb = loop.all_gather_no_grad(teacher_local.to(device))  # (W * n, D_t)
        return distillation_loss(student_emb, teacher_emb=teacher_emb,
                                 temperature=self.stage1.temperature,
                                 direction=self.stage1.kl_direction,
                                 mask_self=self.stage1.mask_self,
                                 reduction=self.stage1.reduction)

    def embed(self, engine: Any, chunk: dict[str, torch.Tensor]) -> torch.Tensor:
        return engine(**chunk)  # (n_chunk, D) unit rows

    # -- outputs -----------------------------------------------------------------------------
    def export(self, ctx: loop.WorkerContext, engine: Any) -> dict[str, Any]:
        return loop.export_lora(
            ctx, engine, export_dtype=self.export_dtype, probe_texts=self.probe_texts,
            load_fresh=lambda: self.load_student(dtype=torch.float32, device="cpu"))


def decode_groups(table: pa.Table, texts_per_group: int) -> dict[str, TextGroup]:
    """``teacher`` rows (id, texts, teacher_emb) -> {id: TextGroup}."""
    import pyarrow.compute as pc

    ids = table.column("id").to_pylist()
    texts = table.column("texts").to_pylist()
    emb = table.column("teacher_emb").combine_chunks()
    sizes = pc.list_value_length(emb).to_numpy(zero_copy_only=False)  # (G,)
    vectors = pc.list_flatten(emb)                                      # (N,) of (D,)
    dim = vectors.type.list_size
    flat = pc.list_flatten(vectors).to_numpy(zero_copy_only=False).reshape(-1, dim)  # (N, D)
    out, offset = {}, 0
    for group_id, group_texts, size in zip(ids, texts, sizes, strict=True):
        if len(group_texts) != texts_per_group or size != texts_per_group:
            raise ValueError(f"group {group_id} has {len(group_texts)} texts and {size} teacher "
                             f"vectors; every group must have {texts_per_group}")
        out[group_id] = TextGroup(group_id, tuple(group_texts), flat[offset:offset + size])
        offset += size
    return out


# -- the driver's reads ---------------------------------------------------------------------------
def read_group_texts(shards: list[str]) -> list[pa.Table]:
    """The ``id`` and ``texts`` columns of the teacher shards, in shard order: what the
    driver needs (keys, probe texts, the tiny student's vocabulary), never the vectors."""
    return [storage.read_table(uri, columns=["id", "texts"]) for uri in shards]


def group_index(tables: list[pa.Table]) -> GroupIndex:
    """Ids, where each group is, group size, probe texts and all texts of the teacher
    tables (``tables[s]`` = the ``id`` and ``texts`` of shard s)."""
    from pipeline.train.rows import pointer_codes

    groups: dict[str, list[str]] = {}
    where: dict[str, int] = {}
    for shard, table in enumerate(tables):
        for row, (group_id, texts) in enumerate(zip(table.column("id").to_pylist(),
                                                    table.column("texts").to_pylist(),
                                                    strict=True)):
            if group_id in groups:
                raise ValueError(f"duplicate text group id {group_id!r} in the teacher shards")
            groups[group_id] = texts
            where[group_id] = int(pointer_codes(shard, row))
    sizes = {len(texts) for texts in groups.values()}
    if len(sizes) != 1:
        raise ValueError(f"text groups have different numbers of texts {sorted(sizes)}; "
                         "stage 1 needs groups of one size")
    keys = tuple(sorted(groups))
    probe = tuple(t for key in keys[:NUM_PROBE_GROUPS] for t in groups[key])
    pointers = np.asarray([where[key] for key in keys], dtype=np.int64).reshape(-1, 1)
    return GroupIndex(keys=keys, pointers=pointers, texts_per_group=sizes.pop(),
                      probe_texts=probe,
                      texts=tuple(t for key in keys for t in groups[key]))


def stop_step(config: Config, num_groups: int) -> int:
    """Steps a launch of this config trains to (``max_steps`` or every epoch)."""
    per_epoch = loop.steps_per_epoch(num_groups, config.stage1.global_batch_groups,
                                     config.train.num_workers)
    total = config.stage1.epochs * per_epoch
    return min(config.stage1.max_steps, total) if config.stage1.max_steps else total


def loop_settings(config: Config, folder: str, keys: tuple[str, ...],
                  source: RowSource | None = None) -> loop.LoopSettings:
    """The training loop's settings for stage 1 (resolves GPU use and precision)."""
    return loop.build_settings(config, stage="stage1", folder=folder, keys=keys, source=source,
                               optim=config.stage1.optim, epochs=config.stage1.epochs,
                               max_steps=config.stage1.max_steps,
                               global_batch_rows=config.stage1.global_batch_groups,
                               sample_unit="texts")


# -- quality: similarity agreement with the teacher ------------------------------------------------
def similarity_agreement(student_emb: np.ndarray, teacher_emb: np.ndarray) -> float:
    """Spearman correlation between the pairwise cosine similarities of two embeddings of
    the same n texts (the n(n-1)/2 pairs of the upper triangles); ties get average ranks."""
    student = _upper_cosines(np.asarray(student_emb, dtype=np.float64))
    teacher = _upper_cosines(np.asarray(teacher_emb, dtype=np.float64))
    return float(np.corrcoef(_average_ranks(student), _average_ranks(teacher))[0, 1])


def _upper_cosines(emb: np.ndarray) -> np.ndarray:
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)  # (n, D)
    rows, cols = np.triu_indices(len(unit), k=1)
    return (unit @ unit.T)[rows, cols]  # (n(n-1)/2,)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def heldout_texts(config: Config, max_texts: int = 100, min_words: int = 4) -> list[str]:
    """Distinct caption-like target texts (no image, ``min_words`` words or more) of the
    eval queries written by prepare_data: text the student never trained on."""
    from pipeline.data.schemas import IMAGE_PLACEHOLDER

    folder = storage.join(config.step_dir("prepare_data"), "eval")  # text stage 1 never saw
    outputs.require_complete(folder)
    texts: set[str] = set()
    for uri in outputs.shard_uris(folder):
        for targets in storage.read_table(uri, columns=["tgt_text"]).column("tgt_text").to_pylist():
            texts.update(t for t in targets
                         if IMAGE_PLACEHOLDER not in t and len(t.split()) >= min_words)
    ordered = sorted(texts)
    if len(ordered) > max_texts:
        pick = np.random.default_rng(config.train.seed).choice(len(ordered), max_texts,
                                                               replace=False)
        ordered = [ordered[i] for i in sorted(pick)]
    return ordered
