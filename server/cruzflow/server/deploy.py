"""Deploying changed code without fear: ``cruzflow check`` and ``cruzflow export``.

``check`` replays the recorded history of every unfinished instance (and,
with ``--finished N``, of the newest finished ones) against the workflow
code of a new config, in the sandbox of ``engine.replay`` (no step body
runs, nothing is stored), and says which instances the new code would
break (``checking``). ``export`` writes one instance's whole history as
JSON, a fixture that ``cruzflow.testing.WorkflowTestEnv.replay`` replays in
a unit test. The engine is imported only when ``check`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import textwrap
from typing import TextIO

from cruzflow.client import Client, CruzflowError
from cruzflow.server import commands, render

EXIT_BREAKS = 1


async def _check(args: argparse.Namespace, out: TextIO) -> int:
    from cruzflow.server import checking

    client: Client | None = None
    try:
        if args.store is None:
            token, credentials = commands.connection(args)
            client = Client(args.against or args.address, timeout=args.timeout, token=token,
                            credentials=credentials)  # fmt: skip
        report = await checking.run_check(
            args.config, store=args.store, client=client, workflows=args.workflow,
            finished=args.finished,
        )  # fmt: skip
    finally:
        if client is not None:
            await client.close()
    if args.json:
        out.write(render.json_doc(checking.report_json(report)) + "\n")
    else:
        out.write("\n".join(checking.report_lines(report)) + "\n")
    return EXIT_BREAKS if report.breaking else commands.EXIT_OK


def _run_check(args: argparse.Namespace) -> int:
    from cruzflow.server.config import ConfigError
    from cruzflow.server.store.base import StoreError

    try:
        return asyncio.run(_check(args, sys.stdout))
    except (ConfigError, commands.UsageError, ValueError) as exc:
        return commands.fail(str(exc), commands.EXIT_USAGE)
    except StoreError as exc:
        return commands.fail(str(exc), commands.EXIT_USAGE)
    except CruzflowError as exc:
        message, code = commands.explain(exc, args)
        return commands.fail(message, code)
    except KeyboardInterrupt:
        return commands.EXIT_INTERRUPTED


# --------------------------------------------------------------------- export
async def _export(ctx: commands.Context) -> int:
    data = await ctx.client.instance(ctx.args.instance_id).export()
    ctx.print(json.dumps(data, indent=2, ensure_ascii=False))
    return commands.EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], epilog: str = "") -> None:
    """Add ``check`` and ``export`` to the ``cruzflow`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    commands.add_client_options(common)
    check = sub.add_parser(
        "check",
        parents=[common],
        help="replay live instances against new workflow code before a deploy",
        description=textwrap.fill(
            "Replay the recorded history of every unfinished instance (and with --finished N "
            "the newest N finished ones of each workflow) against the workflow code of a new "
            "config, in a sandbox that runs no step body and stores nothing. Reports per "
            "workflow how many replay cleanly and which the new code would break: a step "
            "changed, moved or removed (its position, the recorded and the new step), or a "
            "workflow the new config no longer hosts. Exit 0 when none would break, 1 when "
            "some would, 2 on a bad config or store file, 3 when the server cannot be reached.",
            79,
        ),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("--config", "-c", required=True, help="the NEW config (TOML) to check")
    source = check.add_mutually_exclusive_group()
    source.add_argument(
        "--against",
        metavar="HOST:PORT",
        help="the running server whose instances to check (default: --address)",
    )
    source.add_argument(
        "--store",
        metavar="FILE",
        help="a SQLite store file to read the instances from instead (read-only; a server "
        "may be running on it)",
    )
    check.add_argument(
        "--workflow",
        "-w",
        action="append",
        metavar="NAME",
        help="check only this workflow (repeatable; default: all)",
    )
    check.add_argument(
        "--finished",
        type=int,
        default=0,
        metavar="N",
        help="also replay the newest N finished instances of each workflow (default 0)",
    )
    check.set_defaults(func=_run_check)
    export = sub.add_parser(
        "export",
        parents=[common],
        help="write an instance's whole history as JSON (a test fixture)",
        description=textwrap.fill(
            "Print the instance's whole history as JSON: its params, status and output, every "
            "step with its result or error (sleeps and event waits too), and every event of "
            "its log. `cruzflow export ID > fixture.json`; a unit test replays it with "
            "cruzflow.testing.WorkflowTestEnv.replay('fixture.json').",
            79,
        ),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("instance_id", metavar="ID")
    export.set_defaults(func=commands.runner(_export))
