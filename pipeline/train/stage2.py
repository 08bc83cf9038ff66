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
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline import storage
from pipeline.config import Config, ConfigError, Stage2Config
from pipeline.models.student import StudentSource
from pipeline.train import loop
from pipeline.train.lora import attach_lora, check_lora_only, parameter_counts, train_mode
from pipeline.train.rows import (
    ROW_BITS,
    ROW_MASK,
    RowBatch,
    RowSource,
    pointer_codes,
    source_from_shards,
)

logger = logging.getLogger(__name__)

KIND_QUERY, KIND_POSITIVE, KIND_NEGATIVE, KIND_PADDING = 0, 1, 2, 3
NUM_PROBE_ROWS = 4
STAT_NAMES = ("num_candidates", "dropped_duplicate", "dropped_margin", "dropped_ratio",
              "rows_with_false_negative", "rows_short", "rows_without_negatives",
              "mean_pos_sim", "mean_neg_sim", "mean_margin")
PAIR_COLUMNS = ("id", "qry_text", "qry_image", "pos_text", "pos_image", "pos_key", "neg_text",
                "neg_image")  # what a worker reads of a pair's own row of the pairs table
TARGET_COLUMNS = ("pos_text", "pos_image", "pos_key")  # of a mined negative's target row
REFERENCE_COLUMNS = ["id", "dataset", "pair_shard", "pair_row", "neg_shard", "neg_row",
                     "num_given"]  # what the driver reads of the mined table


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


def decode_pairs(own: pa.Table, negatives: pa.Table, negative_counts: Sequence[int], *,
                 given_negatives: int) -> list[PairRow]:
    """Pairs rows (``PAIR_COLUMNS``) and their mined negatives' target rows
    (``TARGET_COLUMNS``, row after row, ``negative_counts[i]`` for row i, best first) ->
    PairRows with those mined and the first ``given_negatives`` given negatives."""
    cols = {name: own.column(name).to_pylist() for name in PAIR_COLUMNS}
    neg = {name: negatives.column(name).to_pylist() if negatives.num_rows else []
           for name in TARGET_COLUMNS}
    out, offset = [], 0
    for i, row_id in enumerate(cols["id"]):
        pos_image = cols["pos_image"][i]
        query = Side(cols["qry_text"][i], cols["qry_image"][i] or None, 0)
        positive = Side(cols["pos_text"][i], pos_image or None, key_code(cols["pos_key"][i]))
        mined = range(offset, offset + int(negative_counts[i]))
        offset += len(mined)
        sides = [Side(neg["pos_text"][j], neg["pos_image"][j] or None,
                      key_code(neg["pos_key"][j])) for j in mined]
        given = zip(cols["neg_text"][i][:given_negatives],
                    cols["neg_image"][i][:given_negatives], strict=True)
        sides += [Side(text, image or None, _given_key(text, image or None, positive,
                                                       pos_image or None))
                  for text, image in given]
        out.append(PairRow(row_id, query, positive, tuple(sides)))
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


def sort_items(items: list[Side], layout: np.ndarray) -> tuple[list[Side], np.ndarray]:
    """Items (and their layout rows) ordered by modality, then text length: the gradient
    cache's chunks then hold items of one kind and similar length (less padding). The loss
    reads the layout, so any order gives the same loss."""
    order = sorted(range(len(items)), key=lambda i: (items[i].image is not None,
                                                     len(items[i].text)))
    return [items[i] for i in order], layout[order]


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
    queries = _in_row_order(kind, row, KIND_QUERY, num_rows)     # (B,)
    positives = _in_row_order(kind, row, KIND_POSITIVE, num_rows)  # (B,)
    q_emb, pos_emb = global_emb[queries], global_emb[positives]  # (B, D), (B, D)
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
        q_emb, pos_emb, pos_keys=key[positives], negatives=negatives,
        num_hard_negatives=stage2.num_hard_negatives, temperature=stage2.temperature,
        fn_margin=stage2.fn_margin, fn_ratio=stage2.fn_ratio, mode=mode or stage2.mode, **neg)
    if metrics is not None:
        values = stats.as_dict()
        metrics.update({f"hn_{name}": float(values[name]) for name in STAT_NAMES})
        metrics["hn_false_negative_rate"] = values["rows_with_false_negative"] / num_rows
        metrics["hn_full_batch"] = float((mode or stage2.mode) == "full_batch")
    return loss


def _in_row_order(kind: torch.Tensor, row: torch.Tensor, which: int,
                  num_rows: int) -> torch.Tensor:
    """(B,) item indices of kind ``which`` ordered by global row; each row exactly once."""
    index = (kind == which).nonzero().squeeze(1)  # (B,)
    index = index[torch.argsort(row[index])]
    if not torch.equal(row[index], torch.arange(num_rows, device=row.device)):
        raise RuntimeError("stage 2: the gathered items do not hold each row's query and "
                           "positive once")
    return index


def gathered_loss(global_emb: torch.Tensor, *, layout: torch.Tensor, device: torch.device,
                  **kwargs: Any) -> torch.Tensor:
    """:func:`global_loss` after gathering every rank's item layout (on the training
    thread: ``make_step`` runs ahead in the prefetch thread)."""
    global_layout = loop.all_gather_no_grad(layout.to(device))  # (N, 4)
    return global_loss(global_emb, layout=global_layout, **kwargs)


def padding_ratio(chunks: list[dict[str, torch.Tensor]]) -> float:
    """Positions embedded / real tokens over the chunks (1.0 = no padding)."""
    real = sum(int(chunk["attention_mask"].sum()) for chunk in chunks)
    return sum(chunk["attention_mask"].numel() for chunk in chunks) / max(1, real)


# -- the stage plug-in -----------------------------------------------------------------------------
class Stage2Spec:
    """:class:`pipeline.train.loop.StageSpec` of stage 2."""

    key_column = "id"

    def __init__(self, settings: loop.LoopSettings, *, init: StudentSource,
                 config: Config, probe_rows: list[PairRow],
                 row_negatives: np.ndarray | None = None) -> None:
        self.settings = settings
        self.row_negatives = row_negatives  # (N,) negatives each sorted key carries
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
    def decode_rows(self, batch: RowBatch) -> list[PairRow]:
        return decode_pairs(batch.own, batch.refs, batch.ref_counts,
                            given_negatives=self.stage2.given_negatives)

    def make_step(self, ctx: loop.WorkerContext, module: torch.nn.Module,
                  rows: list[PairRow], positions: np.ndarray | None = None) -> loop.StepBatch:
        mode, negatives = self.loss_mode(ctx.step), self.negatives_at(ctx.step)
        slots = self.slots_for(negatives)
        items, layout = flatten_rows(rows, rank=ctx.rank, negative_slots=slots,
                                     num_items=self.num_items(ctx, rows, positions, slots))
        items, layout = sort_items(items, layout)
        chunks = [module.prepare([item.text for item in piece], [item.image for item in piece],
                                 mode=self.stage2.prompt_mode)
                  for piece in loop.chunk_rows(items, ctx.settings.train.grad_cache_chunk_size)]
        metrics: dict[str, float] = {"pad_ratio": padding_ratio(chunks)}
        loss_fn = functools.partial(gathered_loss, layout=torch.from_numpy(layout),
                                    device=ctx.device, num_rows=len(rows) * ctx.world_size,
                                    negative_slots=slots, stage2=self.stage2, mode=mode,
                                    negatives=negatives, metrics=metrics)
        tokens = sum(int(chunk["attention_mask"].sum()) for chunk in chunks)
        real = int((layout[:, 0] != KIND_PADDING).sum())
        return loop.StepBatch(chunks=chunks, loss_fn=loss_fn, num_samples=real,
                              num_tokens=tokens, metrics=metrics)

    def num_items(self, ctx: loop.WorkerContext, rows: list[PairRow],
                  positions: np.ndarray | None, slots: int) -> int:
        """Items every rank embeds this step (the largest rank's count; the others pad):
        computed from every rank's rows' negative counts, so no collective is needed."""
        if positions is None or self.row_negatives is None:
            if ctx.world_size > 1:
                raise ValueError("stage 2 on several ranks needs the batch's positions and "
                                 "the rows' negative counts")
            return 2 * len(rows) + sum(min(len(r.negatives), slots) for r in rows)
        per_rank = np.minimum(self.row_negatives[positions], slots).reshape(ctx.world_size, -1)
        return int(2 * per_rank.shape[1] + per_rank.sum(axis=1).max())

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
@dataclasses.dataclass(frozen=True)
class MinedIndex:
    """What the driver reads of the mined table: small columns only."""

    keys: tuple[str, ...]        # sorted pair ids
    datasets: tuple[str, ...]    # each key's dataset
    pointers: np.ndarray         # (N, 1 + mined_negatives) codes into the pairs shards
    row_negatives: np.ndarray    # (N,) negatives each key carries (mined + given, capped)


def read_mined_index(shards: list[str], *, mined_negatives: int,
                     given_negatives: int) -> MinedIndex:
    """The keys of the mined shards (unique), their datasets and where their pair and their
    first ``mined_negatives`` negatives are in the pairs table."""
    import pyarrow.compute as pc

    tables = [storage.read_table(uri, columns=REFERENCE_COLUMNS) for uri in shards]
    if not tables:
        return MinedIndex((), (), np.zeros((0, 1 + mined_negatives), np.int64),
                          np.zeros(0, np.int64))
    table = pa.concat_tables(tables).combine_chunks()
    order = pc.sort_indices(table.column("id")).to_numpy()  # (N,) by id
    ids = table.column("id").take(pa.array(order))
    duplicate = pc.equal(ids[1:], ids[:-1]) if len(ids) > 1 else pa.array([], pa.bool_())
    if pc.any(duplicate).as_py():
        first = int(np.flatnonzero(duplicate.to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"duplicate pair id {ids[first].as_py()!r} in the mine_negatives shards")
    own = pointer_codes(table.column("pair_shard").to_numpy(), table.column("pair_row").to_numpy())
    negs = _first_pointers(table.column("neg_shard").chunk(0), table.column("neg_row").chunk(0),
                           mined_negatives)  # (N, M)
    given = np.minimum(table.column("num_given").to_numpy(), given_negatives)
    pointers = np.concatenate([own[:, None], negs], axis=1)[order]  # (N, 1 + M)
    carried = ((pointers[:, 1:] >= 0).sum(axis=1) + given[order]).astype(np.int64)
    datasets = table.column("dataset").combine_chunks().take(pa.array(order)).dictionary_encode()
    names = datasets.dictionary.to_pylist()  # one str per dataset, shared by its rows
    return MinedIndex(tuple(ids.to_pylist()),
                      tuple(names[i] for i in datasets.indices.to_numpy()), pointers, carried)


def _first_pointers(shards: pa.ListArray, rows: pa.ListArray, count: int) -> np.ndarray:
    """(N, count) pointer codes of the first ``count`` entries of each row's lists, -1 past
    their end (no per-row Python lists)."""
    offsets = shards.offsets.to_numpy()  # (N + 1,)
    flat_shards, flat_rows = shards.flatten().to_numpy(), rows.flatten().to_numpy()
    out = np.full((len(shards), count), -1, dtype=np.int64)
    for j in range(count):
        has = np.flatnonzero(offsets[1:] - offsets[:-1] > j)  # rows with a (j+1)-th entry
        at = offsets[has] + j
        out[has, j] = pointer_codes(flat_shards[at], flat_rows[at])
    return out


def pairs_source(pairs_shards: list[str], index: MinedIndex) -> RowSource:
    """Where a worker reads each pair and its negatives' targets (the pairs table)."""
    return source_from_shards(pairs_shards, PAIR_COLUMNS, index.pointers, TARGET_COLUMNS)


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


def probe_rows(source: RowSource) -> list[PairRow]:
    """The pairs of the first sorted keys: the export check's probe."""
    from pipeline.data.mined import read_rows

    codes = source.pointers[:NUM_PROBE_ROWS, 0]
    folder = source.shards[0].rsplit("/", 1)[0]
    table = read_rows(folder, np.stack([codes >> ROW_BITS, codes & ROW_MASK], axis=1),
                      list(PAIR_COLUMNS))
    return decode_pairs(table, table.slice(0, 0).select([]), [0] * table.num_rows,
                        given_negatives=0)


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
