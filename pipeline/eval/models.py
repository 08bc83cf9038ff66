"""The models an evaluation compares: ``eval.models`` entries ("label=path", or the run's
special values ``student`` / ``stage1`` / ``stage2``) resolved to folders.

``student`` is ``model.path``, or for ``tiny:<family>`` the folder stage 1 builds
(``pipeline.models.student``): evaluate never builds one itself, so "student" is exactly
stage 1's starting point. ``stage1`` / ``stage2`` are ``<run_root>/<stage>/model``.
"""
from __future__ import annotations

import re

from pipeline import storage
from pipeline.config import Config
from pipeline.eval.embed import ModelRef
from pipeline.models.student import student_folder

SPECIAL_MODELS = ("student", "stage1", "stage2")
_LABEL_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_models(entries: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``["base=student", "stage1", "x=/models/x"]`` -> {label: value}; a bare entry is
    its own label (``stage1``) or, for a path, the folder's name."""
    out: dict[str, str] = {}
    for entry in entries:
        label, sep, value = entry.partition("=")
        if not sep:
            value = label
            label = label if label in SPECIAL_MODELS else label.rstrip("/").rsplit("/", 1)[-1]
        label, value = label.strip(), value.strip()
        if not _LABEL_RE.match(label) or not value:
            raise ValueError(f"eval.models: {entry!r} must look like label=path (label of "
                             "letters, digits, '_', '.', '-') or one of "
                             f"{', '.join(SPECIAL_MODELS)}")
        if label in out:
            raise ValueError(f"eval.models: label {label!r} appears twice")
        out[label] = value
    if not out:
        raise ValueError("eval.models is empty: name at least one model to evaluate")
    return out


def resolve_models(config: Config, models: dict[str, str] | None = None) -> dict[str, ModelRef]:
    """Label -> model, from ``models`` or ``eval.models``; every folder must exist."""
    entries = models if models is not None else parse_models(config.eval.models)
    out = {}
    for label, value in entries.items():
        if not _LABEL_RE.match(label):
            raise ValueError(f"model label {label!r}: use letters, digits, '_', '.', '-'")
        if value == "student":
            continue  # below: a tiny student is built only once the others are known to exist
        ref = ModelRef(storage.absolute_uri(storage.join(config.run_root, value, "model")
                                    if value in ("stage1", "stage2") else value))
        if not storage.exists(ref.path):
            raise FileNotFoundError(f"eval.models: model {label!r} ({value}) not found at "
                                    f"{ref.path}" + (f"; run {value} first" if value in
                                                     ("stage1", "stage2") else ""))
        out[label] = ref
    for label, value in entries.items():
        if value == "student":
            try:
                student = student_folder(config.model, config.run_root)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"eval.models: student model {label!r}: {err}") from err
            out[label] = ModelRef(student.uri, student.family or None)
    return {label: out[label] for label in entries}
