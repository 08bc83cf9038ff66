"""The export step: the trained embedder as a self-contained Hugging Face folder with a card.

The source (``export.source``) is a stage's merged model (``stage2`` / ``stage1`` =
``<run_root>/<stage>/model``, the stage must be complete) or any Embedder folder / ``s3://``
prefix. It is loaded on CPU, cast to ``export.dtype`` (auto = as stored) and saved with a
``README.md`` model card (family, pooling, the family's prompts, usage, training settings,
losses, evaluation numbers); the folder is uploaded with ``unime_backbone.json`` last, so a
folder holding it is complete.

Round-trip check: the exported folder is loaded back *from the destination* and must
reproduce, row by row, the embeddings recorded in the stage's ``export_check.json`` (the
model as trained, LoRA unmerged; texts, optional images, prompt mode) to cosine >= 0.9999
for float32 (0.99 for bfloat16 / float16, or the looser threshold that stage itself held
its merged model to). A plain folder without that file is compared with itself on fixed
probe rows instead. A mismatch raises :class:`ExportMismatchError`.

Outputs::

    <export.destination>           default <run_root>/export/model: weights (safetensors),
                                   tokenizer / processor, README.md, unime_backbone.json (last)
    <run_root>/export/_manifest.json   source, destination, dtype, family, min cosine, inputs

A rerun of the same config whose inputs (source folder, export check, evaluation report)
have the same fingerprints, and whose destination is still complete, is skipped.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import download_cache, outputs, provenance, storage
from pipeline.config import Config, ConfigError
from pipeline.data.schemas import IMAGE_PLACEHOLDER
from pipeline.models import META_FILE, Embedder, format_text, get_backbone
from pipeline.outputs import ShardedOutput
from pipeline.train.checkpoint import EXPORT_CHECK_FILE, ExportMismatchError, upload_folder

logger = logging.getLogger(__name__)

STEP = "export"
STAGES = ("stage1", "stage2")
MODEL_DIR = "model"
CARD_FILE = "README.md"
EVAL_REPORT = "evaluate/report.json"
EXACT_MIN_COSINE = 0.9999        # float32 export of a float32 reference
LOW_PRECISION_MIN_COSINE = 0.99  # bfloat16 / float16 on either side
# Probe rows for a plain source folder (no export_check.json): texts, plus one image row.
PROBE_TEXTS = ("A red circle above a blue square.", "two small green triangles",
               "What color is the star?", "A photo of a yellow ellipse on the left.")
PROBE_IMAGE_SIZE_PX = 48
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16",
                       "F64": "float64"}
HEADLINE_METRICS = ("overall_mean_of_metatasks", "overall_mean_of_datasets",
                    "in_distribution_mean", "out_of_distribution_mean", "mean")


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


# -- sources and destinations -------------------------------------------------------------------
def _absolute(uri: str) -> str:
    return uri.rstrip("/") if storage.is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if storage.is_s3(uri) else os.path.dirname(uri)


def _check_file(folder: str) -> str | None:
    uri = storage.join(folder, EXPORT_CHECK_FILE)
    return uri if storage.exists(uri) else None


def resolve_source(config: Config) -> Source:
    """The source model of ``export.source``; a stage must be complete and hold its model."""
    value = config.export.source.strip()
    if value in STAGES:
        stage_folder = _absolute(config.step_dir(value))
        try:
            manifest = outputs.require_complete(stage_folder)
        except outputs.IncompleteOutputError as err:
            raise FileNotFoundError(
                f"export.source={value}: {stage_folder} has no finished {value} output (no "
                f"{outputs.MANIFEST_NAME}); run jobs/{value}.py first, or set export.source "
                "to a model folder") from err
        uri = storage.join(stage_folder, MODEL_DIR)
        if not storage.exists(storage.join(uri, META_FILE)):
            raise FileNotFoundError(f"export.source={value}: {uri} holds no model "
                                    f"({META_FILE} missing); rerun jobs/{value}.py")
        if manifest.get("config_hash") != config.config_hash:
            logger.warning("export: %s was trained by config %.12s, this run is %.12s",
                           stage_folder, manifest.get("config_hash"), config.config_hash)
        return Source(uri, value, manifest, _check_file(stage_folder))
    if not value:
        raise ConfigError("export.source is empty: use stage2, stage1 or a model folder")
    uri = _absolute(value)
    if not storage.exists(uri):
        raise FileNotFoundError(f"export.source={value}: no model folder at {uri}")
    # A stage's model/ folder has its export_check.json beside it.
    check = _check_file(uri) or (_check_file(_parent(uri))
                                 if uri.rstrip("/").endswith("/" + MODEL_DIR) else None)
    return Source(uri, None, None, check)


def _inside(uri: str, folder: str) -> bool:
    """True if ``uri`` is ``folder`` or lies under it (both absolute)."""
    return uri == folder or uri.startswith(folder.rstrip("/") + "/")


def resolve_destination(config: Config, source_uri: str) -> str:
    """``export.destination`` ('' = <run_root>/export/model). The destination is replaced as
    a whole, so it may not hold the source or the run; inside the run folder it must lie
    below ``<run_root>/export/`` (never over another step's outputs)."""
    folder = _absolute(config.step_dir(STEP))
    destination = _absolute(config.export.destination or storage.join(folder, MODEL_DIR))
    run_root = _absolute(config.run_root)
    if _inside(source_uri, destination) or _inside(run_root, destination):
        raise ConfigError(f"export.destination={destination} holds the source model "
                          f"{source_uri} or the run folder, and the destination is replaced "
                          "as a whole; choose another folder")
    if _inside(destination, run_root) and not (_inside(destination, folder)
                                               and destination != folder):
        raise ConfigError(f"export.destination={destination} is inside the run folder but "
                          f"not below {folder}/: it would replace another step's outputs")
    return destination


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


# -- model card ---------------------------------------------------------------------------------
def prompt_examples(family: str) -> list[tuple[str, str]]:
    """(what, final prompt) for the family's one-word and instruction prompts."""
    spec = get_backbone(family)
    rows = [
        ("one_word, text", "A dog running on the beach.", False, "one_word"),
        ("one_word, image", IMAGE_PLACEHOLDER, True, "one_word"),
        ("one_word, image + text", f"{IMAGE_PLACEHOLDER}\nA dog running on the beach.", True,
         "one_word"),
        ("instruction, text", "Find me an everyday image that matches the given caption: "
         "A dog running on the beach.", False, "instruction"),
        ("instruction, image", f"{IMAGE_PLACEHOLDER} Represent the given image with the "
         "following question: What is the dog doing?", True, "instruction"),
    ]
    return [(what, format_text(spec, text, has_image=has_image, mode=mode))
            for what, text, has_image, mode in rows]


def _settings_line(name: str, section: dict[str, Any]) -> str:
    values = ", ".join(f"{key}={value}" for key, value in section.items())
    return f"- `{name}`: {values}"


def training_lines(source: Source, stage_manifests: dict[str, dict[str, Any]]) -> list[str]:
    """The card's training section: losses per stage, then the settings that made it."""
    if source.stage is None:
        return [f"Exported from the folder `{source.uri}`; its training history is not "
                "part of this run."]
    lines = []
    for stage, manifest in stage_manifests.items():
        first, final = manifest.get("first_loss"), manifest.get("final_loss")
        loss = (f"loss {first:.4f} -> {final:.4f}" if first is not None and final is not None
                else "loss not recorded")
        lines.append(f"- {stage}: {manifest.get('steps', '?')} steps, {loss}")
    config = (source.manifest or {}).get("config", {})
    sections = [*stage_manifests, "model", "train"]
    settings = [_settings_line(name, config[name]) for name in sections
                if isinstance(config.get(name), dict)]
    if settings:
        lines += ["", "Settings (from the stage manifests):", "", *settings]
    return lines


def _headline_order(metric: str) -> tuple[int, str, int] | None:
    """Sort key of a headline metric (summary means, then R@K by direction and K), else None."""
    if metric in HEADLINE_METRICS:
        return HEADLINE_METRICS.index(metric), "", 0
    direction, sep, k = metric.partition("_R@")
    return (len(HEADLINE_METRICS), direction, int(k)) if sep and k.isdigit() else None


def eval_lines(report: dict[str, Any] | None, source_uri: str) -> list[str]:
    """The card's evaluation table: headline metrics per eval set, one column per model."""
    if not report or not report.get("results"):
        return ["No evaluation report (run jobs/evaluate.py before exporting to include one)."]
    labels = list(report["results"])
    mine = [lb for lb in labels
            if _absolute(str(report.get("models", {}).get(lb, {}).get("path", ""))) == source_uri]
    header = [f"**{lb}** (this model)" if lb in mine else lb for lb in labels]
    lines = ["Percent, headline numbers of the run's `evaluate/report.json` (every dataset "
             "and the tie rule: `report.md` beside it).", "",
             "| set | metric | " + " | ".join(header) + " |",
             "|---|---|" + "---:|" * len(labels)]
    sets: dict[str, set[str]] = {}
    for label in labels:
        for set_name, values in report["results"][label].items():
            sets.setdefault(set_name, set()).update(m for m in values if _headline_order(m))
    for set_name, names in sets.items():
        for metric in sorted(names, key=_headline_order):
            cells = [report["results"][lb].get(set_name, {}).get(metric) for lb in labels]
            lines.append(f"| {set_name} | {metric} | " + " | ".join(
                "-" if v is None else f"{v:.2f}" for v in cells) + " |")
    if not mine:
        lines += ["", "The exported folder itself is not among the evaluated models."]
    return lines


def model_card(*, family: str, prompt_mode: str, dtype: str, destination: str,
               source: Source, run_name: str,
               stage_manifests: dict[str, dict[str, Any]],
               report: dict[str, Any] | None) -> str:
    """README.md of the exported folder (markdown, about a page)."""
    prompts = []
    for what, prompt in prompt_examples(family):
        prompts += [f"{what}:", "", "```text", prompt, "```", ""]
    lines = [
        f"# UniME embedding model ({family})", "",
        f"A `{family}` multimodal LLM turned into a universal embedding model with the "
        f"two-stage UniME method; run `{run_name}`, exported from `{source.uri}`, weights "
        f"in {dtype}.", "",
        "## Embeddings", "",
        "One vector per input (text, image, or both): the hidden state of the **last token "
        "of the last layer**, with **left padding** (so the last position is every row's "
        "last real token), **L2-normalised**; compare with the dot product (= cosine).", "",
        "## Prompts", "",
        f"Default prompt mode stored in this folder: `{prompt_mode}` (pass `mode=` to "
        "`encode` to change it: `one_word`, `instruction`, `raw`). In input texts the image "
        "goes where `<|image_1|>` stands (in front when absent); it becomes the family's "
        "image token. Examples of the final prompts:", "",
        *prompts,
        "## Usage", "",
        "```python",
        "from pipeline.models import Embedder",
        "",
        f'm = Embedder.from_pretrained("{destination}")  # local folder or s3:// prefix',
        'emb = m.encode(texts=["<|image_1|>", "A dog running on the beach."],',
        '               images=[open("dog.jpg", "rb").read(), None])  # (2, D) unit rows',
        "```", "",
        "## Training", "",
        *training_lines(source, stage_manifests), "",
        "## Evaluation", "",
        *eval_lines(report, source.uri), "",
    ]
    return "\n".join(lines)


def stage_manifests(config: Config, source: Source) -> dict[str, dict[str, Any]]:
    """The finished stages that led to the source model, in training order."""
    if source.stage is None or source.manifest is None:
        return {}
    out: dict[str, dict[str, Any]] = {}
    init = source.manifest.get("config", {}).get("stage2", {}).get("init", "stage1")
    if source.stage == "stage2" and init == "stage1":
        stage1 = outputs.read_manifest(_absolute(config.step_dir("stage1")))
        if stage1 is not None:
            out["stage1"] = stage1
    out[source.stage] = source.manifest
    return out


def read_report(config: Config) -> tuple[str, dict[str, Any] | None]:
    """(URI, content or None) of the run's evaluation report."""
    uri = _absolute(storage.join(config.run_root, *EVAL_REPORT.split("/")))
    return uri, (storage.read_json(uri) if storage.exists(uri) else None)


# -- the step -----------------------------------------------------------------------------------
def input_fingerprints(source: Source, report_uri: str) -> dict[str, Any]:
    """Fingerprints of what the export reads (a changed one means: redo it)."""
    return {"source": provenance.fingerprint(source.uri),
            "export_check": provenance.fingerprint(source.check_uri) if source.check_uri else None,
            "eval_report": (provenance.fingerprint(report_uri) if storage.exists(report_uri)
                            else None)}


def _reuse(folder: str, config: Config, destination: str,
           inputs: dict[str, Any]) -> dict[str, Any] | None:
    manifest = outputs.read_manifest(folder)
    if (manifest is not None and manifest.get("config_hash") == config.config_hash
            and manifest.get("export") == dataclasses.asdict(config.export)
            and manifest.get("destination") == destination and manifest.get("inputs") == inputs
            and storage.exists(storage.join(destination, META_FILE))):
        logger.info("export: complete already at %s (inputs unchanged)", destination)
        return manifest
    return None


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


def export(config: Config) -> dict[str, Any]:
    """Run the export step (or skip it when its inputs are unchanged); returns its manifest."""
    start = time.perf_counter()
    folder = _absolute(config.step_dir(STEP))
    source = resolve_source(config)
    destination = resolve_destination(config, source.uri)
    report_uri, report = read_report(config)
    inputs = input_fingerprints(source, report_uri)
    if (done := _reuse(folder, config, destination, inputs)) is not None:
        return done
    ShardedOutput(folder, config.config_hash, pa.schema([])).claim()
    storage.delete(storage.join(folder, outputs.MANIFEST_NAME))
    stages = stage_manifests(config, source)

    def card(family: str, prompt_mode: str, dtype: str) -> str:
        return model_card(family=family, prompt_mode=prompt_mode, dtype=dtype,
                          destination=destination, source=source, run_name=config.run_name,
                          stage_manifests=stages, report=report)

    result = export_and_check(source, destination, requested_dtype=config.export.dtype,
                              trust_remote_code=config.model.trust_remote_code, card=card)
    return outputs.write_manifest(folder, {
        "rows_in": 1, "rows_out": 1, "rows_rejected": 0, "rejects_by_reason": {},
        "config_hash": config.config_hash, "seconds": round(time.perf_counter() - start, 3),
        "source": source.uri, "source_stage": source.stage,
        "source_config_hash": (source.manifest or {}).get("config_hash"),
        "destination": destination, **result, "card": CARD_FILE,
        "export": dataclasses.asdict(config.export), "inputs": inputs,
        "config": config.to_dict(),
    })


def export_and_check(source: Source, destination: str, *, requested_dtype: str,
                     trust_remote_code: bool,
                     card: Callable[[str, str, str], str]) -> dict[str, Any]:
    """Cast and save the source with its card, upload it, check the uploaded copy.

    ``card(family, prompt_mode, dtype)`` returns the README. Returns the manifest fields:
    dtype, stored_dtype, family, prompt_mode, embedding_dim, files, bytes, check, min_cosine.
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
        upload_folder(out_dir, destination, last=META_FILE)
        shutil.rmtree(out_dir)
        logger.info("export: %s (%s, %s) -> %s", source.uri, info["family"], dtype, destination)
        worst = round_trip(destination, probe, dtype=dtype,
                           trust_remote_code=trust_remote_code, scratch=scratch)
    return {"dtype": dtype, "stored_dtype": stored, **info, "min_cosine": worst,
            "check": {"kind": probe.kind, "rows": len(probe.texts), "mode": probe.mode,
                      "threshold": probe.threshold, "uri": source.check_uri}}


def format_summary(manifest: dict[str, Any], folder: str) -> str:
    check = manifest["check"]
    return (f"export -> {manifest['destination']}  ({manifest['seconds']:.1f} s; manifest in "
            f"{folder})\n{manifest['family']} model from {manifest['source_stage'] or 'folder'} "
            f"{manifest['source']} as {manifest['dtype']} (stored {manifest['stored_dtype']}), "
            f"{manifest['bytes'] / 2**20:.1f} MiB; round trip over {check['rows']} "
            f"{check['kind']} rows: min cosine {manifest['min_cosine']:.6f} (>= "
            f"{check['threshold']}); card {manifest['card']}")
