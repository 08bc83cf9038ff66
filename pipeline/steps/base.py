"""What a step is, what identifies its outputs, and how steps find each other's outputs.

A step is a module of :mod:`pipeline.steps` with the same small shape::

    NAME = "stage2"                      # its folder <run_root>/<NAME>/ and jobs/<NAME>.py
    READS = ("model", "train", "stage2")  # config sections / dotted keys that change its outputs
    USES_RAY = True                      # whether its job starts or joins Ray

    def inputs(config) -> tuple[str, ...]     # the steps whose outputs it reads (for this config)
    def check(config) -> None                 # all it can refuse without Ray or data: ConfigError
    def run(config) -> dict                   # the work (or the finished outputs); its manifest
    def summarize(manifest, folder) -> str    # one screen for the terminal

and, where it has them::

    def check_sources(config) -> None  # inputs that are no step's outputs (a source file, a
                                       # model folder) exist: FileNotFoundError names the key
    def preflight(config) -> None      # checks against upstream manifests (cheap reads):
                                       # e.g. per-dataset pair counts against the batch

**Identity.** A step's hash (:func:`step_hash`) is the sha256 of its name, the hashed values
of the config keys it ``READS`` and the hashes of its inputs. Changing a stage-2 knob changes
only the stage-2 hash (and those of the steps that read stage 2: evaluate, export), so
prepare, teacher, stage 1 and mining are reused; changing a prepare knob changes every hash
downstream. Each step folder records its identity in ``_job.json`` (written first) and its
manifest (``step_hash``, written last).

**Freshness.** An input is usable when its folder holds a manifest whose ``step_hash`` is the
one this config expects (:func:`require_inputs`); otherwise the job stops before Ray with one
line naming the step to run. A step folder of another identity is *stale*: the runners
(``jobs/<step>.py``, ``run_all``) replace it (:func:`replace_stale`, a warning names what
changed); the steps' ``run`` functions themselves refuse to write into it
(:class:`pipeline.outputs.OutputConflictError`).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any

from pipeline import outputs, storage
from pipeline.config import Config, hashed_value
from pipeline.outputs import describe_changes

logger = logging.getLogger(__name__)

ORDER = ("prepare_data", "teacher_embed", "stage1", "mine_negatives", "stage2", "evaluate",
         "export")


class MissingInputError(FileNotFoundError):
    """An input step has not run (or not finished) for this config; names the job to run."""


class StaleInputError(storage.StorageError):
    """An input step's outputs were made with other settings; names the job to rerun."""


def get(name: str) -> ModuleType:
    """The step module ``pipeline.steps.<name>``."""
    if name not in ORDER:
        raise KeyError(f"unknown step {name!r}; steps: {', '.join(ORDER)}")
    return importlib.import_module(f"pipeline.steps.{name}")


# -- identity ---------------------------------------------------------------------------------
def identity(config: Config, name: str) -> dict[str, Any]:
    """What makes a step's outputs what they are: its settings and its inputs' hashes."""
    step = get(name)
    ident = {"step": name,
             "settings": {key: hashed_value(config, key) for key in step.READS},
             "inputs": {parent: step_hash(config, parent) for parent in step.inputs(config)}}
    if getattr(step, "TABLE_VERSION", 1) != 1:  # a new layout of the step's output table
        ident["table_version"] = step.TABLE_VERSION
    return ident


@functools.lru_cache(maxsize=256)
def step_hash(config: Config, name: str) -> str:
    """sha256 of :func:`identity` (canonical JSON): equal hash = same outputs."""
    payload = json.dumps(identity(config, name), sort_keys=True, separators=(",", ":"),
                         default=list)
    return hashlib.sha256(payload.encode()).hexdigest()


def job_record(config: Config, name: str) -> dict[str, Any]:
    """What ``_job.json`` keeps beside the owner hash: the step, its identity, the run."""
    return {"step": name, "identity": identity(config, name), "config_hash": config.config_hash}


def ray_run_name(config: Config, name: str) -> str:
    """Ray Train's run name of a training step: ``<name>-<step>-<hash>``, so a relaunch of
    the same step settings finds its checkpoints whatever changed downstream."""
    return f"{config.name}-{name}-{step_hash(config, name)[:10]}"


# -- inputs -----------------------------------------------------------------------------------
def input_dir(config: Config, step: str, parent: str) -> str:
    """The output folder of ``parent`` as read by ``step``: it must be a declared input."""
    if parent not in get(step).inputs(config):
        raise ValueError(f"step {step} reads {parent}, which it does not declare as an input")
    return config.step_dir(parent)


def input_manifest(config: Config, step: str, parent: str, folder: str | None = None
                   ) -> dict[str, Any]:
    """The manifest of a declared input (of its step folder, or of ``folder`` inside it,
    e.g. one table of prepare_data), refused when missing, unfinished or stale. A manifest
    without a ``step_hash`` (written by hand, or by an earlier version) is taken with a
    warning: there is nothing to compare."""
    folder = folder or input_dir(config, step, parent)
    return _fresh(config, step, parent, folder, outputs.read_manifest(folder))


def _fresh(config: Config, step: str, parent: str, folder: str,
           manifest: dict[str, Any] | None) -> dict[str, Any]:
    """``manifest`` (read from ``folder``) when it is there and this config's, else the
    error that names the job to run."""
    if manifest is None:
        started = storage.exists(storage.join(folder, outputs.JOB_FILE))
        reason = getattr(get(step), "input_reason", None)
        why = f" ({reason(config, parent)})" if reason else ""
        raise MissingInputError(
            f"{step} needs the outputs of {parent}{why} at {folder}, which "
            f"{'did not finish' if started else 'has not run'}: run jobs/{parent}.py first "
            "(or jobs/run_all.py)")
    expected = step_hash(config, parent)
    if "step_hash" not in manifest:
        logger.warning("%s: %s has no step_hash: cannot tell whether it matches this config",
                       step, folder)
    elif manifest["step_hash"] != expected:
        changed = describe_changes(manifest.get("identity"), identity(config, parent))
        raise StaleInputError(
            f"{step} needs the outputs of {parent} at {folder}, but they were made with other "
            f"settings ({changed}): rerun jobs/{parent}.py first (or jobs/run_all.py)")
    return manifest


def require_inputs(config: Config, step: str | ModuleType) -> dict[str, dict[str, Any]]:
    """Every declared input's manifest (each read once); the first missing or stale one
    raises (one line, naming the job to run). No Ray needed."""
    module = get(step) if isinstance(step, str) else step
    manifests = {parent: outputs.read_manifest(config.step_dir(parent))
                 for parent in module.inputs(config)}
    missing = [parent for parent, manifest in manifests.items() if manifest is None]
    if len(missing) > 1:
        jobs = " and ".join(f"jobs/{parent}.py" for parent in missing)
        raise MissingInputError(f"{module.NAME} needs the outputs of {', '.join(missing)} under "
                                f"{config.run_root}, which have not run: run {jobs} first "
                                "(or jobs/run_all.py)")
    return {parent: _fresh(config, module.NAME, parent, config.step_dir(parent), manifest)
            for parent, manifest in manifests.items()}


def hook(step: Any, name: str) -> Callable[[Config], None]:
    """A step's optional hook (``check_sources``, ``preflight``), or a no-op."""
    return getattr(step, name, None) or (lambda config: None)


def upstream_manifest(config: Config, name: str) -> dict[str, Any] | None:
    """The manifest of step ``name`` when it is complete and fresh for this config, else
    None (for preflight checks that need only what is already there)."""
    manifest = outputs.read_manifest(config.step_dir(name))
    if manifest is None or manifest.get("step_hash") != step_hash(config, name):
        return None
    return manifest


# -- the step's own folder --------------------------------------------------------------------
def manifest_fields(config: Config, name: str) -> dict[str, Any]:
    """Identity fields every step manifest carries (beside the required counts)."""
    return {"config_hash": config.config_hash, "step_hash": step_hash(config, name),
            "identity": identity(config, name)}


def finished(config: Config, name: str, folder: str | None = None,
             owner: str | None = None) -> dict[str, Any] | None:
    """The manifest of the step's finished outputs when they are this identity's; None when
    the folder holds no manifest; :class:`pipeline.outputs.OutputConflictError` when they
    are another identity's (the runners replace such a folder first: :func:`replace_stale`)."""
    folder = folder or config.step_dir(name)
    owner = owner or step_hash(config, name)
    manifest = outputs.read_manifest(folder)
    if manifest is None:
        return None
    if manifest.get("step_hash") != owner:
        changed = describe_changes(manifest.get("identity"), identity(config, name))
        raise outputs.OutputConflictError(
            f"{folder} holds outputs of another config, made with other settings ({changed}); "
            "choose another output_root or delete it (jobs/<step>.py and run_all replace it)")
    logger.info("%s: complete already at %s", name, folder)
    return manifest


def claim(config: Config, name: str, folder: str | None = None,
          owner: str | None = None) -> None:
    """Mark the step folder as this identity's (``_job.json``); another's is refused."""
    outputs.ShardedOutput(folder or config.step_dir(name), owner or step_hash(config, name),
                          outputs.REJECTS).claim(job_record(config, name))


def replace_stale(folder: str, owner: str, current: dict[str, Any] | None = None) -> bool:
    """Delete ``folder`` when it was made by another identity than ``owner`` (the runners'
    job: a changed setting or input redoes the step). Returns True if it was replaced."""
    job_uri = storage.join(folder, outputs.JOB_FILE)
    if not storage.exists(job_uri):
        return False
    recorded = storage.read_json(job_uri)
    if recorded.get("owner") == owner:
        return False
    changed = describe_changes(recorded.get("identity"), current)
    logger.warning("%s holds outputs of other settings (%s): replacing them", folder, changed)
    storage.delete_prefix(folder)
    return True


def replace_stale_step(config: Config, name: str) -> bool:
    """:func:`replace_stale` for the step's own folder under the run root."""
    return replace_stale(config.step_dir(name), step_hash(config, name), identity(config, name))
