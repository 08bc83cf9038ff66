"""What every entry point in ``jobs/`` does: parse the config, check everything that can be
checked before Ray starts, then start or join Ray and run one step (or all of them).

Usage: ``python jobs/<step>.py --config <yaml> [dotted.key=value ...]``;
``--show-config`` lists every knob with its value, bounds and help instead.

Exit status: 0 on success; 2 for a bad config (a key, a value, two values that do not go
together, a setting a library refuses); 1 for a missing, stale or unreadable input (a source
file, a model folder, an upstream step that has not run: the message names the job to run
first) and for GPUs that did not come within ``ray.resource_wait_s`` (the message names
them). Both print one line on stderr, before Ray starts wherever it can be known then;
``log_level=DEBUG`` adds the traceback.
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
from pipeline.config import Config, ConfigError, describe, describe_knobs, load_config

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
    """Turn the errors a user can fix into one line on stderr and an exit status."""
    from pipeline.data.readers import SourceError
    from pipeline.ray_utils import ResourceWaitError

    try:
        yield
    except ConfigError as err:
        _debug_traceback(config)
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    except (FileNotFoundError, storage.StorageError, SourceError, ResourceWaitError) as err:
        _debug_traceback(config)
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from err


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
    base.hook(step, "check_sources")(config)
    if inputs:
        base.require_inputs(config, step)
        base.hook(step, "preflight")(config)


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
