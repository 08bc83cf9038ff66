"""What every entry point in ``jobs/`` does first: parse the config, set up logging and
storage. Usage: ``python jobs/<step>.py --config <yaml> [dotted.key=value ...]``."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from pipeline import storage
from pipeline.config import Config, ConfigError, describe, load_config

logger = logging.getLogger(__name__)


def parse_config(argv: list[str] | None, description: str) -> Config:
    """Config from ``--config`` and overrides; exits with status 2 and the reason if bad."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config, e.g. jobs/configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    setup(config)
    logger.info("resolved config:\n%s", describe(config))
    return config


def setup(config: Config) -> None:
    """Logging and storage settings of this process."""
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    storage.configure(s3_endpoint_url=config.storage.s3_endpoint_url,
                      s3_region=config.storage.s3_region,
                      max_attempts=config.storage.max_attempts)


def run_step(argv: list[str] | None, description: str, *, step: str,
             run: Callable[[Config], dict[str, Any]],
             summarize: Callable[[dict[str, Any], str], str],
             check: Callable[[Config], None] | None = None,
             use_ray: bool = True) -> dict[str, Any]:
    """What a ``jobs/<step>.py`` does: parse the config, run ``check`` (before Ray starts),
    start or join Ray, run the step and print its summary. A bad config exits with status 2
    and a missing, incomplete or unreachable input (e.g. "run stage1 first") with status 1,
    each with a one-line message instead of a traceback (``log_level=DEBUG`` shows it)."""
    config = parse_config(argv, description)
    try:
        if check is not None:
            check(config)
        if use_ray:
            from pipeline.ray_utils import init_ray

            init_ray(config)
        manifest = run(config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    except (FileNotFoundError, storage.StorageError) as err:
        logger.debug("missing or unreadable input", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from err
    print(summarize(manifest, config.step_dir(step)))
    return manifest
