"""The ``cruzflow`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from cruzflow.server.config import ConfigError, load_config
from cruzflow.server.store.base import StoreError


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, listen=args.listen)
    except ConfigError as exc:
        print(f"cruzflow: bad config, not starting:\n{exc}", file=sys.stderr)
        return 2
    from cruzflow.server.app import serve

    runner: asyncio.Runner
    if config.file.server.uvloop:
        try:
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:
            runner = asyncio.Runner()
    else:
        runner = asyncio.Runner()
    try:
        with runner:
            runner.run(serve(config))
    except StoreError as exc:
        print(f"cruzflow: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cruzflow: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cruzflow", description="A durable workflow service.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server with the workflows of a config file")
    serve.add_argument("--config", "-c", default="cruzflow.toml", help="config file (TOML)")
    serve.add_argument("--listen", help="host:port, overriding [server] listen")
    serve.set_defaults(func=_serve)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
