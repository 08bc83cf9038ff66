"""Eval sets as rows of references to distinct items (what gets embedded).

An *item* is one thing to embed: a prompt mode, a text and optionally an image, given as
a key into the prepared ``eval_images`` table or as an image URI (caption sets, packed
by the embedding worker at ``data.image_size``). :class:`Items` keeps each distinct item
once, so a candidate shared by a thousand MMEB queries, or a caption repeated across
images, is embedded once per model.

Three kinds of eval set, each read into :class:`EvalSet` rows holding the indices of the
items they need in a fixed order (:func:`field_name` names each position, for rejects):

- ``mmeb``: the prepared ``eval`` table (``pipeline.data.schemas.EVAL_QUERIES``); items
  = query, then the candidates (candidate 0 = the ground truth); group = dataset.
- ``sugarcrepe``: a folder of ``<category>.json`` = ``{"0": {"filename", "caption",
  "negative_caption"}, ...}``; items = image, caption, negative caption; group = category.
- ``retrieval``: one Karpathy-style JSON (``{"images": [{"filename", "filepath"?,
  "split", "sentences": [{"raw"}, ...]}]}``, Flickr30K / COCO / long-caption sets);
  one row per image; items = image, then its captions.
"""
from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import outputs, provenance, storage
from pipeline.config import Config
from pipeline.data.schemas import IMAGE_PLACEHOLDER

logger = logging.getLogger(__name__)

# Texts of the caption sets (SugarCrepe, retrieval) per prompt mode: an image side is the
# image alone (one_word / raw) or with the VLM2Vec target instruction; a caption is the
# caption alone or with the VLM2Vec text->image instruction.
IMAGE_TEXT = {"one_word": IMAGE_PLACEHOLDER, "raw": IMAGE_PLACEHOLDER,
              "instruction": f"{IMAGE_PLACEHOLDER}\nRepresent the given image."}
CAPTION_PREFIX = {"one_word": "", "raw": "",
                  "instruction": "Find me an everyday image that matches the given caption: "}


@dataclass(frozen=True)
class Item:
    """One distinct input to embed."""

    mode: str                          # prompt mode: instruction | one_word | raw
    text: str                          # with <|image_1|> where the image goes
    image: tuple[str, str] | None      # ("key", eval_images key) | ("uri", image URI)


class Items:
    """Distinct items in first-seen order."""

    def __init__(self) -> None:
        self.index: dict[Item, int] = {}
        self.items: list[Item] = []

    def add(self, item: Item) -> int:
        if item not in self.index:
            self.index[item] = len(self.items)
            self.items.append(item)
        return self.index[item]

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class EvalRow:
    """One input row of an eval set and the items it needs, by field name."""

    id: str
    source: str
    group: str                               # dataset (mmeb) or category (sugarcrepe)
    items: np.ndarray                        # (F,) int64 item indices, in set order
    payload: dict[str, Any] = field(default_factory=dict)  # for rejects (no binaries)


@dataclass
class EvalSet:
    name: str                                # "mmeb" | "sugarcrepe" | "retrieval"
    rows: list[EvalRow]
    inputs: dict[str, Any]                   # fingerprints of the files read


def _indices(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def field_name(set_name: str, position: int) -> str:
    """The input field behind position ``position`` of a row's items."""
    if set_name == "mmeb":
        return "qry_text" if position == 0 else f"tgt_text[{position - 1}]"
    if set_name == "sugarcrepe":
        return ("filename", "caption", "negative_caption")[position]
    return "filename" if position == 0 else f"sentences[{position - 1}]"


# ---------------------------------------------------------------------------------------
# MMEB-format: the prepared eval table


def eval_image_rows(folder: str) -> dict[str, tuple[str, int]]:
    """eval_images key -> (shard URI, row); reads only the key column."""
    rows: dict[str, tuple[str, int]] = {}
    for uri in outputs.shard_uris(folder):
        keys = storage.read_table(uri, columns=["key"]).column("key").to_pylist()
        for i, key in enumerate(keys):
            rows.setdefault(key, (uri, i))
    return rows


def read_mmeb(eval_folder: str, items: Items, mode: str) -> EvalSet:
    """The prepared MMEB-format queries as rows over ``items``."""
    def item(text: str, key: str | None) -> int:
        return items.add(Item(mode, text, ("key", key) if key else None))

    rows = []
    for uri in outputs.shard_uris(eval_folder):
        for r in storage.read_table(uri).to_pylist():
            idx = [item(r["qry_text"], r["qry_image_key"])]
            idx += [item(t, k) for t, k in zip(r["tgt_text"], r["tgt_image_key"], strict=True)]
            payload = {k: r[k] for k in ("id", "dataset", "qry_text", "qry_image_key")}
            payload["num_candidates"] = len(r["tgt_text"])
            rows.append(EvalRow(r["id"], r["source"], r["dataset"], _indices(idx), payload))
    return EvalSet("mmeb", rows, {"eval": provenance.fingerprint(eval_folder)})


# ---------------------------------------------------------------------------------------
# SugarCrepe and Karpathy-style caption retrieval


def _image_uri(root: str, *parts: str) -> str:
    path = posixpath.join(*[p for p in parts if p])
    return path if storage.is_s3(path) or path.startswith("/") else storage.join(root, path)


def read_sugarcrepe(folder: str, image_root: str, items: Items, mode: str) -> EvalSet:
    """Every ``<category>.json`` of ``folder``: image vs caption vs negative caption."""
    files = storage.list_files(folder, ".json")
    if not files:
        raise FileNotFoundError(f"no <category>.json files in the SugarCrepe folder {folder} "
                                "(eval.sugarcrepe)")
    rows = []
    for uri in files:
        category = posixpath.basename(uri)[:-len(".json")]
        entries = storage.read_json(uri)
        for key in sorted(entries, key=lambda k: (len(k), k)):
            e = entries[key]
            missing = [k for k in ("filename", "caption", "negative_caption") if k not in e]
            if missing:
                raise ValueError(f"{uri} entry {key!r}: missing {', '.join(missing)}")
            image = items.add(Item(mode, IMAGE_TEXT[mode],
                                   ("uri", _image_uri(image_root, e["filename"]))))
            pos = items.add(Item(mode, CAPTION_PREFIX[mode] + e["caption"], None))
            neg = items.add(Item(mode, CAPTION_PREFIX[mode] + e["negative_caption"], None))
            rows.append(EvalRow(f"{category}:{key}", f"{uri}#{key}", category,
                                _indices([image, pos, neg]), dict(e)))
    return EvalSet("sugarcrepe", rows, {"sugarcrepe": [provenance.fingerprint(f) for f in files]})


def read_retrieval(json_uri: str, image_root: str, split: str, items: Items,
                   mode: str) -> EvalSet:
    """Images of ``split`` ('' = all) of a Karpathy-style caption file, with their captions."""
    data = storage.read_json(json_uri)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_uri}: expected a Karpathy-style JSON object with an "
                         "'images' list (eval.retrieval_json)")
    rows = []
    for position, entry in enumerate(data["images"]):
        if split and entry.get("split") != split:
            continue
        uri = _image_uri(image_root, entry.get("filepath", ""), entry["filename"])
        idx = [items.add(Item(mode, IMAGE_TEXT[mode], ("uri", uri)))]
        idx += [items.add(Item(mode, CAPTION_PREFIX[mode] + s["raw"], None))
                for s in entry.get("sentences", [])]
        row_id = str(entry.get("imgid", entry.get("cocoid", position)))
        payload = {"filename": entry["filename"], "split": entry.get("split"),
                   "sentences": [s["raw"] for s in entry.get("sentences", [])]}
        rows.append(EvalRow(row_id, f"{json_uri}#images[{position}]", "", _indices(idx),
                            payload))
    if not rows:
        raise ValueError(f"{json_uri}: no images with split {split!r} (eval.retrieval_split)")
    return EvalSet("retrieval", rows, {"retrieval": provenance.fingerprint(json_uri)})


# -- the sets of a run ------------------------------------------------------------------------
def _caption_source(config: Config, value: str, images: str, demo_rel: str,
                    key: str) -> tuple[str, str] | None:
    """(source URI, image root) of a caption set, the demo world's, or None (skipped)."""
    if value == "off" or (not value and not config.data.use_demo_world):
        logger.info("evaluate: %s skipped (%s=%r)", key, key, value)
        return None
    if value:
        value = storage.absolute_uri(value)
        root = value.rsplit("/", 1)[0] if value.endswith(".json") else value
        return value, storage.absolute_uri(images or root)
    from pipeline.data.prepare import ensure_demo_world

    root = storage.absolute_uri(storage.join(config.run_root, "sources", "demo_world"))
    ensure_demo_world(root, config)
    return storage.join(root, *demo_rel.split("/")), storage.absolute_uri(images or root)


def read_sets(config: Config, items: Items) -> tuple[list[EvalSet], dict[str, Any]]:
    """The eval sets present, as rows over ``items``; and the eval_images row index."""
    sets, image_rows = [], {}
    prepared = storage.absolute_uri(config.step_dir("prepare_data"))
    eval_folder = storage.join(prepared, "eval")
    if not config.eval.mmeb:
        logger.info("evaluate: MMEB-format sets skipped (eval.mmeb=false)")
    elif outputs.is_complete(eval_folder):
        images_folder = storage.join(prepared, "eval_images")
        outputs.require_complete(images_folder)
        image_rows = eval_image_rows(images_folder)
        sets.append(read_mmeb(eval_folder, items, config.eval.prompt_mode))
    elif outputs.is_complete(prepared):
        logger.warning("evaluate: prepare_data has no eval table (no data.sources.mmeb_eval): "
                       "MMEB-format sets skipped")
    else:
        outputs.require_complete(eval_folder)  # raises: run prepare_data first
    mode = config.eval.caption_prompt_mode
    source = _caption_source(config, config.eval.sugarcrepe, config.eval.sugarcrepe_images,
                             "sugarcrepe", "eval.sugarcrepe")
    if source:
        sets.append(read_sugarcrepe(*source, items, mode))
    source = _caption_source(config, config.eval.retrieval_json, config.eval.retrieval_images,
                             "retrieval/captions.json", "eval.retrieval_json")
    if source:
        sets.append(read_retrieval(*source, config.eval.retrieval_split, items, mode))
    if not sets:
        raise ValueError("nothing to evaluate: no prepared MMEB-format eval table and no "
                         "eval.sugarcrepe / eval.retrieval_json")
    return sets, image_rows
