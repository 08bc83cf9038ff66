"""What every entry point in ``jobs/`` does first: parse the config, set up logging and
storage. Usage: ``python jobs/<step>.py --config <yaml> [dotted.key=value ...]``."""
from __future__ import annotations

import argparse
import logging
import sys

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
