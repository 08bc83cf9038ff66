"""Readers of the raw source formats into ``RawRow`` records.

Readers only parse: they keep every row (a malformed one carries its parse error) and
resolve image paths to URIs; ``pipeline.data.validate`` decides what is accepted.
A file-level problem (missing file, missing columns) raises ``SourceError`` naming the
file before any heavy work starts.

Formats:
- SimCSE NLI csv: columns ``sent0, sent1, hard_neg`` (anchor, entailment, contradiction).
- MMEB-train: one file per dataset (``.jsonl``, ``.parquet`` or ``.csv``; dataset = file
  stem), columns ``qry, qry_image_path, pos_text, pos_image_path`` and optional
  ``neg_text, neg_image_path``; empty string = no such modality; image placeholder
  ``<|image_1|>``; image paths relative to an image root.
- MMEB-eval: one file per dataset, columns ``qry_text, qry_img_path, tgt_text[],
  tgt_img_path[]``; the ground truth is candidate 0.
- Plain JSONL of pairs: ``id`` (optional), ``dataset``, ``qry_text``, ``qry_image``,
  ``pos_text``, ``pos_image``, optional ``neg_text``/``neg_image`` (string or list).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import posixpath
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from pipeline import storage

logger = logging.getLogger(__name__)

RECORD_SUFFIXES = (".jsonl", ".parquet", ".csv")
MMEB_TRAIN_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
MMEB_TRAIN_OPTIONAL = ("neg_text", "neg_image_path")
MMEB_EVAL_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
NLI_COLUMNS = ("sent0", "sent1", "hard_neg")
PAIRS_JSONL_COLUMNS = ("qry_text", "pos_text")


_SURROGATES = re.compile("[\udc80-\udcff]")


class SourceError(ValueError):
    """A source file is missing, unreadable or has the wrong columns."""


@dataclass
class RawRow:
    """One input row as read: values untouched, image paths resolved to URIs."""

    id: str | None
    source: str                      # "<file>:<row number>" for messages and rejects
    values: dict[str, Any]           # the row's fields as they were in the file
    dataset: str = ""
    texts: dict[str, Any] = field(default_factory=dict)       # canonical name -> raw value
    image_uris: dict[str, Any] = field(default_factory=dict)  # field -> URI | list | None
    parse_error: ParseError | None = None  # set when the row itself could not be read
    duplicate_of: str | None = None  # set by mark_duplicate_ids


# ---------------------------------------------------------------------------------------
# Files of records


def list_record_files(uri: str) -> list[str]:
    """The record files of a source: the file itself, or every known file in a folder."""
    if any(uri.endswith(s) for s in RECORD_SUFFIXES):
        if not storage.exists(uri):
            raise SourceError(f"source file not found: {uri}")
        return [uri]
    files = [f for f in storage.list_files(uri) if f.endswith(RECORD_SUFFIXES)]
    if not files:
        raise SourceError(f"no {'/'.join(RECORD_SUFFIXES)} files in source folder {uri}")
    return files


Records = list[tuple[dict[str, Any] | None, "ParseError | None"]]


def read_records(uri: str) -> Records:
    """Rows of one file as (record, parse error); a row that does not parse keeps its place.
    Bytes that are not UTF-8 make their row's ``bad_encoding`` (never replaced silently);
    CSV rows with more cells than the header are ``extra_cells``; CSV fields of any length
    are read (length is validation's ``text_too_long``)."""
    data = storage.read_bytes(uri)
    if uri.endswith(".parquet"):
        try:
            return [(r, None) for r in pq.read_table(io.BytesIO(data)).to_pylist()]
        except Exception as err:  # noqa: BLE001 - any decode error is a file-level error
            raise SourceError(f"{uri}: not a readable Parquet file: {err}") from err
    # surrogateescape keeps undecodable bytes as lone surrogates, found per row below.
    text = data.decode("utf-8-sig", errors="surrogateescape")
    if uri.endswith(".csv"):
        return [_checked(record, None) for record in _csv_records(text)]
    rows: Records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            rows.append((None, _undecodable(line) or ParseError("wrong_type", "<row>",
                                                                f"invalid JSON: {err}")))
            continue
        if not isinstance(record, dict):
            rows.append((None, ParseError("wrong_type", "<row>", "expected a JSON object, got "
                                          f"{type(record).__name__}")))
            continue
        rows.append(_checked(record, None))
    return rows


@dataclass(frozen=True)
class ParseError:
    """Why a row could not be read as a record (becomes its reject)."""

    reason: str
    field: str
    detail: str


def _csv_records(text: str) -> Iterator[dict[str, Any]]:
    """CSV rows as dicts; cells beyond the header stay under the key None."""
    previous = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)  # length is checked per row, against max_text_chars
    try:
        yield from csv.DictReader(io.StringIO(text))
    finally:
        csv.field_size_limit(previous)


def _undecodable(value: Any, field: str = "<row>") -> ParseError | None:
    """``bad_encoding`` for the first text (in ``value``, recursively) holding bytes that
    were not UTF-8 (lone surrogates from ``surrogateescape``)."""
    if isinstance(value, str):
        if _SURROGATES.search(value) is None:
            return None
        raw = value.encode("utf-8", errors="surrogateescape")
        return ParseError("bad_encoding", field, f"bytes that are not UTF-8: {raw[:60]!r}")
    items = (value.items() if isinstance(value, dict)
             else enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        name = str(key) if field == "<row>" else f"{field}[{key}]"
        if (found := _undecodable(item, name)) is not None:
            return found
    return None


def _checked(record: dict[str, Any], error: ParseError | None
             ) -> tuple[dict[str, Any], ParseError | None]:
    """(record, its parse error): extra CSV cells, then text that was not UTF-8."""
    if error is None and record.get(None):
        error = ParseError("extra_cells", "<row>", f"{len(record[None])} cell(s) beyond the "
                           f"header: {record[None]!r:.120}")
    record = {k if k is not None else "<extra cells>": v for k, v in record.items()}
    return record, error or _undecodable(record)


def _require_columns(uri: str, records: list, required: tuple[str, ...]) -> None:
    """A file whose first good record lacks required columns has the wrong schema."""
    first = next((r for r, _ in records if r is not None), None)
    if first is None:
        return
    missing = [c for c in required if c not in first]
    if missing:
        raise SourceError(f"{uri}: missing column(s) {', '.join(missing)}; expected "
                          f"{', '.join(required)}; found {', '.join(sorted(first))}")


def _dataset_name(uri: str) -> str:
    name = posixpath.basename(uri.rstrip("/"))
    for suffix in RECORD_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


@dataclass(frozen=True)
class OutsideRoot:
    """An image path that resolves outside its image root (rejected, never opened)."""

    path: str
    root: str


def _image_uri(root: str, path: Any) -> Any:
    """The URI of an image path: relative to its root, or absolute inside it; '' / None = no
    image. A path that leaves the root (``..``, an absolute path elsewhere, a symlink that
    points out) gives :class:`OutsideRoot`; a non-string is left for validation."""
    if path is None or path == "":
        return None
    if not isinstance(path, str):
        return path  # validation rejects it as wrong_type
    absolute = storage.is_s3(path) or path.startswith("/")
    uri = _s3_normalized(path if absolute else storage.join(root, path))
    return uri if _inside_root(uri, root) else OutsideRoot(path, root)


def _s3_normalized(uri: str) -> str:
    """An ``s3://`` URI with ``.`` and ``..`` resolved (S3 keys take them literally)."""
    return "s3://" + posixpath.normpath(uri[len("s3://"):]) if storage.is_s3(uri) else uri


def _inside_root(uri: str, root: str) -> bool:
    """``uri`` lies under ``root``: ``..`` resolved; locally also every symlink."""
    if storage.is_s3(uri) or storage.is_s3(root):
        top = _s3_normalized(root).rstrip("/") + "/"
        return storage.is_s3(uri) and storage.is_s3(root) and uri.startswith(top)
    resolved = os.path.realpath(uri.removeprefix("file://"))
    top = os.path.realpath(root.removeprefix("file://"))
    return os.path.commonpath([resolved, top]) == top


def _root_of(uri: str, image_root: str) -> str:
    if image_root:
        return image_root
    if any(uri.endswith(s) for s in RECORD_SUFFIXES):
        return uri.rsplit("/", 1)[0] if "/" in uri else "."
    return uri


# ---------------------------------------------------------------------------------------
# The four source formats


def read_nli_csv(uri: str) -> list[RawRow]:
    """SimCSE NLI csv -> text-group rows (id ``nli:<row>``)."""
    records = read_records(uri)
    _require_columns(uri, records, NLI_COLUMNS)
    return [RawRow(id=f"nli:{i}", source=f"{uri}:{i + 2}", values=r or {}, parse_error=e,
                   texts={"texts": [(r or {}).get(c) for c in NLI_COLUMNS]})
            for i, (r, e) in enumerate(records)]


def _dataset_records(uri: str, required: tuple[str, ...]
                     ) -> Iterator[tuple[str, str, int, dict[str, Any], str | None]]:
    """(file, dataset, row number, record, parse error) of every row of a folder of
    per-dataset files (or one file), after checking each file's columns."""
    for file_uri in list_record_files(uri):
        records = read_records(file_uri)
        _require_columns(file_uri, records, required)
        dataset = _dataset_name(file_uri)
        for i, (record, error) in enumerate(records):
            yield file_uri, dataset, i, record or {}, error


def read_mmeb_train(uri: str, image_root: str = "") -> list[RawRow]:
    """MMEB-train rows (a folder of per-dataset files, or one file) -> pair rows."""
    root = _root_of(uri, image_root)
    rows: list[RawRow] = []
    for file_uri, dataset, i, r, e in _dataset_records(uri, MMEB_TRAIN_COLUMNS):
        images = {"qry_image": _image_uri(root, r.get("qry_image_path")),
                  "pos_image": _image_uri(root, r.get("pos_image_path")),
                  "neg_image": _image_uri(root, r.get("neg_image_path"))}
        texts = {"qry_text": r.get("qry"), "pos_text": r.get("pos_text"),
                 "neg_text": r.get("neg_text", "")}
        rows.append(RawRow(id=f"{dataset}:{i}", source=f"{file_uri}:{i + 1}", values=r,
                           dataset=dataset, texts=texts, image_uris=images, parse_error=e))
    return rows


def read_mmeb_eval(uri: str, image_root: str = "") -> list[RawRow]:
    """MMEB-eval rows -> eval rows (candidate 0 is the ground truth)."""
    root = _root_of(uri, image_root)
    rows: list[RawRow] = []
    for file_uri, dataset, i, r, e in _dataset_records(uri, MMEB_EVAL_COLUMNS):
        tgt_paths = r.get("tgt_img_path")
        tgt_images = ([_image_uri(root, p) for p in tgt_paths]
                      if isinstance(tgt_paths, list) else tgt_paths)
        images = {"qry_image": _image_uri(root, r.get("qry_img_path")),
                  "tgt_image": tgt_images}
        texts = {"qry_text": r.get("qry_text"), "tgt_text": r.get("tgt_text")}
        rows.append(RawRow(id=f"{dataset}:{i}", source=f"{file_uri}:{i + 1}", values=r,
                           dataset=dataset, texts=texts, image_uris=images, parse_error=e))
    return rows


def read_pairs_jsonl(uri: str, image_root: str = "") -> list[RawRow]:
    """Plain JSONL of pairs -> pair rows; ``id`` defaults to ``<dataset>:<line>``."""
    root = _root_of(uri, image_root)
    records = read_records(uri)
    _require_columns(uri, records, PAIRS_JSONL_COLUMNS)
    rows = []
    for i, (r, e) in enumerate(records):
        r = r or {}
        dataset = r.get("dataset") or _dataset_name(uri)
        negs = r.get("neg_image")
        neg_images = ([_image_uri(root, p) for p in negs] if isinstance(negs, list)
                      else _image_uri(root, negs))
        images = {"qry_image": _image_uri(root, r.get("qry_image")),
                  "pos_image": _image_uri(root, r.get("pos_image")),
                  "neg_image": neg_images}
        texts = {"qry_text": r.get("qry_text"), "pos_text": r.get("pos_text"),
                 "neg_text": r.get("neg_text", [])}
        row_id = r.get("id")
        rows.append(RawRow(id=str(row_id) if row_id is not None else f"{dataset}:{i}",
                           source=f"{uri}:{i + 1}", values=r, dataset=str(dataset),
                           texts=texts, image_uris=images, parse_error=e))
    return rows


def mark_duplicate_ids(rows: list[RawRow]) -> int:
    """Mark every row whose id was seen before (the first one wins); return the count."""
    first_source: dict[str, str] = {}
    duplicates = 0
    for row in rows:
        if row.id is None:
            continue
        if row.id in first_source:
            row.duplicate_of = first_source[row.id]
            duplicates += 1
        else:
            first_source[row.id] = row.source
    return duplicates
