"""The ``cruzflow`` command: ``serve`` runs the server, the rest talk to one."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from cruzflow.server import commands, deploy, scaffold

EPILOG = """\
exit codes:
  0  done (for watch and create --wait: the instance completed)
  1  the server refused (no such instance or workflow, id taken, wrong
     status for the call), or the instance ended errored or terminated
  2  usage: bad arguments, JSON that does not parse, a value the server
     rejects as invalid; `serve`: a bad config
  3  cannot reach the server, or it did not answer within --timeout
  130  interrupted (Ctrl-C)

environment:
  CRUZFLOW_ADDRESS  server address for the client commands (default 127.0.0.1:50051)
  CRUZFLOW_TOKEN    bearer token sent with every call (never printed)
  CRUZFLOW_TOKEN_FILE  a file holding it, instead
  CRUZFLOW_TLS_CA, CRUZFLOW_TLS_CERT, CRUZFLOW_TLS_KEY
                    PEM files for a server that serves TLS (and wants a
                    client certificate); CRUZFLOW_TLS=1 for TLS with the
                    system's roots

Errors go to stderr, start with "cruzflow:" and say how to mend them;
--json puts machine-readable output on stdout.
"""


def _serve(args: argparse.Namespace) -> int:
    # Imported here: the client commands need none of the server's modules,
    # and importing them (pydantic, the engine, the store) costs time.
    from cruzflow.server.config import ConfigError, load_config
    from cruzflow.server.store.base import StoreError

    try:
        config = load_config(args.config, listen=args.listen, http_listen=args.http_listen)
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


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: ``serve``, ``new`` and the client commands."""
    parser = argparse.ArgumentParser(
        prog="cruzflow",
        description="A durable workflow service: run the server, or drive instances on one.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-level",
        default=None,
        help="DEBUG, INFO, WARNING or ERROR (default INFO for serve, WARNING otherwise)",
    )
    # The client options work before the command (`cruzflow --json list`)
    # and after it (`cruzflow list --json`).
    commands.add_client_options(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the server with the workflows of a config file",
        description="Run the server. Prints `cruzflow listening on HOST:PORT` once it serves "
        "(then `cruzflow http listening on HOST:PORT` with an HTTP listener); "
        "stops gracefully on SIGTERM or SIGINT; exits 2 on a bad config.",
    )
    serve.add_argument("--config", "-c", default="cruzflow.toml", help="config file (TOML)")
    serve.add_argument("--listen", help="host:port, overriding [server] listen")
    serve.add_argument(
        "--http-listen",
        help="host:port to serve HTTP/JSON (Connect) on, overriding [http] listen",
    )
    serve.set_defaults(func=_serve)
    scaffold.register(sub)
    commands.register(sub, epilog=EPILOG)
    deploy.register(sub, epilog=EPILOG)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``cruzflow`` command; returns its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = args.log_level or ("INFO" if args.command == "serve" else "WARNING")
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
