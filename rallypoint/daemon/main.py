"""``rallyd`` entry point: parse flags, load and validate the config, run the daemon."""

from __future__ import annotations

import argparse
import os
import sys

from rallypoint.daemon.config import add_arguments, load_config
from rallypoint.errors import ConfigError
from rallypoint.log import configure_logging


def main(argv: list[str] | None = None) -> int:
    """Run rallyd; returns 2 on a bad config, 1 when etcd cannot be joined, 0 after a clean stop."""
    parser = argparse.ArgumentParser(prog="rallyd", description="rallypoint node daemon")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, os.environ, args)
    except ConfigError as exc:
        print(f"rallyd: {exc}", file=sys.stderr)
        return 2
    configure_logging(cfg.log.level, cfg.log.json)
    from rallypoint.daemon.daemon import Daemon  # after logging is configured

    return Daemon(cfg).run()


if __name__ == "__main__":
    sys.exit(main())
