"""The student backbone of a run (``model.*``): where it is, and the tiny one built once.

``model.path`` is a local folder, an ``s3://`` prefix (downloaded once per node), or
``tiny:<family>``: a random-weight tiny model of that family, built once (by stage 1, which
knows the texts its tokenizer is trained on) in a local temporary folder and copied to
``<run_root>/models/tiny-<family>`` (local or S3, ``unime_backbone.json`` last), with
``_source.json`` recording the seed and the digest of the texts (a different one is
rebuilt, never reused). Stage 2 (``stage2.init=student``) and evaluate (``student``) read
that same folder and never build one themselves.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile

from pipeline import storage
from pipeline.config import ConfigError, ModelConfig

logger = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
TINY_FAMILIES = ("llava_next", "qwen2_vl", "qwen2_5_vl")
TINY_SOURCE_FILE = "_source.json"


@dataclasses.dataclass(frozen=True)
class StudentSource:
    """Where a backbone is and how to load it."""

    uri: str                 # absolute local path or s3:// prefix
    family: str              # '' = detect from the folder
    trust_remote_code: bool


def tiny_family(model: ModelConfig) -> str | None:
    """The family of a ``tiny:<family>`` model.path, else None."""
    return model.path[len(TINY_PREFIX):] if model.path.startswith(TINY_PREFIX) else None


def tiny_dir(run_root: str, family: str) -> str:
    """Where the run's tiny student of ``family`` is built."""
    return storage.join(run_root, "models", f"tiny-{family}")


def check_model(model: ModelConfig) -> None:
    """Refuse a student setting that cannot load, naming the key (no I/O)."""
    from pipeline.models.loading import check_remote_code
    from pipeline.models.registry import get_backbone

    family = model.family
    tiny = tiny_family(model)
    if tiny is not None:
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


def check_model_exists(model: ModelConfig) -> None:
    """A folder model.path exists (a tiny one is built by stage 1)."""
    if tiny_family(model) is None and not storage.exists(model.path):
        raise FileNotFoundError(f"model.path: {model.path} does not exist")


def student_folder(model: ModelConfig, run_root: str) -> StudentSource:
    """The student as the run has it: model.path, or the tiny folder stage 1 builds (which
    must exist: FileNotFoundError names stage 1)."""
    family = tiny_family(model)
    if family is None:
        check_model_exists(model)
        return StudentSource(storage.absolute_uri(model.path), model.family,
                             model.trust_remote_code)
    from pipeline.models import META_FILE

    uri = tiny_dir(run_root, family)
    if not storage.exists(storage.join(uri, META_FILE)):
        raise FileNotFoundError(f"the tiny student (model.path={model.path}) is built by "
                                f"stage1 at {uri}; run jobs/stage1.py first")
    return StudentSource(storage.absolute_uri(uri), family, model.trust_remote_code)


def build_student(model: ModelConfig, run_root: str, *, seed: int,
                  vocab_texts: tuple[str, ...]) -> StudentSource:
    """The student's folder, building a ``tiny:<family>`` one when it is missing or was
    built from other inputs (seed, tokenizer texts)."""
    family = tiny_family(model)
    if family is None:
        return student_folder(model, run_root)
    from pipeline.models import META_FILE, build_tiny_model

    uri = tiny_dir(run_root, family)
    source = {"family": family, "seed": seed, "vocab_sha256": hashlib.sha256(
        json.dumps(vocab_texts).encode()).hexdigest()}
    source_uri = storage.join(uri, TINY_SOURCE_FILE)
    current = storage.read_json(source_uri) if storage.exists(source_uri) else None
    if current != source or not storage.exists(storage.join(uri, META_FILE)):
        if current is not None:
            logger.warning("tiny student at %s was built from other inputs: rebuilding", uri)
        with tempfile.TemporaryDirectory(prefix="unime-tiny-") as tmp:
            build_tiny_model(family, tmp, seed=seed, vocab_texts=vocab_texts)
            with open(f"{tmp}/{TINY_SOURCE_FILE}", "w") as f:
                json.dump(source, f, sort_keys=True)
            storage.upload_folder(tmp, uri, last=META_FILE)
        logger.info("tiny %s student built at %s", family, uri)
    return StudentSource(storage.absolute_uri(uri), family, model.trust_remote_code)
