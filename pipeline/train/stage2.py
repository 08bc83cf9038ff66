"""Stage 2 of UniME: hard-negative enhanced instruction tuning (the training step is
:mod:`pipeline.steps.stage2`; this module is its plug-in for the shared loop).

The model starts from the merged stage-1 model (``stage2.init``) with fresh LoRA over the
whole MLLM (``stage2.lora_vision``), and learns from the ``mine_negatives`` table: one row
= a query, its positive target, its mined hard negatives (best first) and the negatives
the data gave. Queries and targets are text, image or image + text, wrapped in their task
instructions (``stage2.prompt_mode``), images from the packed shards.

One global batch of B pairs, W ranks. Rank r embeds ONE flat list of items::

    [q_1 .. q_n ; pos_1 .. pos_n ; the carried negatives of row 1, row 2, ... ; padding]

with n = B / W, at most ``M = mined_negatives + given_negatives`` negatives per row and
padding (copies of the first positive, ignored by the loss) so every rank embeds the same
number of items (the gather and the gradient cache's chunk count need it). Next to the
items each rank builds a small int64 table ``(kind, global row, slot, content-key code)``
that is all-gathered without grad; the loss then picks the gathered embeddings apart by
it (queries and positives in global row order, negatives scattered into a (B, M, D)
tensor with a validity mask; scatter and index keep the gradient) and calls
:func:`pipeline.losses.hard_negative_loss` on the global batch: candidates from the
batch's targets and/or the row's carried negatives, same-content masking, the
false-negative filter, top-k without gradient through the choice, InfoNCE at tau. With
the gradient cache the flat item list is chunked as it is (chunks may straddle the parts).

Batches (``stage2.batching``): ``mixed`` shuffles the pairs of every dataset together;
``per_dataset`` draws each global batch from one dataset (the loop's grouped epoch order),
so a query's in-batch negatives are targets of its own task. In a mixed batch most of them
differ from the positive in task format already, and a model can score well on them by
reading the instruction alone, never the image.

InfoNCE warm-up (``stage2.infonce_warmup_steps``, 0 in the paper): the first steps train
with ``full_batch`` over ``stage2.infonce_warmup_negatives``; with ``batch`` a warm-up step
flattens and embeds queries and positives only (M = 0 for that step).

"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline import storage
from pipeline.config import Config, ConfigError, Stage2Config
from pipeline.models.student import StudentSource
from pipeline.train import loop
from pipeline.train.lora import attach_lora, check_lora_only, parameter_counts, train_mode

logger = logging.getLogger(__name__)

KIND_QUERY, KIND_POSITIVE, KIND_NEGATIVE, KIND_PADDING = 0, 1, 2, 3
NUM_PROBE_ROWS = 4
STAT_NAMES = ("num_candidates", "dropped_duplicate", "dropped_margin", "dropped_ratio",
              "rows_with_false_negative", "rows_short", "rows_without_negatives",
              "mean_pos_sim", "mean_neg_sim", "mean_margin")
_COLUMNS = ("id", "qry_text", "qry_image", "pos_text", "pos_image", "pos_key", "neg_text",
            "neg_image", "neg_key", "given_neg_text", "given_neg_image")


@dataclasses.dataclass(frozen=True)
class Side:
    """One query or target: text (with the image placeholder when there is an image),
    encoded image bytes or None, and the int64 code of its content key."""

    text: str
    image: bytes | None
    key: int


@dataclasses.dataclass(frozen=True)
class PairRow:
    """One training row: a query, its positive and its carried negatives."""

    id: str
    query: Side
    positive: Side
    negatives: tuple[Side, ...]  # mined (best first), then given; at most M


def key_code(content_key: str) -> int:
    """A content key (hex) -> int64 code: its first 60 bits (collisions ~ 2^-60 per pair)."""
    return int(content_key[:15], 16)


def _given_key(text: str, image: bytes | None, positive: Side, pos_image: bytes | None) -> int:
    """Given negatives carry no content key: the positive's when they are the same text and
    image bytes (so they are masked), else a code of their own."""
    if text == positive.text and image == pos_image:
        return positive.key
    digest = hashlib.sha256(text.encode() + b"\0" + (image or b"-")).hexdigest()
    return key_code(digest)


def decode_pairs(table: pa.Table, *, mined_negatives: int,
                 given_negatives: int) -> dict[str, PairRow]:
    """``mined`` rows -> {id: PairRow} with the first ``mined_negatives`` mined and the
    first ``given_negatives`` given negatives of each row."""
    cols = {name: table.column(name).to_pylist() for name in _COLUMNS}
    out: dict[str, PairRow] = {}
    for i, row_id in enumerate(cols["id"]):
        pos_image = cols["pos_image"][i]
        query = Side(cols["qry_text"][i], cols["qry_image"][i] or None, 0)
        positive = Side(cols["pos_text"][i], pos_image or None, key_code(cols["pos_key"][i]))
        negatives = [Side(text, image or None, key_code(key)) for text, image, key in zip(
            cols["neg_text"][i][:mined_negatives], cols["neg_image"][i][:mined_negatives],
            cols["neg_key"][i][:mined_negatives], strict=True)]
        given = zip(cols["given_neg_text"][i][:given_negatives],
                    cols["given_neg_image"][i][:given_negatives], strict=True)
        negatives += [Side(text, image or None, _given_key(text, image or None, positive,
                                                           pos_image or None))
                      for text, image in given]
        out[row_id] = PairRow(row_id, query, positive, tuple(negatives))
    return out


# -- the flat item list of one rank and its layout ---------------------------------------------
def flatten_rows(rows: list[PairRow], *, rank: int, negative_slots: int,
                 num_items: int | None = None) -> tuple[list[Side], np.ndarray]:
    """Items ``[queries; positives; negatives row by row; padding]`` and their (L, 4) int64
    layout ``(kind, global row, slot, key code)`` (global row = rank * n + local row).

    ``negative_slots`` = M caps each row's negatives (0 = none); ``num_items`` pads with
    copies of the first positive (kind padding) up to that length."""
    n = len(rows)
    items: list[Side] = [row.query for row in rows] + [row.positive for row in rows]
    layout = [(KIND_QUERY, rank * n + i, 0, 0) for i in range(n)]
    layout += [(KIND_POSITIVE, rank * n + i, 0, row.positive.key) for i, row in enumerate(rows)]
    for i, row in enumerate(rows):
        for slot, negative in enumerate(row.negatives[:negative_slots]):
            items.append(negative)
            layout.append((KIND_NEGATIVE, rank * n + i, slot, negative.key))
    if num_items is not None:
        if num_items < len(items):
            raise ValueError(f"{len(items)} items do not fit in {num_items}")
        layout += [(KIND_PADDING, 0, 0, 0)] * (num_items - len(items))
        items += [rows[0].positive] * (num_items - len(items))
    return items, np.asarray(layout, dtype=np.int64).reshape(-1, 4)


def global_loss(global_emb: torch.Tensor, *, layout: torch.Tensor, num_rows: int,
                negative_slots: int, stage2: Stage2Config, mode: str | None = None,
                negatives: str | None = None,
                metrics: dict[str, float] | None = None) -> torch.Tensor:
    """The stage-2 loss of a gathered global batch (see the module docstring).

    ``global_emb`` (N, D) with the local shard in the graph, ``layout`` (N, 4) the gathered
    item table, ``num_rows`` = B, ``negative_slots`` = M (0 = in-batch negatives only).
    ``mode`` and ``negatives`` override ``stage2.mode`` and ``stage2.negatives`` (the
    InfoNCE warm-up). Per-step statistics go into ``metrics`` (``hn_*``)."""
    from pipeline.losses import hard_negative_loss

    kind, row, slot, key = layout.to(global_emb.device).unbind(1)  # (N,) each
    is_query, is_positive = kind == KIND_QUERY, kind == KIND_POSITIVE  # (N,)
    expected = torch.arange(num_rows, device=row.device)  # (B,)
    if not (torch.equal(row[is_query], expected) and torch.equal(row[is_positive], expected)):
        raise RuntimeError("stage 2: gathered queries/positives are not in global row order")
    q_emb, pos_emb = global_emb[is_query], global_emb[is_positive]  # (B, D), (B, D)
    negatives = negatives or stage2.negatives
    neg = {}
    if negative_slots and negatives != "batch":
        idx = (kind == KIND_NEGATIVE).nonzero().squeeze(1)  # (n_neg,)
        where = (row[idx], slot[idx])
        dim = global_emb.shape[1]
        neg["neg_emb"] = global_emb.new_zeros(num_rows, negative_slots, dim).index_put(
            where, global_emb[idx])  # (B, M, D) gradient flows to the gathered rows
        neg["neg_keys"] = key.new_zeros(num_rows, negative_slots).index_put(
            where, key[idx])  # (B, M)
        neg["neg_valid"] = torch.zeros(num_rows, negative_slots, dtype=torch.bool,
                                       device=row.device).index_put(
            where, torch.ones_like(idx, dtype=torch.bool))  # (B, M)
    negatives = negatives if neg else "batch"
    loss, stats = hard_negative_loss(
        q_emb, pos_emb, pos_keys=key[is_positive], negatives=negatives,
        num_hard_negatives=stage2.num_hard_negatives, temperature=stage2.temperature,
        fn_margin=stage2.fn_margin, fn_ratio=stage2.fn_ratio, mode=mode or stage2.mode, **neg)
    if metrics is not None:
        values = stats.as_dict()
        metrics.update({f"hn_{name}": float(values[name]) for name in STAT_NAMES})
        metrics["hn_false_negative_rate"] = values["rows_with_false_negative"] / num_rows
        metrics["hn_full_batch"] = float((mode or stage2.mode) == "full_batch")
    return loss


# -- the stage plug-in -----------------------------------------------------------------------------
class Stage2Spec:
    """:class:`pipeline.train.loop.StageSpec` of stage 2."""

    key_column = "id"

    def __init__(self, settings: loop.LoopSettings, *, init: StudentSource,
                 config: Config, probe_rows: list[PairRow]) -> None:
        self.settings = settings
        self.init = init
        self.stage2 = config.stage2
        self.export_dtype = loop.export_dtype(settings.precision, config.model.dtype)
        self.probe_rows = probe_rows
        self.vision_frozen = not self.stage2.lora_vision

    @property
    def negative_slots(self) -> int:
        """M: negatives carried per row into the loss after the warm-up (0 for in-batch
        negatives only)."""
        return self.slots_for(self.stage2.negatives)

    def slots_for(self, negatives: str) -> int:
        """M of a candidate source: 0 for ``batch`` (no negatives embedded), else all."""
        if negatives == "batch":
            return 0
        return self.stage2.mined_negatives + self.stage2.given_negatives

    # -- model -------------------------------------------------------------------------------
    def load_model(self, *, dtype: torch.dtype, device: torch.device | str) -> Any:
        from pipeline.models import Embedder

        embedder = Embedder.from_pretrained(self.init.uri, family=self.init.family or None,
                                            trust_remote_code=self.init.trust_remote_code,
                                            dtype=dtype, device=device)
        embedder.prompt_mode = self.stage2.prompt_mode
        return attach_lora(embedder, self.stage2.lora, include_vision=self.stage2.lora_vision,
                           seed=self.settings.train.seed)

    def build_model(self, ctx: loop.WorkerContext) -> torch.nn.Module:
        embedder = self.load_model(dtype=ctx.dtype, device=ctx.device)
        if ctx.is_rank_zero:
            n_train, n_all = parameter_counts(embedder)
            logger.info("stage2 model %s (%s): %d of %d parameters train (LoRA r=%d, %s)",
                        self.init.uri, embedder.spec.family, n_train, n_all,
                        self.stage2.lora.rank, "whole MLLM" if self.stage2.lora_vision
                        else "language model only")
        return embedder

    def set_train_mode(self, module: torch.nn.Module) -> None:
        train_mode(module, vision_frozen=self.vision_frozen)

    def check_frozen(self, module: torch.nn.Module) -> None:
        check_lora_only(module, vision_frozen=self.vision_frozen, stage="stage 2")

    # -- data --------------------------------------------------------------------------------
    def decode_rows(self, table: pa.Table) -> dict[str, PairRow]:
        return decode_pairs(table, mined_negatives=self.stage2.mined_negatives,
                            given_negatives=self.stage2.given_negatives)

    def make_step(self, ctx: loop.WorkerContext, module: torch.nn.Module,
                  rows: list[PairRow]) -> loop.StepBatch:
        mode, negatives = self.loss_mode(ctx.step), self.negatives_at(ctx.step)
        slots = self.slots_for(negatives)
        local_items = 2 * len(rows) + sum(min(len(r.negatives), slots) for r in rows)
        num_items = max(loop.all_gather_ints(local_items, ctx))  # same on every rank
        items, layout = flatten_rows(rows, rank=ctx.rank, negative_slots=slots,
                                     num_items=num_items)
        global_layout = loop.all_gather_no_grad(torch.from_numpy(layout).to(ctx.device))
        chunks = [module.prepare([item.text for item in piece], [item.image for item in piece],
                                 mode=self.stage2.prompt_mode)
                  for piece in loop.chunk_rows(items, ctx.settings.train.grad_cache_chunk_size)]
        metrics: dict[str, float] = {}
        loss_fn = functools.partial(global_loss, layout=global_layout,
                                    num_rows=len(rows) * ctx.world_size, negative_slots=slots,
                                    stage2=self.stage2, mode=mode, negatives=negatives,
                                    metrics=metrics)
        tokens = sum(int(chunk["attention_mask"].sum()) for chunk in chunks)
        real = int((layout[:, 0] != KIND_PADDING).sum())
        return loop.StepBatch(chunks=chunks, loss_fn=loss_fn, num_samples=real,
                              num_tokens=tokens, metrics=metrics)

    def loss_mode(self, step: int) -> str:
        """``full_batch`` during the InfoNCE warm-up (steps done < infonce_warmup_steps),
        then ``stage2.mode``."""
        return "full_batch" if step < self.stage2.infonce_warmup_steps else self.stage2.mode

    def negatives_at(self, step: int) -> str:
        """The candidate source at ``step``: ``infonce_warmup_negatives`` during the
        warm-up unless it is ``same``, else ``stage2.negatives``."""
        warmup = self.stage2.infonce_warmup_negatives
        if step < self.stage2.infonce_warmup_steps and warmup != "same":
            return warmup
        return self.stage2.negatives

    def embed(self, engine: Any, chunk: dict[str, torch.Tensor]) -> torch.Tensor:
        return engine(**chunk)  # (n_chunk, D) unit rows

    # -- outputs -----------------------------------------------------------------------------
    def probe(self) -> tuple[list[str], list[bytes | None]]:
        """Texts and images of the export check: the probe rows' queries and positives."""
        sides = [side for row in self.probe_rows for side in (row.query, row.positive)]
        return [side.text for side in sides], [side.image for side in sides]

    def export(self, ctx: loop.WorkerContext, engine: Any) -> dict[str, Any]:
        texts, images = self.probe()
        return loop.export_lora(
            ctx, engine, export_dtype=self.export_dtype, probe_texts=texts,
            probe_images=images, probe_mode=self.stage2.prompt_mode,
            load_fresh=lambda: self.load_model(dtype=torch.float32, device="cpu"))


# -- the driver's reads ---------------------------------------------------------------------------
def pair_keys(shards: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Sorted pair ids of the mined shards (unique) and each one's dataset."""
    dataset_of: dict[str, str] = {}
    for uri in shards:
        table = storage.read_table(uri, columns=["id", "dataset"])
        for pair_id, dataset in zip(table.column("id").to_pylist(),
                                    table.column("dataset").to_pylist(), strict=True):
            if pair_id in dataset_of:
                raise ValueError(f"duplicate pair id {pair_id!r} in the mine_negatives shards")
            dataset_of[pair_id] = dataset
    keys = tuple(sorted(dataset_of))
    return keys, tuple(dataset_of[key] for key in keys)


def check_batch_groups(config: Config, pairs_per_dataset: dict[str, int]) -> None:
    """With ``stage2.batching=per_dataset``, a dataset with fewer pairs than a global batch
    would never be trained on: an error names it."""
    if config.stage2.batching == "mixed":
        return
    size = config.stage2.global_batch_pairs
    small = [f"{name} ({count})" for name, count in sorted(pairs_per_dataset.items())
             if count < size]
    if small:
        raise ConfigError(f"stage2.batching=per_dataset: {', '.join(small)} have fewer pairs "
                          f"than stage2.global_batch_pairs={size} and would never be trained "
                          "on; lower the batch or use stage2.batching=mixed")


def batch_groups(config: Config, datasets: tuple[str, ...]) -> tuple[int, ...]:
    """Per pair: its batch group (``stage2.batching``); () = one mixed group. Refuses a
    dataset too small for one global batch (:func:`check_batch_groups`)."""
    check_batch_groups(config, collections.Counter(datasets))
    if config.stage2.batching == "mixed":
        return ()
    index = {name: i for i, name in enumerate(sorted(set(datasets)))}
    return tuple(index[name] for name in datasets)


def probe_rows(shards: list[str]) -> list[PairRow]:
    """The first rows of the first shard: the export check's probe."""
    table = storage.read_table(shards[0]).slice(0, NUM_PROBE_ROWS)
    rows = decode_pairs(table, mined_negatives=0, given_negatives=0)
    return [rows[i] for i in table.column("id").to_pylist()]


def hard_negative_summary(stage_dir: str) -> dict[str, Any]:
    """Means of the per-step hard-negative statistics over the run, and of the last step."""
    from pipeline.train.metrics import read_metrics

    rows = read_metrics(stage_dir)
    names = ["hn_false_negative_rate", "hn_mean_pos_sim", "hn_mean_neg_sim", "hn_mean_margin",
             "hn_rows_without_negatives", "hn_rows_short"]
    out: dict[str, Any] = {}
    for name in names:
        values = np.array([row[name] for row in rows if name in row], dtype=np.float64)
        if len(values):
            out[name] = {"mean": float(np.nanmean(values)) if np.isfinite(values).any()
                         else None, "last": float(values[-1])}
    return out
