"""A trained model as a self-contained Hugging Face folder, checked by a round trip (the work
of the export step, :mod:`pipeline.steps.export`; the model card is :mod:`pipeline.models.card`).

The source is loaded on CPU, cast to the requested dtype (auto = as stored) and saved with
its card; the folder is uploaded with ``unime_backbone.json`` last, so a folder holding it
is complete. Round-trip check: the exported folder is loaded back *from the destination*
and must reproduce, row by row, the embeddings recorded in the stage's
``export_check.json`` (the model as trained, LoRA unmerged; texts, optional images, prompt
mode) to cosine >= 0.9999 for float32 (0.99 for bfloat16 / float16, or the looser threshold
that stage itself held its merged model to). A plain folder without that file is compared
with itself on fixed probe rows instead. A mismatch raises :class:`ExportMismatchError`.

The folder also loads without this repository: :func:`check_loaders` encodes probe rows
(texts, images, images with text) through ``Embedder.from_pretrained``,
``sentence_transformers.SentenceTransformer`` (the folder's ``modules.json``: last-token
pooling, normalisation, prompts via the processor's chat template) and plain transformers
(``AutoProcessor`` + ``AutoModel`` as the model card spells it out) and requires the same
vectors from each.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import download_cache, storage
from pipeline.data.conventions import IMAGE_PLACEHOLDER
from pipeline.models.embedder import Embedder
from pipeline.models.inputs import ImageInput, auto_loader_blocker, load_image
from pipeline.models.loading import META_FILE, default_device
from pipeline.train.checkpoint import ExportMismatchError

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
CARD_FILE = "README.md"
EXACT_MIN_COSINE = 0.9999        # float32 export of a float32 reference
LOW_PRECISION_MIN_COSINE = 0.99  # bfloat16 / float16 on either side
# Probe rows for a plain source folder (no export_check.json): texts, plus one image row.
PROBE_TEXTS = ("A red circle above a blue square.", "two small green triangles",
               "What color is the star?", "A photo of a yellow ellipse on the left.")
PROBE_IMAGE_SIZE_PX = 48
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16",
                       "F64": "float64"}


@dataclasses.dataclass(frozen=True)
class Source:
    """The model to export and what the run knows about it."""

    uri: str                      # the model folder (absolute local path or s3:// prefix)
    stage: str | None             # stage1 / stage2, None for a plain folder
    manifest: dict[str, Any] | None  # the stage's _manifest.json
    check_uri: str | None         # its export_check.json, when there is one


@dataclasses.dataclass(frozen=True)
class Probe:
    """Rows the exported model must reproduce, and how closely."""

    texts: list[str]
    images: list[bytes | None] | None
    mode: str | None              # prompt mode; None = the folder's default
    reference: torch.Tensor | None  # (P, D) expected unit rows; None = the source's own
    threshold: float
    kind: str                     # "export_check" or "probe_rows"


def check_file(folder: str) -> str | None:
    """The ``export_check.json`` a training stage wrote beside its model, if any."""
    from pipeline.train.checkpoint import EXPORT_CHECK_FILE

    uri = storage.join(folder, EXPORT_CHECK_FILE)
    return uri if storage.exists(uri) else None


# -- dtypes ------------------------------------------------------------------------------------
def stored_dtype(local_dir: str | Path) -> str:
    """Dtype of most floating weight elements in the folder's safetensors files."""
    counts: Counter[str] = Counter()
    files = sorted(Path(local_dir).glob("*.safetensors"))
    for path in files:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name != "__metadata__" and info["dtype"] in _SAFETENSORS_DTYPES:
                numel = 1
                for size in info["shape"]:
                    numel *= size
                counts[_SAFETENSORS_DTYPES[info["dtype"]]] += numel
    if not counts:
        raise FileNotFoundError(f"{local_dir}: no floating weights in *.safetensors "
                                f"({len(files)} file(s)); is it a model folder?")
    return counts.most_common(1)[0][0]


def export_dtype(requested: str, stored: str) -> str:
    """The dtype to write: ``requested`` or, for auto, as stored."""
    return stored if requested == "auto" else requested


def min_cosine_for(*dtypes: str) -> float:
    """0.9999 when every side is float32 (or wider), else 0.99."""
    exact = all(d in ("float32", "float64") for d in dtypes)
    return EXACT_MIN_COSINE if exact else LOW_PRECISION_MIN_COSINE


# -- round-trip probe ---------------------------------------------------------------------------
def read_probe(check_uri: str, dtype: str) -> Probe:
    """The rows of an ``export_check.json`` and the trained model's vectors."""
    check = storage.read_json(check_uri)
    texts, emb = check.get("texts"), check.get("trained_emb")
    images = check.get("images")
    if (not isinstance(texts, list) or not isinstance(emb, list) or len(texts) != len(emb)
            or not texts or (images is not None and len(images) != len(texts))):
        raise ValueError(f"{check_uri}: expected non-empty 'texts' and 'trained_emb' (and "
                         "'images' when present) of the same length; rerun the stage")
    decoded = None if images is None else [None if image is None else base64.b64decode(image)
                                           for image in images]
    threshold = min(min_cosine_for(dtype), float(check.get("threshold", EXACT_MIN_COSINE)))
    return Probe(list(texts), decoded, check.get("mode"), torch.tensor(emb, dtype=torch.float32),
                 threshold, "export_check")


def probe_image() -> bytes:
    """A fixed RGB gradient as PNG bytes (the image row of the plain-folder probe)."""
    ramp = np.linspace(0, 255, PROBE_IMAGE_SIZE_PX, dtype=np.float64)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 255 - ramp[None, :]),
                      axis=-1).astype(np.uint8)  # (H, W, 3)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return out.getvalue()


def source_probe(dtype: str, stored: str) -> Probe:
    """Fixed probe rows for a source folder without ``export_check.json``."""
    texts = [*PROBE_TEXTS, IMAGE_PLACEHOLDER]
    images: list[bytes | None] = [None] * len(PROBE_TEXTS) + [probe_image()]
    return Probe(texts, images, None, None, min_cosine_for(dtype, stored), "probe_rows")


def encode_probe(local_dir: str | Path, probe: Probe, *, dtype: str,
                 trust_remote_code: bool) -> torch.Tensor:
    """(P, D) vectors of the probe rows by the model in ``local_dir`` (GPU when present)."""
    embedder = Embedder.from_pretrained(local_dir, dtype=dtype,
                                        trust_remote_code=trust_remote_code)
    emb = embedder.encode(probe.texts, probe.images, mode=probe.mode)  # (P, D)
    del embedder  # the next model may need the memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return emb


def row_cosines(emb: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(P,) cosine of each row with its reference row."""
    if emb.shape != reference.shape:
        raise ValueError(f"exported vectors {tuple(emb.shape)} vs reference "
                         f"{tuple(reference.shape)}")
    return F.cosine_similarity(emb.float(), reference.float(), dim=-1)  # (P,)


def _local_copy(uri: str, scratch: str) -> str:
    """A fresh local copy of an s3:// folder (never the shared cache: it may be stale after a
    rerun overwrote the prefix); a local folder as is."""
    if not storage.is_s3(uri):
        return uri
    return download_cache.download_to_cache(uri, cache_dir=scratch)


def round_trip(destination: str, probe: Probe, *, dtype: str, trust_remote_code: bool,
               scratch: str) -> float:
    """Min cosine of the exported folder (read back from ``destination``) vs the probe."""
    local = _local_copy(destination, os.path.join(scratch, "check"))
    emb = encode_probe(local, probe, dtype=dtype, trust_remote_code=trust_remote_code)
    cosine = row_cosines(emb, probe.reference)  # (P,)
    worst = float(cosine.min())
    if worst < probe.threshold:
        bad = [i for i, c in enumerate(cosine.tolist()) if c < probe.threshold]
        raise ExportMismatchError(
            f"the exported model at {destination} does not reproduce the {probe.kind} "
            f"embeddings: min cosine {worst:.6f} < {probe.threshold} (rows {bad[:5]}, e.g. "
            f"{probe.texts[bad[0]][:60]!r})")
    logger.info("export: round trip of %d probe rows from %s: min cosine %.6f (>= %s)",
                len(probe.texts), destination, worst, probe.threshold)
    return worst


def write_folder(local_src: str, out_dir: str, *, dtype: str,
                 trust_remote_code: bool, card: Callable[[str, str], str]) -> dict[str, Any]:
    """Load on CPU in ``dtype``, save into ``out_dir`` with ``card(family, prompt_mode)`` as
    README.md; returns family, prompt mode, dim and the folder's file count and bytes."""
    embedder = Embedder.from_pretrained(local_src, dtype=dtype, device="cpu",
                                        trust_remote_code=trust_remote_code)
    info = {"family": embedder.spec.family, "prompt_mode": embedder.prompt_mode,
            "embedding_dim": embedder.embedding_dim()}
    embedder.save_pretrained(out_dir)
    del embedder
    Path(out_dir, CARD_FILE).write_text(card(info["family"], info["prompt_mode"]))
    files = [p for p in Path(out_dir).rglob("*") if p.is_file()]
    return {**info, "files": len(files), "bytes": sum(p.stat().st_size for p in files)}


# -- the three ways to load an exported folder ----------------------------------------------
def loader_probe() -> tuple[list[str], list[bytes | None]]:
    """Probe rows of every input kind: texts, images alone, images with text."""
    image = probe_image()
    texts = [*PROBE_TEXTS[:2], IMAGE_PLACEHOLDER, PROBE_TEXTS[2],
             f"{IMAGE_PLACEHOLDER}\n{PROBE_TEXTS[3]}"]
    return texts, [None, None, image, image, image]


def row_kind(text: str, image: ImageInput) -> str:
    """text, image (no text besides the placeholder) or image+text."""
    if image is None:
        return "text"
    return "image+text" if text.replace(IMAGE_PLACEHOLDER, "").strip() else "image"


def sentence_transformers_inputs(texts: Sequence[str], images: Sequence[ImageInput]
                                 ) -> list[Any]:
    """Embedder rows as sentence-transformers inputs: a text, a PIL image, or a dict
    ``{"image": ..., "text": ...}`` (the text may hold ``<|image_1|>``, as for the Embedder)."""
    rows: list[Any] = []
    for text, image in zip(texts, images, strict=True):
        kind, pil = row_kind(text, image), load_image(image)
        rows.append(text if kind == "text" else pil if kind == "image"
                    else {"image": pil, "text": text})
    return rows


def encode_sentence_transformers(local_dir: str | Path, texts: Sequence[str],
                                 images: Sequence[ImageInput], *, mode: str | None,
                                 dtype: str, device: str,
                                 trust_remote_code: bool = False) -> torch.Tensor:
    """(P, D) vectors of the rows by ``SentenceTransformer(local_dir)``."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(local_dir), device=device, local_files_only=True,
                                trust_remote_code=trust_remote_code,
                                model_kwargs={"dtype": dtype})
    kwargs = {} if mode is None else {"processing_kwargs": {"chat_template": {"prompt_mode": mode}}}
    emb = model.encode(sentence_transformers_inputs(texts, images), convert_to_tensor=True,
                       batch_size=16, **kwargs)  # (P, D)
    return emb.float().cpu()


def encode_transformers(local_dir: str | Path, texts: Sequence[str],
                        images: Sequence[ImageInput], *, mode: str | None, dtype: str,
                        device: str, trust_remote_code: bool = False) -> torch.Tensor:
    """(P, D) vectors by plain transformers, as the model card spells it out: the chat
    template renders each row's prompt, the processor left-pads, and the embedding is the
    L2-normalised last hidden state at the last position."""
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(local_dir, trust_remote_code=trust_remote_code)
    model = AutoModel.from_pretrained(local_dir, dtype=dtype,
                                      trust_remote_code=trust_remote_code).to(device).eval()
    pils = [load_image(image) for image in images]
    conversations = [[{"role": "user", "content": [{"type": "image"}] * (pil is not None)
                       + [{"type": "text", "text": text}]}]
                     for text, pil in zip(texts, pils, strict=True)]
    prompts = processor.apply_chat_template(conversations, **(
        {} if mode is None else {"prompt_mode": mode}))
    present = [pil for pil in pils if pil is not None]  # one per image row, in row order
    batch = processor(text=prompts, images=present or None, padding=True, padding_side="left",
                      return_tensors="pt").to(device).to(model.dtype)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (P, L, D)
    return F.normalize(hidden[:, -1].float(), dim=-1).cpu()  # (P, D)


def check_loaders(path: str | Path, probe_texts: Sequence[str] | None = None,
                  probe_images: Sequence[ImageInput] | None = None, *,
                  mode: str | None = None, reference: torch.Tensor | None = None,
                  dtype: str | None = None, threshold: float | None = None,
                  device: str | None = None, trust_remote_code: bool = False
                  ) -> dict[str, Any]:
    """Load an exported folder three ways (``Embedder.from_pretrained``,
    ``SentenceTransformer``, plain transformers as in the card), encode the probe rows with
    each and compare row by row with ``reference`` (default: the Embedder's own vectors).

    ``path``: a local folder or an ``s3://`` prefix (copied fresh into a temporary folder).
    Rows default to :func:`loader_probe` (texts, images, images with text). ``dtype``
    defaults to the stored one, ``threshold`` to 0.9999 (float32) or 0.99. A loader that
    cannot run here (Qwen's AutoProcessor without torchvision; Phi-3.5-V) is skipped with a
    WARNING, its reason recorded.
    Returns ``{"min_cosine": {loader: float}, "skipped": {loader: reason}, "threshold",
    "rows": {kind: count}, "mode"}``; raises ExportMismatchError when a loader falls below.
    """
    if probe_texts is None:
        texts, images = loader_probe()
    else:
        texts = list(probe_texts)
        images = list(probe_images) if probe_images is not None else [None] * len(texts)
    with tempfile.TemporaryDirectory(prefix="unime-loaders-") as scratch:
        local = Path(_local_copy(str(path), scratch))  # s3://: a fresh copy, never the cache
        dtype = dtype or stored_dtype(local)
        threshold = min_cosine_for(dtype) if threshold is None else threshold
        vectors, skipped = encode_with_loaders(local, texts, images, mode=mode, dtype=dtype,
                                               device=str(default_device(device)),
                                               trust_remote_code=trust_remote_code)
    reference = vectors["embedder"] if reference is None else reference
    cosines = {name: float(row_cosines(emb, reference).min()) for name, emb in vectors.items()}
    result = {"min_cosine": cosines, "skipped": skipped, "threshold": threshold, "mode": mode,
              "rows": dict(Counter(row_kind(t, i) for t, i in zip(texts, images, strict=True)))}
    bad = {name: round(c, 6) for name, c in cosines.items() if c < threshold}
    if bad:
        raise ExportMismatchError(f"{path}: loaders {bad} do not reproduce the reference "
                                  f"vectors (min cosine < {threshold}; all: {cosines})")
    logger.info("export: loaders of %s agree: %s", path, cosines)
    return result


def encode_with_loaders(local_dir: Path, texts: list[str], images: list[ImageInput], *,
                        mode: str | None, dtype: str, device: str, trust_remote_code: bool
                        ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({loader: (P, D) vectors}, {skipped loader: reason}), one model in memory at a time."""
    kwargs = dict(mode=mode, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    embedder = Embedder.from_pretrained(local_dir, dtype=dtype, device=device,
                                        trust_remote_code=trust_remote_code)
    blocker, family = auto_loader_blocker(embedder.spec), embedder.spec.family
    vectors = {"embedder": embedder.encode(texts, images, mode=mode)}  # (P, D)
    del embedder
    skipped: dict[str, str] = {}
    for name, encode in (("sentence_transformers", encode_sentence_transformers),
                         ("transformers", encode_transformers)):
        if blocker:
            skipped[name] = blocker
            logger.warning("export: %s loader of the %s folder %s skipped: %s", name, family,
                           local_dir, blocker)
            continue
        start = time.perf_counter()
        vectors[name] = encode(local_dir, texts, images, **kwargs)  # (P, D)
        if torch.cuda.is_available():  # the next model may need the memory
            torch.cuda.empty_cache()
        logger.info("export: %s loader encoded %d rows in %.1fs", name, len(texts),
                    time.perf_counter() - start)
    return vectors, skipped


def export_and_check(source: Source, destination: str, *, requested_dtype: str,
                     trust_remote_code: bool,
                     card: Callable[[str, str, str], str]) -> dict[str, Any]:
    """Cast and save the source with its card, upload it, check the uploaded copy.

    ``card(family, prompt_mode, dtype)`` returns the README. Returns the manifest fields:
    dtype, stored_dtype, family, prompt_mode, embedding_dim, files, bytes, check, min_cosine,
    loaders (:func:`check_loaders`: the three loaders' min cosines).
    """
    with tempfile.TemporaryDirectory(prefix="unime-export-") as scratch:
        local_src = _local_copy(source.uri, os.path.join(scratch, "source"))
        stored = stored_dtype(local_src)
        dtype = export_dtype(requested_dtype, stored)
        probe = (read_probe(source.check_uri, dtype) if source.check_uri
                 else source_probe(dtype, stored))
        if probe.reference is None:  # the source's own vectors, before any cast
            probe = dataclasses.replace(probe, reference=encode_probe(
                local_src, probe, dtype=stored, trust_remote_code=trust_remote_code))
        out_dir = os.path.join(scratch, MODEL_DIR)
        info = write_folder(local_src, out_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                            card=lambda family, mode: card(family, mode, dtype))
        storage.upload_folder(out_dir, destination, last=META_FILE)
        shutil.rmtree(out_dir)
        logger.info("export: %s (%s, %s) -> %s", source.uri, info["family"], dtype, destination)
        worst = round_trip(destination, probe, dtype=dtype,
                           trust_remote_code=trust_remote_code, scratch=scratch)
    # The same folder through sentence-transformers and plain transformers (the card's
    # recipe), on texts, images and images with text: each must give the Embedder's vectors.
    loaders = check_loaders(destination, dtype=dtype, trust_remote_code=trust_remote_code)
    return {"dtype": dtype, "stored_dtype": stored, **info, "min_cosine": worst,
            "loaders": loaders,
            "check": {"kind": probe.kind, "rows": len(probe.texts), "mode": probe.mode,
                      "threshold": probe.threshold, "uri": source.check_uri}}
