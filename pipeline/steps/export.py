"""Step 7, export: the trained embedder as a self-contained Hugging Face folder with a card.

The source (``export.source``) is a stage's merged model (``stage2`` / ``stage1`` =
``<run_root>/<stage>/model``, the stage must be complete) or any Embedder folder / ``s3://``
prefix. :func:`pipeline.models.export.export_and_check` casts and saves it with its card
(:mod:`pipeline.models.card`), uploads it and checks the uploaded copy against the
embeddings of the model as trained. No Ray needed.

Outputs::

    <export.destination>           default <run_root>/export/model: weights (safetensors),
                                   tokenizer / processor, README.md, unime_backbone.json (last)
    <run_root>/export/_manifest.json   source, destination, dtype, family, min cosine, inputs

A rerun of the same step identity whose inputs (source folder, export check, evaluation
report) have the same fingerprints, and whose destination is still complete, is skipped.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from pipeline import outputs, provenance, storage
from pipeline.config import Config, ConfigError
from pipeline.steps import base

logger = logging.getLogger(__name__)

NAME = "export"
READS = ("export", "model.trust_remote_code", "model.path")  # model.path: card base_model
USES_RAY = False
STAGES = ("stage1", "stage2")
EVAL_REPORT = "report.json"  # of evaluate, in the card when present


def inputs(config: Config) -> tuple[str, ...]:
    source = config.export.source.strip()
    return (source,) if source in STAGES else ()


def input_reason(config: Config, parent: str) -> str:
    return f"export.source={parent}"


def check(config: Config) -> None:
    """Nothing to refuse beyond the config's own validation."""


def check_sources(config: Config) -> None:
    """A folder ``export.source`` exists."""
    value = config.export.source.strip()
    if value not in STAGES and not storage.exists(storage.absolute_uri(value)):
        raise FileNotFoundError(f"export.source={value}: no model folder at {storage.absolute_uri(value)}")


def resolve_source(config: Config) -> Any:
    """The source model of ``export.source``; a stage must be complete and hold its model."""
    from pipeline.models import META_FILE
    from pipeline.models.export import MODEL_DIR, Source, check_file

    value = config.export.source.strip()
    if value in STAGES:
        manifest = base.input_manifest(config, NAME, value)
        stage_folder = storage.absolute_uri(base.input_dir(config, NAME, value))
        uri = storage.join(stage_folder, MODEL_DIR)
        if not storage.exists(storage.join(uri, META_FILE)):
            raise FileNotFoundError(f"export.source={value}: {uri} holds no model "
                                    f"({META_FILE} missing); rerun jobs/{value}.py")
        return Source(uri, value, manifest, check_file(stage_folder))
    if not value:
        raise ConfigError("export.source is empty: use stage2, stage1 or a model folder")
    check_sources(config)
    uri = storage.absolute_uri(value)
    # A stage's model/ folder has its export_check.json beside it.
    parent = uri.rstrip("/").rsplit("/", 1)[0]
    check = check_file(uri) or (check_file(parent)
                                if uri.rstrip("/").endswith("/" + MODEL_DIR) else None)
    return Source(uri, None, None, check)


def _inside(uri: str, folder: str) -> bool:
    """True if ``uri`` is ``folder`` or lies under it (both absolute)."""
    return uri == folder or uri.startswith(folder.rstrip("/") + "/")


def resolve_destination(config: Config, source_uri: str) -> str:
    """``export.destination`` ('' = <run_root>/export/model). The destination is replaced as
    a whole, so it may not hold the source or the run; inside the run folder it must lie
    below ``<run_root>/export/`` (never over another step's outputs)."""
    from pipeline.models.export import MODEL_DIR

    folder = storage.absolute_uri(config.step_dir(NAME))
    destination = storage.absolute_uri(config.export.destination or storage.join(folder, MODEL_DIR))
    run_root = storage.absolute_uri(config.run_root)
    if _inside(source_uri, destination) or _inside(run_root, destination):
        raise ConfigError(f"export.destination={destination} holds the source model "
                          f"{source_uri} or the run folder, and the destination is replaced "
                          "as a whole; choose another folder")
    if _inside(destination, run_root) and not (_inside(destination, folder)
                                               and destination != folder):
        raise ConfigError(f"export.destination={destination} is inside the run folder but "
                          f"not below {folder}/: it would replace another step's outputs")
    return destination


def stage_manifests(config: Config, source: Any) -> dict[str, dict[str, Any]]:
    """The finished stages that led to the source model, in training order."""
    if source.stage is None or source.manifest is None:
        return {}
    out: dict[str, dict[str, Any]] = {}
    init = source.manifest.get("config", {}).get("stage2", {}).get("init", "stage1")
    if source.stage == "stage2" and init == "stage1":
        stage1 = outputs.read_manifest(storage.absolute_uri(config.step_dir("stage1")))
        if stage1 is not None:
            out["stage1"] = stage1
    out[source.stage] = source.manifest
    return out


def read_report(config: Config) -> tuple[str, dict[str, Any] | None]:
    """(URI, content or None) of the run's evaluation report."""
    uri = storage.absolute_uri(storage.join(config.step_dir("evaluate"), EVAL_REPORT))
    return uri, (storage.read_json(uri) if storage.exists(uri) else None)


def input_fingerprints(source: Any, report_uri: str) -> dict[str, Any]:
    """Fingerprints of what the export reads (a changed one means: redo it)."""
    return {"source": provenance.fingerprint(source.uri),
            "export_check": provenance.fingerprint(source.check_uri) if source.check_uri else None,
            "eval_report": (provenance.fingerprint(report_uri) if storage.exists(report_uri)
                            else None)}


def _reuse(folder: str, owner: str, destination: str,
           fingerprints: dict[str, Any]) -> dict[str, Any] | None:
    from pipeline.models import META_FILE

    manifest = outputs.read_manifest(folder)
    if (manifest is not None and manifest.get("step_hash") == owner
            and manifest.get("destination") == destination
            and manifest.get("inputs") == fingerprints
            and storage.exists(storage.join(destination, META_FILE))):
        logger.info("export: complete already at %s (inputs unchanged)", destination)
        return manifest
    return None


def run(config: Config) -> dict[str, Any]:
    """Export (or skip it when its inputs are unchanged); returns the manifest."""
    from pipeline.models.card import CardMeta, model_card
    from pipeline.models.export import CARD_FILE, export_and_check

    start = time.perf_counter()
    folder = storage.absolute_uri(config.step_dir(NAME))
    owner = base.step_hash(config, NAME)
    source = resolve_source(config)
    destination = resolve_destination(config, source.uri)
    report_uri, report = read_report(config)
    fingerprints = input_fingerprints(source, report_uri)
    if (done := _reuse(folder, owner, destination, fingerprints)) is not None:
        return done
    base.claim(config, NAME, folder)
    storage.delete(storage.join(folder, outputs.MANIFEST_NAME))
    stages = stage_manifests(config, source)
    meta = CardMeta(base_model=config.export.base_model or config.model.path,
                    license=config.export.license, datasets=config.export.datasets)

    def card(family: str, prompt_mode: str, dtype: str) -> str:
        return model_card(family=family, prompt_mode=prompt_mode, dtype=dtype,
                          destination=destination, source=source, run_name=config.run_name,
                          stage_manifests=stages, report=report, meta=meta)

    result = export_and_check(source, destination, requested_dtype=config.export.dtype,
                              trust_remote_code=config.model.trust_remote_code, card=card)
    return outputs.write_manifest(folder, {
        "rows_in": 1, "rows_out": 1, "rows_rejected": 0, "rejects_by_reason": {},
        **base.manifest_fields(config, NAME), "seconds": round(time.perf_counter() - start, 3),
        "source": source.uri, "source_stage": source.stage,
        "source_config_hash": (source.manifest or {}).get("config_hash"),
        "destination": destination, **result, "card": CARD_FILE,
        "export": dataclasses.asdict(config.export), "inputs": fingerprints,
        "config": config.to_dict(),
    })


def summarize(manifest: dict[str, Any], folder: str) -> str:
    check = manifest["check"]
    return (f"export -> {manifest['destination']}  ({manifest['seconds']:.1f} s; manifest in "
            f"{folder})\n{manifest['family']} model from {manifest['source_stage'] or 'folder'} "
            f"{manifest['source']} as {manifest['dtype']} (stored {manifest['stored_dtype']}), "
            f"{manifest['bytes'] / 2**20:.1f} MiB; round trip over {check['rows']} "
            f"{check['kind']} rows: min cosine {manifest['min_cosine']:.6f} (>= "
            f"{check['threshold']}); card {manifest['card']}")
