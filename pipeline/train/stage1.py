"""Stage 1 of UniME: textual discriminative knowledge distillation (UNIME_METHOD.md).

The student MLLM's language model (LoRA; vision tower and projector frozen, in eval mode
and unused) embeds texts in the family's one-word prompt; for a global batch of whole
text groups (anchor, paraphrase, contradiction: every text's distribution holds its
paraphrase and its contradiction) the in-batch similarity distribution of the student is
pulled towards the teacher's with :func:`pipeline.losses.distillation_loss`. Teacher
vectors come from the ``teacher_embed`` shards; each rank holds those of its own slice
and they are all-gathered without grad into the global teacher batch, in the same rank
order as the gathered student embeddings.

Student source (``model.path``): a local folder, an ``s3://`` prefix (downloaded once per
node), or ``tiny:<family>``: a random-weight tiny model built once on the driver, in a
local temporary folder, and copied to ``<run_root>/models/tiny-<family>`` (local or S3,
``unime_backbone.json`` last), with ``_source.json`` recording the seed and the digest of
the texts its tokenizer was trained on (a different one is rebuilt, never reused).

Outputs under ``<run_root>/stage1/``::

    ray/<run name>/checkpoint_*/   Ray Train run: DeepSpeed state + data position (resume)
    adapter/                       the LoRA adapter (PEFT save_pretrained)
    model/                         merged Hugging Face folder for Embedder.from_pretrained
    metrics.jsonl, curves.png, tensorboard/, train_summary.json, export_check.json
    _manifest.json                 written last

A folder whose manifest has this config's hash and at least the requested steps is
complete and skipped; with fewer steps (an earlier launch with a smaller
``stage1.max_steps``), the run resumes from its last checkpoint and writes new outputs.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline import outputs, provenance, storage
from pipeline.config import Config, ConfigError
from pipeline.train import checkpoint as ckpt
from pipeline.train import loop
from pipeline.train.lora import attach_lora, check_lora_only, parameter_counts, train_mode

logger = logging.getLogger(__name__)

STEP = "stage1"
TEACHER_STEP = "teacher_embed"
TINY_PREFIX = "tiny:"
TINY_FAMILIES = ("llava_next", "qwen2_vl", "qwen2_5_vl")
TINY_SOURCE_FILE = "_source.json"
NUM_PROBE_GROUPS = 3
EXPORT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclasses.dataclass(frozen=True)
class StudentSource:
    """Where the student backbone is and how to load it."""

    uri: str                 # absolute local path or s3:// prefix
    family: str              # '' = detect from the folder
    trust_remote_code: bool


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
        self.export_dtype = (EXPORT_DTYPES[settings.precision] if config.model.dtype == "auto"
                             else config.model.dtype)
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
    def decode_rows(self, table: pa.Table) -> dict[str, TextGroup]:
        return decode_groups(table, self.texts_per_group)

    def make_step(self, ctx: loop.WorkerContext, module: torch.nn.Module,
                  rows: list[TextGroup]) -> loop.StepBatch:
        from pipeline.losses import distillation_loss

        texts = [text for group in rows for text in group.texts]  # n_local, group-major
        teacher_local = torch.from_numpy(
            np.concatenate([group.teacher_emb for group in rows]).astype(np.float32))  # (n, D_t)
        teacher_emb = loop.all_gather_no_grad(teacher_local.to(ctx.device))  # (W * n, D_t)
        chunks = [module.prepare(piece, mode="one_word")
                  for piece in loop.chunk_rows(texts, ctx.settings.train.grad_cache_chunk_size)]
        loss_fn = functools.partial(distillation_loss, teacher_emb=teacher_emb,
                                    temperature=self.stage1.temperature,
                                    direction=self.stage1.kl_direction,
                                    mask_self=self.stage1.mask_self,
                                    reduction=self.stage1.reduction)
        tokens = sum(int(chunk["attention_mask"].sum()) for chunk in chunks)
        return loop.StepBatch(chunks=chunks, loss_fn=loss_fn, num_samples=len(texts),
                              num_tokens=tokens)

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


# -- the driver ------------------------------------------------------------------------------------
def check_config(config: Config, num_groups: int | None = None) -> None:
    """Fail before heavy work, naming the key."""
    loop.check_global_batch("stage1.global_batch_groups", config.stage1.global_batch_groups,
                            config.train.num_workers, num_groups,
                            "text groups of the teacher step")
    check_train_and_model(config)


def check_train_and_model(config: Config) -> None:
    """The checks both stages share: gradient-cache settings and the student model."""
    from pipeline.models.loading import check_remote_code
    from pipeline.models.registry import get_backbone

    train, model = config.train, config.model
    if train.grad_cache_chunk_size and train.grad_cache_reduce_once and train.zero_stage == 0:
        raise ConfigError("train.grad_cache_reduce_once needs train.zero_stage >= 1")
    family = model.family
    if model.path.startswith(TINY_PREFIX):
        tiny = model.path[len(TINY_PREFIX):]
        if tiny not in TINY_FAMILIES:
            raise ConfigError(f"model.path={model.path}: tiny models exist for "
                              f"{', '.join(TINY_FAMILIES)}")
        if family and family != tiny:
            raise ConfigError(f"model.family={family} contradicts model.path={model.path}")
        family = tiny
    if family:
        try:
            check_remote_code(get_backbone(family), model.trust_remote_code)
        except ValueError as err:
            raise ConfigError(f"model.trust_remote_code: {err}") from err


def read_teacher_tables(teacher_folder: str) -> list[pa.Table]:
    """Every shard of a complete teacher step, in shard order."""
    manifest = outputs.require_complete(teacher_folder)
    shards = outputs.shard_uris(teacher_folder)
    if len(shards) != manifest["num_shards"]:
        raise storage.StorageError(f"{teacher_folder}: manifest lists {manifest['num_shards']} "
                                   f"shards but {len(shards)} are present")
    return [storage.read_table(uri) for uri in shards]


def group_index(tables: list[pa.Table]) -> GroupIndex:
    """Ids, group size, probe texts and all texts of the teacher tables."""
    groups: dict[str, list[str]] = {}
    for table in tables:
        for group_id, texts in zip(table.column("id").to_pylist(),
                                   table.column("texts").to_pylist(), strict=True):
            if group_id in groups:
                raise ValueError(f"duplicate text group id {group_id!r} in the teacher shards")
            groups[group_id] = texts
    sizes = {len(texts) for texts in groups.values()}
    if len(sizes) != 1:
        raise ValueError(f"text groups have different numbers of texts {sorted(sizes)}; "
                         "stage 1 needs groups of one size")
    keys = tuple(sorted(groups))
    probe = tuple(t for key in keys[:NUM_PROBE_GROUPS] for t in groups[key])
    return GroupIndex(keys=keys, texts_per_group=sizes.pop(), probe_texts=probe,
                      texts=tuple(t for key in keys for t in groups[key]))


def resolve_student(config: Config, vocab_texts: tuple[str, ...]) -> StudentSource:
    """The student's folder; ``tiny:<family>`` is built once (see the module docstring)."""
    model = config.model
    if not model.path.startswith(TINY_PREFIX):
        if not storage.exists(model.path):
            raise FileNotFoundError(f"model.path: {model.path} does not exist")
        return StudentSource(loop.absolute_uri(model.path), model.family, model.trust_remote_code)
    from pipeline.models import META_FILE, build_tiny_model

    family = model.path[len(TINY_PREFIX):]
    uri = storage.join(config.run_root, "models", f"tiny-{family}")
    source = {"family": family, "seed": config.train.seed, "vocab_sha256": hashlib.sha256(
        json.dumps(vocab_texts).encode()).hexdigest()}
    source_uri = storage.join(uri, TINY_SOURCE_FILE)
    current = storage.read_json(source_uri) if storage.exists(source_uri) else None
    if current != source or not storage.exists(storage.join(uri, META_FILE)):
        if current is not None:
            logger.warning("tiny student at %s was built from other inputs: rebuilding", uri)
        with tempfile.TemporaryDirectory(prefix="unime-tiny-") as tmp:
            build_tiny_model(family, tmp, seed=config.train.seed, vocab_texts=vocab_texts)
            with open(f"{tmp}/{TINY_SOURCE_FILE}", "w") as f:
                json.dump(source, f, sort_keys=True)
            ckpt.upload_folder(tmp, uri, last=META_FILE)
        logger.info("tiny %s student built at %s", family, uri)
    return StudentSource(loop.absolute_uri(uri), family, model.trust_remote_code)


def stop_step(config: Config, num_groups: int) -> int:
    """Steps a launch of this config trains to (``max_steps`` or every epoch)."""
    per_epoch = loop.steps_per_epoch(num_groups, config.stage1.global_batch_groups,
                                     config.train.num_workers)
    total = config.stage1.epochs * per_epoch
    return min(config.stage1.max_steps, total) if config.stage1.max_steps else total


def stage1(config: Config) -> dict[str, Any]:
    """Run stage 1 (or skip it when complete); returns its manifest."""
    import ray.data

    start = time.perf_counter()
    folder = config.step_dir(STEP)
    check_config(config)
    teacher_folder = config.step_dir(TEACHER_STEP)
    teacher_manifest = outputs.require_complete(teacher_folder)
    num_groups = teacher_manifest["rows_out"]
    check_config(config, num_groups)
    done = loop.finished_run(config.config_hash, folder, stop_step(config, num_groups), STEP)
    if done is not None:
        return done
    tables = read_teacher_tables(teacher_folder)
    index = group_index(tables)
    if len(index.keys) != num_groups:
        raise storage.StorageError(f"{teacher_folder}: the manifest counts {num_groups} groups "
                                   f"but the shards hold {len(index.keys)}")
    student = resolve_student(config, index.texts)
    settings = loop_settings(config, folder, index.keys)
    spec = Stage1Spec(settings, student=student, config=config,
                      texts_per_group=index.texts_per_group, probe_texts=list(index.probe_texts))
    # The driver has read the shards already (ids, probe texts): they go to the object store
    # as they are (read_parquet's per-file tasks cost more than the read at this size).
    dataset = ray.data.from_arrow(tables)
    del tables
    loop.fit(spec, dataset, config)
    summary = storage.read_json(storage.join(folder, loop.SUMMARY_FILE))
    used = loop.rows_used(num_groups, settings, summary["steps"])
    return outputs.write_manifest(folder, {
        "rows_in": num_groups, "rows_out": num_groups, "rows_rejected": 0,
        "rejects_by_reason": {}, "groups_used": used, "groups_never_used": num_groups - used,
        "groups_dropped_last_per_epoch": num_groups - settings.steps_per_epoch
        * settings.global_batch_rows,
        "texts_per_group": index.texts_per_group,
        "global_batch_texts": settings.global_batch_rows * index.texts_per_group,
        "config_hash": config.config_hash, "seconds": round(time.perf_counter() - start, 3),
        **summary,
        "student": dataclasses.asdict(student),
        "ray_run": {"storage": storage.join(folder, "ray"), "name": config.run_name},
        "teacher_dim": teacher_manifest.get("dim"),
        "inputs": {"teacher_embed": provenance.fingerprint(teacher_folder)},
        "config": config.to_dict(),
    })


def loop_settings(config: Config, folder: str, keys: tuple[str, ...]) -> loop.LoopSettings:
    """The training loop's settings for stage 1 (resolves GPU use and precision)."""
    return loop.build_settings(config, stage=STEP, folder=folder, keys=keys,
                               optim=config.stage1.optim, epochs=config.stage1.epochs,
                               max_steps=config.stage1.max_steps,
                               global_batch_rows=config.stage1.global_batch_groups,
                               sample_unit="texts")


def format_summary(manifest: dict[str, Any], folder: str) -> str:
    return (f"stage1 -> {folder}  ({manifest['seconds']:.1f} s)\n"
            f"{manifest['steps']} of {manifest['total_steps']} scheduled steps on "
            f"{manifest['world_size']} worker(s), {manifest['precision']}, ZeRO-"
            f"{manifest['zero_stage']}; loss {manifest['first_loss']:.4f} -> "
            f"{manifest['final_loss']:.4f}; groups used {manifest['groups_used']} of "
            f"{manifest['rows_in']}; merged model at {manifest['model']}")


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

    folder = storage.join(config.step_dir("prepare_data"), "eval")
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
