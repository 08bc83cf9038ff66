"""Validation: a ``RawRow`` becomes a canonical row, or a reject with a reason.

Every refusal names the row (id and ``file:line``), the field and the reason (one of
``pipeline.outputs.REJECT_REASONS``), and keeps the raw row as JSON, so that
``rows_in == rows_out + rows_rejected`` and nothing is lost.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pipeline import storage
from pipeline.data.images import ImageDecodeError, PackedImage, PackOptions, content_key, pack_image
from pipeline.data.readers import OutsideRoot, RawRow
from pipeline.data.schemas import IMAGE_PLACEHOLDER


class RowError(Exception):
    """Why one row is refused. Pickles (it crosses Ray task boundaries inside task args)."""

    def __init__(self, reason: str, field: str, detail: str) -> None:
        super().__init__(f"{field}: {reason}: {detail}")
        self.reason, self.field, self.detail = reason, field, detail

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return type(self), (self.reason, self.field, self.detail)


def reject_record(raw: RawRow, err: RowError) -> dict[str, Any]:
    """The ``_rejects`` row for ``raw``."""
    return {"id": raw.id, "source": raw.source, "field": err.field, "reason": err.reason,
            "detail": err.detail, "row_json": json.dumps(raw.values, default=repr,
                                                         ensure_ascii=False)}


class ImageLoader:
    """Reads and packs images by URI, caching within one shard."""

    def __init__(self, options: PackOptions, read: Callable[[str], bytes] = storage.read_bytes
                 ) -> None:
        self.options = options
        self._read = read
        self._cache: dict[str, PackedImage | RowError] = {}

    @property
    def frames_dropped(self) -> int:
        """Frames after the first of the multi-frame images packed so far (each URI once)."""
        return sum(r.frames_dropped for r in self._cache.values() if isinstance(r, PackedImage))

    def load(self, uri: Any, field: str) -> PackedImage:
        uri = image_uri(uri, field)
        if uri not in self._cache:
            self._cache[uri] = self._load_uncached(uri, field)
        result = self._cache[uri]
        if isinstance(result, RowError):
            raise RowError(result.reason, field, result.detail)
        return result

    def _load_uncached(self, uri: str, field: str) -> PackedImage | RowError:
        try:
            raw = self._read(uri)
        except FileNotFoundError:
            return RowError("missing_image", field, f"image not found: {uri}")
        try:
            return pack_image(raw, self.options)
        except ImageDecodeError as err:
            return RowError(err.reason, field, f"{uri}: {err}")


def image_uri(value: Any, field: str) -> str:
    """The URI of a row's image field, or the RowError of a path outside its root or of a
    value that is not a path."""
    if isinstance(value, OutsideRoot):
        raise RowError("path_outside_root", field, f"{value.path!r} resolves outside the image "
                       f"root {value.root} (not opened); put the image under the root or set "
                       "the source's image root to a folder that holds it")
    if not isinstance(value, str):
        raise RowError("wrong_type", field, f"image path must be a string, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------
# Field checks


def check_text(value: Any, field: str, max_chars: int, *, allow_empty: bool = False) -> str:
    if value is None:
        if allow_empty:
            return ""
        raise RowError("missing_field", field, "value is missing")
    if not isinstance(value, str):
        raise RowError("wrong_type", field, f"expected text, got {type(value).__name__} "
                       f"{value!r:.80}")
    if not allow_empty and not value.strip():
        raise RowError("empty_text", field, "text is empty")
    if len(value) > max_chars:
        raise RowError("text_too_long", field, f"{len(value)} characters > {max_chars} "
                       "(data.max_text_chars)")
    return value


def side_text(text: Any, has_image: bool, field: str, max_chars: int) -> str:
    """Text of a query/target side: may be empty when an image stands in for it; the
    image placeholder is present exactly when there is an image."""
    text = check_text(text, field, max_chars, allow_empty=has_image)
    if IMAGE_PLACEHOLDER in text and not has_image:
        raise RowError("placeholder_mismatch", field,
                       f"text contains {IMAGE_PLACEHOLDER} but the row has no image")
    if has_image and IMAGE_PLACEHOLDER not in text:
        text = f"{IMAGE_PLACEHOLDER}\n{text}" if text.strip() else IMAGE_PLACEHOLDER
    if not text.replace(IMAGE_PLACEHOLDER, "").strip() and not has_image:
        raise RowError("empty_text", field, "text is empty")
    return text


def _as_list(value: Any, field: str) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    raise RowError("wrong_type", field, f"expected text or a list, got {value!r:.80}")


def _check_parsed(raw: RawRow) -> None:
    if (error := raw.parse_error) is not None:
        raise RowError(error.reason, error.field, error.detail)
    if raw.duplicate_of is not None:
        raise RowError("duplicate_id", "id", f"id {raw.id!r} first seen at {raw.duplicate_of}")


# ---------------------------------------------------------------------------------------
# Tables


def validate_text_group(raw: RawRow, max_chars: int) -> dict[str, Any]:
    """NLI row -> ``text_groups`` row (anchor, paraphrase, contradiction)."""
    _check_parsed(raw)
    texts = [check_text(t, f"texts[{i}]", max_chars) for i, t in enumerate(raw.texts["texts"])]
    return {"id": raw.id, "texts": texts}


def _side(raw: RawRow, text_field: str, image_field: str, loader: ImageLoader, max_chars: int
          ) -> tuple[str, PackedImage | None]:
    uri = raw.image_uris.get(image_field)
    image = loader.load(uri, image_field) if uri is not None else None
    return side_text(raw.texts.get(text_field), image is not None, text_field, max_chars), image


def validate_pair(raw: RawRow, loader: ImageLoader, max_chars: int) -> dict[str, Any]:
    """MMEB-train / JSONL row -> ``pairs`` row with packed images and the positive's key."""
    _check_parsed(raw)
    if not raw.dataset:
        raise RowError("missing_field", "dataset", "row has no dataset name")
    qry_text, qry_image = _side(raw, "qry_text", "qry_image", loader, max_chars)
    pos_text, pos_image = _side(raw, "pos_text", "pos_image", loader, max_chars)
    neg_texts = _as_list(raw.texts.get("neg_text"), "neg_text")
    neg_uris = _as_list(raw.image_uris.get("neg_image"), "neg_image")
    if neg_texts and neg_uris and len(neg_texts) != len(neg_uris):
        raise RowError("wrong_type", "neg_image", f"{len(neg_uris)} negative images for "
                       f"{len(neg_texts)} negative texts")
    count = max(len(neg_texts), len(neg_uris))
    neg_text, neg_image = [], []
    for i in range(count):
        uri = neg_uris[i] if i < len(neg_uris) else None
        image = loader.load(uri, f"neg_image[{i}]") if uri is not None else None
        text = neg_texts[i] if i < len(neg_texts) else ""
        neg_text.append(side_text(text, image is not None, f"neg_text[{i}]", max_chars))
        neg_image.append(image.data if image else None)
    return {
        "id": raw.id, "dataset": raw.dataset, "source": raw.source,
        "qry_text": qry_text, "qry_image": qry_image.data if qry_image else None,
        "pos_text": pos_text, "pos_image": pos_image.data if pos_image else None,
        "pos_key": content_key(pos_text, pos_image),
        "neg_text": neg_text, "neg_image": neg_image,
    }


def validate_eval(raw: RawRow, image_keys: dict[str, str | RowError], max_chars: int
                  ) -> dict[str, Any]:
    """MMEB-eval row -> ``eval`` row; images are referenced by their packed key."""
    _check_parsed(raw)

    def key_of(uri: Any, field: str) -> str | None:
        if uri is None:
            return None
        result = image_keys[image_uri(uri, field)]
        if isinstance(result, RowError):
            raise RowError(result.reason, field, result.detail)
        return result

    qry_key = key_of(raw.image_uris.get("qry_image"), "qry_img_path")
    qry_text = side_text(raw.texts.get("qry_text"), qry_key is not None, "qry_text", max_chars)
    tgt_texts, tgt_uris = raw.texts.get("tgt_text"), raw.image_uris.get("tgt_image")
    if not isinstance(tgt_texts, list) or not isinstance(tgt_uris, list):
        raise RowError("wrong_type", "tgt_text", "tgt_text and tgt_img_path must be lists")
    if not tgt_texts or len(tgt_texts) != len(tgt_uris):
        raise RowError("bad_candidates", "tgt_text", f"{len(tgt_texts)} candidate texts and "
                       f"{len(tgt_uris)} candidate images (need equal, non-zero counts)")
    keys = [key_of(u, f"tgt_img_path[{i}]") for i, u in enumerate(tgt_uris)]
    texts = [side_text(t, k is not None, f"tgt_text[{i}]", max_chars)
             for i, (t, k) in enumerate(zip(tgt_texts, keys, strict=True))]
    return {"id": raw.id, "dataset": raw.dataset, "source": raw.source, "qry_text": qry_text,
            "qry_image_key": qry_key, "tgt_text": texts, "tgt_image_key": keys}


def eval_image_uris(rows: list[RawRow]) -> list[str]:
    """Distinct image URIs referenced by eval rows, in first-seen order."""
    seen: dict[str, None] = {}
    for raw in rows:
        uris = [raw.image_uris.get("qry_image")]
        tgt = raw.image_uris.get("tgt_image")
        uris += tgt if isinstance(tgt, list) else []
        for uri in uris:
            if isinstance(uri, str):
                seen.setdefault(uri, None)
    return list(seen)
