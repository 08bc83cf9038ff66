"""Arrow schemas of every table the pipeline writes (README: outputs).

Column names are a contract: other steps, tests and users read them. Change them only
with a schema-version bump in ``pipeline.outputs.SCHEMA_VERSION``.

Conventions:
- Texts keep MMEB's image placeholder ``<|image_1|>`` where an image goes; each
  backbone family swaps in its own image tokens at encode time.
- Images are packed as encoded bytes (PNG or JPEG, RGB, resized at prepare time).
  A null image means "no image on this side".
- ``*_key`` columns are content hashes (``pipeline.data.hashing``): equal key means equal
  text and equal pixels, so a candidate identical to the positive is never a negative.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.data.conventions import IMAGE_PLACEHOLDER  # noqa: F401  (re-exported)

# One NLI row or text pair: anchor, paraphrase (entailment), contradiction.
TEXT_GROUPS = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("texts", pa.list_(pa.string()), nullable=False),
])


def teacher_schema(dim: int) -> pa.Schema:
    """A text group with one unit-norm float16 teacher vector per text."""
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("texts", pa.list_(pa.string()), nullable=False),
        pa.field("teacher_emb", pa.list_(pa.list_(pa.float16(), dim)), nullable=False),
    ])


def group_table(ids: list[str], texts: list[list[str]], emb: np.ndarray, dim: int) -> pa.Table:
    """``teacher`` rows from groups and their flat (sum of group sizes, D) vectors."""
    sizes = np.array([len(t) for t in texts], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    vectors = vector_array(emb.reshape(-1, dim))                                # (N, D)
    per_group = pa.ListArray.from_arrays(pa.array(offsets), vectors)
    return pa.Table.from_arrays([pa.array(ids, pa.string()),
                                 pa.array(texts, pa.list_(pa.string())), per_group],
                                schema=teacher_schema(dim))


# One query-positive pair of the stage-2 training data (MMEB-train or JSONL).
PAIRS = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("qry_text", pa.string(), nullable=False),
    pa.field("qry_image", pa.binary()),
    pa.field("pos_text", pa.string(), nullable=False),
    pa.field("pos_image", pa.binary()),
    pa.field("pos_key", pa.string(), nullable=False),
    pa.field("neg_text", pa.list_(pa.string()), nullable=False),
    pa.field("neg_image", pa.list_(pa.binary()), nullable=False),
    pa.field("source", pa.string(), nullable=False),
])

# The stage-2 training table: a pair and its mined hard negatives, by reference. A pair's
# payload (query, positive, given negatives) is its row of the pairs table
# (``pair_shard``/``pair_row``); a negative's is the positive of the pairs row that holds its
# target (``neg_shard``/``neg_row``). Read them back with
# :func:`pipeline.data.mined.read_with_negatives`.
MINED = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("pos_key", pa.string(), nullable=False),
    pa.field("pair_shard", pa.int32(), nullable=False),   # the pair's pairs shard
    pa.field("pair_row", pa.int32(), nullable=False),     # and row in it
    pa.field("neg_key", pa.list_(pa.string()), nullable=False),   # best first
    pa.field("neg_score", pa.list_(pa.float32()), nullable=False),
    pa.field("neg_shard", pa.list_(pa.int32()), nullable=False),  # where each negative's
    pa.field("neg_row", pa.list_(pa.int32()), nullable=False),    # payload is (pos_*)
    pa.field("num_given", pa.int32(), nullable=False),    # negatives the data gave (neg_*)
    pa.field("pos_score", pa.float32(), nullable=False),
    pa.field("n_false_neg_dropped", pa.int32(), nullable=False),  # margin + ratio + max_score
    pa.field("n_duplicate_dropped", pa.int32(), nullable=False),  # the positive, its copies
    pa.field("short", pa.bool_(), nullable=False),  # fewer than num_negatives were left
])


def embeddings_schema(dim: int) -> pa.Schema:
    """A query (key = pair id) or a distinct target (key = content key) and its vector.

    Rows are sorted by (kind, dataset) and written in small row groups
    (``mine_negatives.EMBEDDINGS_ROW_GROUP_ROWS``), so a reader of some datasets' targets
    reads only their row groups (:func:`pipeline.data.mined.iter_target_blocks`)."""
    return pa.schema([
        pa.field("kind", pa.string(), nullable=False),      # "query" | "target"
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),        # row in its pairs shard
        pa.field("emb", pa.list_(pa.float16(), dim), nullable=False),
    ])


# One MMEB-format eval query; candidate 0 is the ground truth. Images are referenced by
# content key into EVAL_IMAGES so a candidate shared by many queries is stored once.
EVAL_QUERIES = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("qry_text", pa.string(), nullable=False),
    pa.field("qry_image_key", pa.string()),
    pa.field("tgt_text", pa.list_(pa.string()), nullable=False),
    pa.field("tgt_image_key", pa.list_(pa.string()), nullable=False),
    pa.field("source", pa.string(), nullable=False),
])

# One distinct eval image, packed.
EVAL_IMAGES = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("source", pa.string(), nullable=False),   # the image's URI as referenced
])

TABLES = {
    "text_groups": TEXT_GROUPS,
    "pairs": PAIRS,
    "eval": EVAL_QUERIES,
    "eval_images": EVAL_IMAGES,
}


def vector_array(emb: np.ndarray, value_type: pa.DataType | None = None) -> pa.Array:
    """(N, D) array -> N fixed-size lists of D values (float16 by default; N may be 0)."""
    value_type = value_type or pa.float16()
    flat = pa.array(np.ascontiguousarray(emb).reshape(-1).astype(value_type.to_pandas_dtype()),
                    type=value_type)                                   # (N * D,)
    return pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])       # (N, D)


def vectors_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list vector column -> (N, D) float32, without Python objects."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)             # (N * D,)
    return flat.astype(np.float32).reshape(-1, dim)                    # (N, D)
