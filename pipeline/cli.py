"""What every entry point in ``jobs/`` does: parse the config, check everything that can be
checked before Ray starts, then start or join Ray and run one step (or all of them).

Usage: ``python jobs/<step>.py --config <yaml> [dotted.key=value ...]``;
``--show-config`` lists every knob with its value, bounds and help instead.

Exit status: 0 on success; 2 for a bad config (a key, a value, two values that do not go
together, a setting a library refuses); 1 for a missing, stale or unreadable input (a source
file, a model folder, an upstream step that has not run: the message names the job to run
first), for GPUs that did not come within ``ray.resource_wait_s`` (the message names
them) and for a local Ray instance that did not start within ``ray.start_timeout_s``. Both
print one line on stderr, before Ray starts wherever it can be known then, also when the
error comes back from a Ray task or actor; ``log_level=DEBUG`` adds the traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from pipeline import storage
from pipeline.config import (
    TINY_PREFIX,
    Config,
    ConfigError,
    describe,
    describe_knobs,
    load_config,
)

logger = logging.getLogger(__name__)


def parse_config(argv: list[str] | None, description: str) -> Config:
    """Config from ``--config`` and overrides (``--show-config`` prints the knobs and exits);
    exits with status 2 and the reason if bad. Storage is configured, logging is not yet."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config, e.g. jobs/configs/demo.yaml")
    parser.add_argument("--show-config", action="store_true",
                        help="list every config knob (value, type, bounds, help) and exit")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_args(argv)
    if not args.config and not args.show_config:
        parser.error("--config is required (or --show-config to list the knobs)")
    with exit_codes(None):
        config = load_config(args.config, args.overrides)
    if args.show_config:
        print(describe_knobs(config))
        raise SystemExit(0)
    storage.configure(s3_endpoint_url=config.storage.s3_endpoint_url,
                      s3_region=config.storage.s3_region,
                      max_attempts=config.storage.max_attempts)
    return config


def setup_logging(config: Config) -> None:
    """Log lines on stderr at ``log_level``; the first names the run and its folder (the
    resolved config, a few hundred lines, only at DEBUG: every manifest keeps it)."""
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.info("run %s -> %s (every value: log_level=DEBUG, --show-config, or the "
                "manifests' config)", config.run_name, config.run_root)
    logger.debug("resolved config:\n%s", describe(config))


@contextmanager
def exit_codes(config: Config | None) -> Iterator[None]:
    """Turn the errors a user can fix into one line on stderr and an exit status, also when
    a Ray task or actor raised them (:func:`user_error` looks through Ray's wrappers)."""
    try:
        yield
    except Exception as err:
        found = user_error(err)
        if found is None:
            raise
        _debug_traceback(config)
        status, prefix = (2, "config error") if isinstance(found, ConfigError) else (1, "error")
        print(f"{prefix}: {_one_line(str(found))}", file=sys.stderr)
        raise SystemExit(status) from err


def _user_error_types() -> tuple[type[Exception], ...]:
    from pipeline.data.readers import SourceError
    from pipeline.ray_utils import RayStartError, ResourceWaitError

    return (ConfigError, FileNotFoundError, storage.StorageError, SourceError,
            ResourceWaitError, RayStartError)


def user_error(err: BaseException) -> BaseException | None:
    """The first error a user can fix in ``err``'s chain, or None. Ray's wrappers are looked
    through: a ``RayTaskError`` (an instance of its cause's class too, whose text is Ray's
    traceback) and a shard task's ``UserCodeException`` (``pipeline.ray_utils``) hold the
    task's error as ``cause``, an ``ActorDiedError`` its creation task's error as its
    argument, other wrappers (Ray Train's) as ``__cause__``."""
    user_types = _user_error_types()
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, user_types) and not _is_ray_error(err):
            return err
        ray_args = err.args[:1] if _is_ray_error(err) else ()
        err = next((inner for inner in (getattr(err, "cause", None), *ray_args, err.__cause__)
                    if isinstance(inner, BaseException)), None)
    return None


def _is_ray_error(err: BaseException) -> bool:
    """A Ray exception (a wrapper of a task's error); never imports Ray to find out."""
    exceptions = sys.modules.get("ray.exceptions")
    return exceptions is not None and isinstance(err, exceptions.RayError)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _debug_traceback(config: Config | None) -> None:
    """With ``log_level=DEBUG``, the traceback above the one line (logging may not be set
    up yet: the checks run before it)."""
    if config is not None and config.log_level == "DEBUG":
        traceback.print_exc(file=sys.stderr)


def check_job_output_root(config: Config) -> None:
    """A job submitted to a cluster needs an ``output_root`` that outlives it: the default
    ``./runs/<run>`` (and any relative path) would land in Ray's temporary copy of the
    working dir on the head, deleted with it and invisible to the other nodes."""
    root = config.output_root
    if storage.is_s3(root) or os.path.isabs(root.removeprefix("file://")):
        return
    where = f"the relative path {root!r}" if root else "the default ./runs/<run>"
    raise ConfigError(f"output_root: {where} would be written inside Ray's temporary copy of "
                      "the job's working dir; set output_root=s3://BUCKET/runs/<name> (or an "
                      "absolute path on a filesystem every node sees)")


def check_before_ray(config: Config, step: Any, *, inputs: bool = True) -> None:
    """Everything a step can refuse before Ray starts: its config (``check``), its inputs
    that no step writes (``check_sources``), its upstream steps (complete and fresh; not for
    run_all, which runs them) and the checks against their manifests (``preflight``); in a
    submitted Ray job also an ``output_root`` that outlives the job."""
    from pipeline.ray_utils import in_ray_job
    from pipeline.steps import base

    if in_ray_job():
        check_job_output_root(config)
    step.check(config)
    check_model_path(config, step)
    base.hook(step, "check_sources")(config)
    if inputs:
        base.require_inputs(config, step)
        base.hook(step, "preflight")(config)


def check_model_path(config: Config, step: Any) -> None:
    """A local ``model.path`` is a folder, for a step that loads the student (the config
    refuses a ``tiny:`` of an unknown family and a malformed s3:// URI; a step's
    ``check_sources`` looks for the s3:// prefix). Runs at check time: a test may create the
    folder after writing the config."""
    path = config.model.path
    if not loads_student(config, step) or path.startswith(TINY_PREFIX) or storage.is_s3(path):
        return
    folder = storage.local_path(path)
    if not os.path.isdir(folder):
        what = "is a file, not a model folder" if os.path.exists(folder) else "does not exist"
        where = "" if folder == path else f" ({folder})"
        raise FileNotFoundError(f"model.path: {path}{where} {what}")


def loads_student(config: Config, step: Any) -> bool:
    """Whether ``step`` loads the student of ``model.path``: a step that reads the ``model``
    section does, except stage 2 from another start than ``stage2.init=student`` and
    evaluate without a ``student`` entry in ``eval.models``."""
    if "model" not in getattr(step, "READS", ()):
        return False
    name = getattr(step, "NAME", "")
    if name == "stage2":
        return config.stage2.init == "student"
    if name == "evaluate":
        from pipeline.eval.models import parse_models

        return "student" in parse_models(config.eval.models).values()
    return True


def run_step(argv: list[str] | None, step: str | ModuleType | Any,
             description: str = "") -> dict[str, Any]:
    """What a ``jobs/<step>.py`` does: parse the config, run every check (before Ray starts),
    replace the step's folder if it holds outputs of other settings, start or join Ray when
    the step uses it, run the step and print its summary."""
    from pipeline.steps import base

    step = base.get(step) if isinstance(step, str) else step
    config = parse_config(argv, description or step.__doc__ or "")
    with exit_codes(config):
        check_before_ray(config, step)
        setup_logging(config)
        base.replace_stale_step(config, step.NAME)
        if step.USES_RAY:
            from pipeline.ray_utils import init_ray

            init_ray(config)
        manifest = step.run(config)
    print(step.summarize(manifest, config.step_dir(step.NAME)))
    return manifest


def run_pipeline(argv: list[str] | None, description: str = "") -> dict[str, Any]:
    """What ``jobs/run_all.py`` does: parse the config, run every step's checks that need no
    upstream outputs (before Ray starts), then every step in order (``pipeline.runner``)."""
    from pipeline.ray_utils import init_ray
    from pipeline.runner import run_all
    from pipeline.steps import all_steps

    config = parse_config(argv, description)
    with exit_codes(config):
        for step in all_steps():
            check_before_ray(config, step, inputs=False)
        setup_logging(config)
        init_ray(config)
        return run_all(config)
