"""The client commands of ``cruzflow``: create, status, watch, list and the controls.

Each command is an ``async`` function of a :class:`Context` that talks to the
server through the typed client (:mod:`cruzflow.client`) and returns an exit
code. :func:`register` adds them to the parser; one runner maps every failure
to an exit code and a ``cruzflow: ...`` line on stderr that says how to mend it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO, TypeVar

from cruzflow.client import (
    Client,
    CruzflowError,
    DeadlineExceeded,
    ErrorInfo,
    FailedPrecondition,
    InstanceAlreadyExists,
    InstanceHandle,
    InstanceNotFound,
    InstanceStatus,
    InstanceStatusInfo,
    InvalidArgument,
    PayloadSizes,
    PermissionDenied,
    RepairInfo,
    ScheduleInfo,
    StepInfo,
    Unauthenticated,
    Unavailable,
    WatchEvent,
    WorkflowInfo,
    WorkflowNotFound,
    tls_credentials,
)
from cruzflow.server import render
from cruzflow.server.render import (
    ErrorView,
    EventView,
    InstanceView,
    SizesView,
    StepView,
    WorkflowView,
)

# The exit codes, documented in `cruzflow --help` (cli.EPILOG).
EXIT_OK = 0
EXIT_FAILED = 1  # the server refused, or the instance ended errored or terminated
EXIT_USAGE = 2  # bad arguments or input (argparse uses 2 as well)
EXIT_UNREACHABLE = 3  # no server at the address, or no answer in time
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 10.0
DEFAULT_LIMIT = 50


class UsageError(Exception):
    """The command line or its input cannot work as given (exit code 2)."""


@dataclass(slots=True)
class Context:
    """What a command runs with: its arguments, a connected client, where to print."""

    args: argparse.Namespace
    client: Client
    out: TextIO

    @property
    def json(self) -> bool:
        """Whether to print JSON for scripts rather than text for people."""
        return bool(self.args.json)

    def print(self, text: str = "") -> None:
        """One block of output, flushed at once (a pipe reader sees it now)."""
        self.out.write(text + "\n")
        self.out.flush()


Handler = Callable[[Context], Awaitable[int]]
T = TypeVar("T")


@contextlib.asynccontextmanager
async def _closing(stream: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Close a stream of the client when done with it, ended or not, so that
    leaving early (a ``break``, an error) cancels its call at once."""
    try:
        yield stream
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


# --- options and parser -----------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be over 0 seconds, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return value


def add_client_options(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """``--address``, ``--token``, ``--token-file``, the ``--tls`` options,
    ``--timeout`` and ``--json``.

    The top-level parser holds the defaults; each command's parser repeats the
    options with suppressed defaults, so that an option given after the
    command wins and one given before it is not reset.
    """

    def default(value: Any) -> Any:
        return value if top_level else argparse.SUPPRESS

    parser.add_argument(
        "--address",
        metavar="HOST:PORT",
        default=default(os.environ.get("CRUZFLOW_ADDRESS") or DEFAULT_ADDRESS),
        help=f"server to talk to (default: $CRUZFLOW_ADDRESS, else {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        # Read from the environment by default: a flag's value shows in `ps`.
        default=default(os.environ.get("CRUZFLOW_TOKEN") or None),
        help="bearer token sent with each call (default: $CRUZFLOW_TOKEN; prefer the variable)",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        default=default(os.environ.get("CRUZFLOW_TOKEN_FILE") or None),
        help="a file holding the bearer token, instead of --token (default: $CRUZFLOW_TOKEN_FILE)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        default=default(os.environ.get("CRUZFLOW_TLS", "").lower() not in ("", "0", "false", "no")),
        help="connect with TLS, checking the server by the system's root certificates "
        "(default: on when $CRUZFLOW_TLS is 1; any --tls-* option implies it)",
    )
    for flag, variable, what in (
        ("--tls-ca", "CRUZFLOW_TLS_CA", "PEM CA certificates to check the server's by"),
        ("--tls-cert", "CRUZFLOW_TLS_CERT", "PEM client certificate, for servers that want one"),
        ("--tls-key", "CRUZFLOW_TLS_KEY", "PEM private key of --tls-cert"),
    ):
        parser.add_argument(
            flag,
            metavar="FILE",
            default=default(os.environ.get(variable) or None),
            help=f"{what} (default: ${variable})",
        )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=default(DEFAULT_TIMEOUT),
        help=f"deadline of each call to the server (default {DEFAULT_TIMEOUT:g}); "
        "watch and --wait follow the instance for as long as it takes",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print JSON for scripts (watch: one JSON object per line)",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], epilog: str = "") -> None:
    """Add the client commands to the ``cruzflow`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    add_client_options(common)

    def command(
        name: str, handler: Handler, help: str, description: str, aliases: tuple[str, ...] = ()
    ) -> argparse.ArgumentParser:
        parser = sub.add_parser(
            name,
            aliases=list(aliases),
            parents=[common],
            help=help,
            description=textwrap.fill(description, 79),
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.set_defaults(func=runner(handler))
        return parser

    create = command(
        "create",
        _create,
        "create an instance of a workflow",
        "Create an instance; prints its id. With --wait, follows it to its end and "
        "prints its final status (exit 0 complete, 1 errored or terminated).",
        aliases=("trigger",),
    )
    create.add_argument("workflow", metavar="WORKFLOW", help="a hosted workflow's name")
    params = create.add_mutually_exclusive_group()
    params.add_argument(
        "--params", "-p", metavar="JSON", help="params as JSON text ('-' reads stdin)"
    )
    params.add_argument(
        "--params-file", metavar="FILE", help="read the params (JSON) from FILE ('-': stdin)"
    )
    create.add_argument("--id", metavar="ID", help="instance id (default: the server makes one)")
    create.add_argument("--lookup-key", metavar="KEY", help="a key to find it by with `list`")
    create.add_argument(
        "--priority",
        type=int,
        default=0,
        metavar="N",
        help="a limited workflow: higher starts first among those waiting for a slot (0)",
    )
    create.add_argument(
        "--concurrency-key",
        metavar="KEY",
        help="a workflow limited per key: the key to take a slot of, instead of the params'",
    )
    create.add_argument(
        "--if-exists",
        choices=("error", "return"),
        default="error",
        help="when --id is taken: fail (error, the default) or use that instance (return)",
    )
    create.add_argument(
        "--wait", action="store_true", help="wait until it is final; print its status"
    )

    status = command(
        "status",
        _status,
        "show an instance: status, params, output or error, and its steps",
        "Show an instance and its steps. Exit 0 whatever the instance's status.",
    )
    status.add_argument("instance_id", metavar="ID")

    watch = command(
        "watch",
        _watch,
        "follow an instance live until it ends",
        "Follow an instance until it reaches a final status. On a terminal: a live view "
        "of its steps and attempts, redrawn in place. Otherwise (or with --json): one "
        "line per event of its log, from the first. Exit 0 once complete, 1 once errored "
        "or terminated.",
    )
    watch.add_argument("instance_id", metavar="ID")

    listing = command(
        "list",
        _list,
        "list instances, newest first",
        "List instances, newest first, each filter narrowing.",
    )
    listing.add_argument("--workflow", "-w", metavar="NAME", help="only this workflow's")
    listing.add_argument(
        "--status",
        "-s",
        metavar="STATUS",
        action="append",
        help="only in this status (repeat, or separate with commas): "
        + ", ".join(s.value for s in InstanceStatus if s is not InstanceStatus.UNKNOWN),
    )
    listing.add_argument("--lookup-key", metavar="KEY", help="only those created with this key")
    listing.add_argument("--schedule", metavar="ID", help="only those this schedule created")
    listing.add_argument(
        "--limit",
        "-n",
        metavar="N",
        type=_positive_int,
        default=DEFAULT_LIMIT,
        help=f"at most N instances (default {DEFAULT_LIMIT})",
    )

    command(
        "workflows",
        _workflows,
        "list the workflows the server hosts",
        "List the hosted workflows: name, binding and class.",
    )

    for verb, handler, text in (
        ("pause", _pause, "pause an instance at its next step boundary"),
        ("resume", _resume, "resume a paused instance"),
        ("terminate", _terminate, "end an instance now as terminated"),
        (
            "restart",
            _restart,
            "run an instance again from scratch (or from a step), same id and params",
        ),
    ):
        control = command(verb, handler, text, text[0].upper() + text[1:] + ".")
        control.add_argument("instance_id", metavar="ID")
        if verb == "restart":
            control.add_argument(
                "--from-step", metavar="NAME",
                help="keep the results recorded before this step; run it and the steps "
                "after it again",
            )  # fmt: skip
            _occurrence_flag(control)
            control.add_argument(
                "--reason", metavar="TEXT", default="",
                help="why, kept in the instance's history (a restart from a step is always kept)",
            )  # fmt: skip

    repair = command(
        "repair",
        _repair,
        "replace a step's recorded result (or retry it), audited, and resume",
        "Mend an errored, terminated, paused or waiting instance: record a step's result as "
        "--output (JSON), or with --retry run the failed step again with its full retries; "
        "then it goes on from there (the steps recorded after it are replayed). Kept in the "
        "instance's history with who did it and --reason.",
    )
    repair.add_argument("instance_id", metavar="ID")
    repair.add_argument("--step", required=True, metavar="NAME", help="the step to repair")
    _occurrence_flag(repair)
    what = repair.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--output", metavar="JSON", help="the step's new result as JSON text ('-' reads stdin)"
    )
    what.add_argument("--retry", action="store_true", help="run the failed step again")
    repair.add_argument("--reason", required=True, metavar="TEXT", help="why (kept in the history)")

    schedules = command(
        "schedules",
        _schedules,
        "list cron schedules, or trigger, pause, resume or delete one",
        "Cron schedules (see the README's Schedules): `schedules list [--workflow W]`; "
        "`schedules trigger ID` creates an instance of it now and prints its id; "
        "`schedules pause ID`, `resume ID`, `delete ID`.",
    )
    schedules.add_argument(
        "action", choices=("list", "trigger", "pause", "resume", "delete"), metavar="ACTION",
        help="list, trigger, pause, resume or delete",
    )  # fmt: skip
    schedules.add_argument("schedule_id", metavar="ID", nargs="?", help="the schedule's id")
    schedules.add_argument("--workflow", "-w", metavar="NAME", help="list: only this workflow's")

    send = command(
        "send-event",
        _send_event,
        "send an event to an instance's wait_for_event",
        "Send an event; it is kept for the instance's step.wait_for_event of that type.",
    )
    send.add_argument("instance_id", metavar="ID")
    send.add_argument("type", metavar="TYPE", help="the event type the workflow waits for")
    payload = send.add_mutually_exclusive_group()
    payload.add_argument(
        "--payload", "-p", metavar="JSON", help="payload as JSON text ('-' reads stdin)"
    )
    payload.add_argument(
        "--payload-file", metavar="FILE", help="read the payload (JSON) from FILE ('-': stdin)"
    )


# --- running a command ------------------------------------------------------


def runner(handler: Handler) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(_run(handler, args))
        except KeyboardInterrupt:
            # The live view restored the cursor in its `finally`; end the line.
            sys.stderr.write("\n")
            return EXIT_INTERRUPTED

    return run


def connection(args: argparse.Namespace) -> tuple[str | None, Any]:
    """The token and channel credentials the options ask for."""
    token = args.token or None
    if getattr(args, "token_file", None):
        if token is not None:
            raise UsageError(
                "give one of --token (or CRUZFLOW_TOKEN) and --token-file (or "
                "CRUZFLOW_TOKEN_FILE), not both"
            )
        try:
            with open(args.token_file) as file:
                token = file.read().strip()
        except OSError as exc:
            raise UsageError(
                f"--token-file: cannot read {args.token_file}: {exc.strerror}; check the path"
            ) from None
        if not token:
            raise UsageError(f"--token-file: {args.token_file} is empty")
    ca, cert, key = (getattr(args, name, None) for name in ("tls_ca", "tls_cert", "tls_key"))
    if not (getattr(args, "tls", False) or ca or cert or key):
        return token, None
    if bool(cert) != bool(key):
        raise UsageError("--tls-cert and --tls-key go together (or CRUZFLOW_TLS_CERT and _KEY)")
    try:
        return token, tls_credentials(ca, cert_file=cert, key_file=key)
    except InvalidArgument as exc:
        flag = {"ca_file": "--tls-ca", "cert_file": "--tls-cert", "key_file": "--tls-key"}
        what, _, reason = exc.details.partition(": ")
        raise UsageError(f"{flag.get(what, what)}: {reason}") from None


async def _run(handler: Handler, args: argparse.Namespace) -> int:
    try:
        token, credentials = connection(args)
        async with Client(
            args.address, timeout=args.timeout, token=token, credentials=credentials
        ) as client:
            return await handler(Context(args, client, sys.stdout))
    except UsageError as exc:
        return fail(str(exc), EXIT_USAGE)
    except CruzflowError as exc:
        message, code = explain(exc, args)
        return fail(message, code)
    except BrokenPipeError:
        # The reader went away (`cruzflow watch ID | head`): not an error of
        # ours. Point stdout at nothing so the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def fail(message: str, code: int) -> int:
    """Print ``cruzflow: message`` to stderr and return ``code``."""
    sys.stderr.write(f"cruzflow: {message}\n")
    sys.stderr.flush()
    return code


def explain(exc: CruzflowError, args: argparse.Namespace) -> tuple[str, int]:
    """A client error as a message that says how to mend it, and its exit code."""
    address = args.address
    instance = exc.instance_id or getattr(args, "instance_id", None)
    schedule = getattr(args, "schedule_id", None)
    if schedule is not None and exc.details.startswith("schedule_id:"):
        return (
            f"no schedule {schedule!r} on {address}; `cruzflow schedules list` shows them",
            EXIT_FAILED,
        )
    if isinstance(exc, InstanceNotFound):
        return (
            f"no instance {instance!r} on {address}; check the id "
            f"(`cruzflow list` shows the newest instances)",
            EXIT_FAILED,
        )
    if isinstance(exc, WorkflowNotFound):
        return (
            f"{address} hosts no workflow {getattr(args, 'workflow', None)!r}; "
            f"`cruzflow workflows` lists the ones it does",
            EXIT_FAILED,
        )
    if isinstance(exc, InstanceAlreadyExists):
        return (
            f"an instance {instance!r} exists already; choose another --id, leave --id out "
            f"for a generated one, or pass --if-exists return to use it",
            EXIT_FAILED,
        )
    if isinstance(exc, FailedPrecondition):
        hint = f"; `cruzflow status {instance}` shows where it is" if instance else ""
        return f"{exc.details}{hint}", EXIT_FAILED
    if isinstance(exc, InvalidArgument):
        return exc.details, EXIT_USAGE
    if isinstance(exc, Unavailable):
        return (
            f"cannot reach {address} ({exc.details}); is `cruzflow serve` running there? "
            f"set --address or CRUZFLOW_ADDRESS to where it listens",
            EXIT_UNREACHABLE,
        )
    if isinstance(exc, DeadlineExceeded):
        return (
            f"{address} did not answer within {args.timeout:g} s; "
            f"check the server, or give it longer with --timeout",
            EXIT_UNREACHABLE,
        )
    if isinstance(exc, Unauthenticated):
        return (
            f"{address} wants credentials ({exc.details}); set CRUZFLOW_TOKEN (or "
            f"CRUZFLOW_TOKEN_FILE) to a token it accepts",
            EXIT_FAILED,
        )
    if isinstance(exc, PermissionDenied):
        return (
            f"{address} refused the call ({exc.details}); the token in CRUZFLOW_TOKEN "
            f"does not allow it",
            EXIT_FAILED,
        )
    code = exc.code.name if exc.code is not None else "error"
    return f"the server failed the call ({code}: {exc.details})", EXIT_FAILED


# --- input --------------------------------------------------------------------


def load_json(text: str | None, path: str | None, flag: str) -> Any:
    """The JSON value given as text (``-``: stdin) or in a file; None if neither."""
    source = flag
    if text == "-" or path == "-":
        raw = sys.stdin.read()
        source = f"{flag} (stdin)"
    elif path is not None:
        source = f"{flag}-file {path}"
        try:
            with open(path, encoding="utf-8") as file:
                raw = file.read()
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}; check the path") from None
    elif text is not None:
        raw = text
    else:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{source} is not valid JSON ({exc}); give JSON text such as "
            f'\'{{"userId": "42"}}\' (single quotes keep the shell off it)'
        ) from None


def parse_statuses(values: list[str] | None) -> list[InstanceStatus]:
    """``--status`` values: any case, with ``-`` or ``_`` between words; commas allowed."""
    known = {s.value.lower(): s for s in InstanceStatus if s is not InstanceStatus.UNKNOWN}
    out: list[InstanceStatus] = []
    for value in values or []:
        for part in value.split(","):
            key = part.strip().lower().replace("-", "").replace("_", "").replace(" ", "")
            if not key:
                continue
            if key not in known:
                raise UsageError(
                    f"--status {part.strip()!r} is not a status; use one of "
                    + ", ".join(s.value for s in known.values())
                )
            if known[key] not in out:
                out.append(known[key])
    return out


# --- the client's types as views -----------------------------------------------


def _error(error: ErrorInfo | None) -> ErrorView | None:
    return None if error is None else ErrorView(error.name, error.message, error.traceback)


def step_view(step: StepInfo) -> StepView:
    """A step of the client's status as the renderer's view."""
    return StepView(
        index=step.index,
        name=step.name,
        occurrence=step.occurrence,
        kind=step.kind.value,
        status=step.status.value,
        attempts=step.attempts,
        start_time=step.start_time,
        end_time=step.end_time,
        output=step.output,
        has_output=step.status.value == "succeeded",
        error=_error(step.error),
        next_attempt_time=step.next_attempt_time,
        event_type=step.event_type or "",
        output_bytes=step.output_bytes,
    )


def _sizes(sizes: PayloadSizes | None) -> SizesView | None:
    if sizes is None:
        return None
    return SizesView(
        sizes.params_bytes,
        sizes.output_bytes,
        sizes.largest_step_bytes,
        sizes.total_bytes,
        sizes.limit_bytes,
    )


def instance_view(info: InstanceStatusInfo) -> InstanceView:
    """The client's instance status as the renderer's view."""
    return InstanceView(
        instance_id=info.id,
        workflow=info.workflow,
        status=info.status.value,
        params=info.params,
        output=info.output,
        error=_error(info.error),
        create_time=info.create_time,
        update_time=info.update_time,
        end_time=info.end_time,
        wake_time=info.wake_time,
        start_time=info.start_time,
        lookup_key=info.lookup_key or "",
        last_sequence=info.last_sequence,
        steps=[step_view(s) for s in info.steps],
        priority=info.priority,
        concurrency_key=info.concurrency_key or "",
        payloads=_sizes(info.payloads),
        repairs=[_repair_view(r) for r in info.repairs],
    )


def _repair_view(info: RepairInfo) -> render.RepairView:
    step = None
    if info.step is not None:
        step = (
            info.step.name
            if info.step.occurrence <= 1
            else f"{info.step.name} #{info.step.occurrence}"
        )
    return render.RepairView(info.time, info.actor, info.reason, info.action, step, info.output)


def event_view(event: WatchEvent) -> EventView:
    """A watch event of the client as the renderer's view."""
    view = EventView(
        instance_id=event.instance_id,
        sequence=event.sequence,
        time=event.time,
        kind=event.kind.value,
        status=event.status.value if event.status is not None else "",
        output=event.output,
        error=_error(event.error),
        attempt=event.attempt or 0,
        next_attempt_time=event.next_attempt_time,
        retry_delay=event.retry_delay.total_seconds() if event.retry_delay else None,
    )
    view.has_output = view.kind == "step_succeeded" or (
        view.kind == "status_changed" and view.status == "complete"
    )
    if event.repair is not None:
        view.repair = _repair_view(event.repair)
    if event.step is not None:
        view.step_index = event.step.index
        view.step_name = event.step.name
        view.step_occurrence = event.step.occurrence
        view.step_kind = event.step.kind.value
    return view


def workflow_view(info: WorkflowInfo) -> WorkflowView:
    """A hosted workflow as the renderer's view."""
    return WorkflowView(info.name, info.binding, info.class_name)


def _now() -> datetime:
    return datetime.now(UTC)


def _outcome(view: InstanceView) -> int:
    """The exit code of an instance's final status, with a note on stderr if not complete."""
    if view.status == "complete":
        return EXIT_OK
    if view.status == "errored":
        if view.error is not None and view.error.traceback:
            # Its code raised: running the same code again would fail the same way.
            hint = (
                f"`cruzflow status {view.instance_id}` shows where it was raised; once the "
                f"workflow's code is fixed and served, `cruzflow restart {view.instance_id}` "
                f"runs it again from scratch"
            )
        else:
            hint = f"`cruzflow restart {view.instance_id}` runs it again from scratch"
        return fail(f"instance {view.instance_id!r} errored: {view.error}; {hint}", EXIT_FAILED)
    return fail(
        f"instance {view.instance_id!r} was {view.status}; "
        f"`cruzflow restart {view.instance_id}` runs it again",
        EXIT_FAILED,
    )


def _style(out: TextIO) -> render.Style:
    """Colours on a terminal unless NO_COLOR is set; Unicode marks if it can show them."""
    encoding = (getattr(out, "encoding", None) or "").lower().replace("-", "")
    return render.Style(
        color=out.isatty() and not os.environ.get("NO_COLOR"),
        unicode=encoding in ("utf8", "utf16", "utf32"),
    )


# --- the commands ---------------------------------------------------------------


async def _create(ctx: Context) -> int:
    args = ctx.args
    params = load_json(args.params, args.params_file, "--params")
    handle = await ctx.client.workflow(args.workflow).create(
        params,
        id=args.id,
        lookup_key=args.lookup_key,
        priority=args.priority,
        concurrency_key=args.concurrency_key,
        if_exists=args.if_exists,
    )
    if not args.wait:
        ctx.print(render.json_doc({"instance_id": handle.id}) if ctx.json else handle.id)
        return EXIT_OK
    if not ctx.json:
        ctx.print(handle.id)
    # wait() long-polls without a deadline of its own; the status after it
    # brings the steps, which people want to see.
    await handle.wait()
    view = instance_view(await handle.status())
    if ctx.json:
        ctx.print(render.json_doc(view.to_json()))
    else:
        ctx.print("\n".join(render.instance_lines(view, _now(), _style(ctx.out))))
    return _outcome(view)


async def _status(ctx: Context) -> int:
    view = instance_view(await ctx.client.instance(ctx.args.instance_id).status())
    if ctx.json:
        ctx.print(render.json_doc(view.to_json()))
    else:
        ctx.print("\n".join(render.instance_lines(view, _now(), _style(ctx.out))))
    return EXIT_OK


async def _list(ctx: Context) -> int:
    args = ctx.args
    statuses = parse_statuses(args.status)
    limit: int = args.limit
    found: list[InstanceView] = []
    more = False
    # One more than asked for tells whether there are more to show.
    instances = ctx.client.list_instances(
        workflow=args.workflow,
        status=statuses or None,
        lookup_key=args.lookup_key,
        page_size=min(limit + 1, 1000),
        schedule_id=args.schedule,
    )
    async with _closing(instances) as stream:
        async for info in stream:
            if len(found) == limit:
                more = True
                break
            found.append(instance_view(info))
    if ctx.json:
        ctx.print(render.json_doc([v.to_json(with_steps=False) for v in found]))
        return EXIT_OK
    if not found:
        ctx.print(
            "no instances"
            + (" match" if args.workflow or statuses or args.lookup_key or args.schedule else "")
        )
        return EXIT_OK
    ctx.print(render.instances_table(found, _now()))
    if more:
        ctx.print(f"(the newest {limit}; --limit N shows more)")
    return EXIT_OK


async def _workflows(ctx: Context) -> int:
    found = [workflow_view(w) for w in await ctx.client.list_workflows()]
    if ctx.json:
        ctx.print(render.json_doc([w.to_json() for w in found]))
    elif not found:
        ctx.print("no workflows hosted; add [[workflows]] to the server's config")
    else:
        ctx.print(render.workflows_table(found))
    return EXIT_OK


def _control_output(ctx: Context, status: InstanceStatus, done: str) -> int:
    instance_id = ctx.args.instance_id
    if ctx.json:
        ctx.print(render.json_doc({"instance_id": instance_id, "status": status.value}))
    else:
        ctx.print(f"{instance_id}: {done}")
    return EXIT_OK


async def _pause(ctx: Context) -> int:
    status = await ctx.client.instance(ctx.args.instance_id).pause()
    if status is InstanceStatus.WAITING_FOR_PAUSE:
        return _control_output(ctx, status, "pausing (the running step finishes first)")
    return _control_output(ctx, status, "paused")


async def _resume(ctx: Context) -> int:
    status = await ctx.client.instance(ctx.args.instance_id).resume()
    return _control_output(ctx, status, f"resumed (now {render.status_word(status.value)})")


async def _terminate(ctx: Context) -> int:
    status = await ctx.client.instance(ctx.args.instance_id).terminate()
    return _control_output(ctx, status, "terminated")


def _occurrence_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--occurrence", metavar="N", type=_positive_int, default=1,
        help="which step of that name: 1 for the first in a run (default 1)",
    )  # fmt: skip


async def _restart(ctx: Context) -> int:
    args = ctx.args
    status = await ctx.client.instance(args.instance_id).restart(
        from_step=args.from_step, occurrence=args.occurrence, reason=args.reason
    )
    where = "from scratch" if not args.from_step else f"from step {args.from_step!r}"
    return _control_output(
        ctx, status, f"restarted {where} (now {render.status_word(status.value)})"
    )


async def _repair(ctx: Context) -> int:
    args = ctx.args
    handle = ctx.client.instance(args.instance_id)
    if args.retry:
        entry = await handle.repair(
            args.step, reason=args.reason, retry=True, occurrence=args.occurrence
        )
    else:
        output = load_json(args.output, None, "--output")
        entry = await handle.repair(
            args.step, reason=args.reason, output=output, occurrence=args.occurrence
        )
    if ctx.json:
        ctx.print(
            render.json_doc({
                "instance_id": args.instance_id, "step": args.step, "action": entry.action,
                "actor": entry.actor, "reason": entry.reason,
            })
        )  # fmt: skip
        return EXIT_OK
    done = "retried" if args.retry else "repaired"
    # No status: it goes on at once, so any status printed would race it.
    ctx.print(
        f"{args.instance_id}: step {args.step!r} {done} by {entry.actor}; it goes on from there"
    )
    return EXIT_OK


def _schedule_json(info: ScheduleInfo) -> dict[str, Any]:
    def iso(when: datetime | None) -> str | None:
        return None if when is None else when.isoformat(timespec="milliseconds")

    return {
        "id": info.id,
        "workflow": info.workflow,
        "cron": info.cron,
        "timezone": info.timezone,
        "params": info.params,
        "catch_up": info.catch_up,
        "paused": info.paused,
        "origin": info.origin,
        "last_due_time": iso(info.last_due_time),
        "last_instance_id": info.last_instance_id,
        "next_due_time": iso(info.next_due_time),
    }


async def _schedules(ctx: Context) -> int:
    args = ctx.args
    if args.action == "list":
        if args.schedule_id:
            raise UsageError("schedules list takes no ID; --workflow NAME narrows it")
        found = await ctx.client.list_schedules(workflow=args.workflow)
        if ctx.json:
            ctx.print(render.json_doc([_schedule_json(s) for s in found]))
        elif not found:
            ctx.print("no schedules" + (" of that workflow" if args.workflow else ""))
        else:
            ctx.print(
                render.table(
                    ["ID", "WORKFLOW", "CRON", "TIMEZONE", "STATE", "NEXT DUE (UTC)", "LAST"],
                    [
                        [
                            s.id,
                            s.workflow,
                            s.cron,
                            s.timezone,
                            "paused" if s.paused else "active",
                            ""
                            if s.next_due_time is None
                            else f"{s.next_due_time:%Y-%m-%d %H:%M:%S}",
                            s.last_instance_id or "",
                        ]
                        for s in found
                    ],
                )
            )
        return EXIT_OK
    if not args.schedule_id:
        raise UsageError(f"schedules {args.action} needs the schedule's ID")
    schedule_id: str = args.schedule_id
    if args.action == "trigger":
        handle = await ctx.client.trigger_schedule(schedule_id)
        ctx.print(render.json_doc({"instance_id": handle.id}) if ctx.json else handle.id)
        return EXIT_OK
    if args.action == "delete":
        await ctx.client.delete_schedule(schedule_id)
        ctx.print(
            render.json_doc({"schedule_id": schedule_id, "deleted": True})
            if ctx.json
            else f"{schedule_id}: deleted (its instances stay)"
        )
        return EXIT_OK
    if args.action == "pause":
        info = await ctx.client.pause_schedule(schedule_id)
        done = "paused"
    else:
        info = await ctx.client.resume_schedule(schedule_id)
        due = info.next_due_time
        done = "resumed" + ("" if due is None else f" (next due {due:%Y-%m-%d %H:%M:%S} UTC)")
    ctx.print(render.json_doc(_schedule_json(info)) if ctx.json else f"{schedule_id}: {done}")
    return EXIT_OK


async def _send_event(ctx: Context) -> int:
    args = ctx.args
    payload = load_json(args.payload, args.payload_file, "--payload")
    await ctx.client.instance(args.instance_id).send_event(args.type, payload)
    if ctx.json:
        ctx.print(render.json_doc({"instance_id": args.instance_id, "type": args.type}))
    else:
        ctx.print(f"{args.instance_id}: sent event {args.type!r}")
    return EXIT_OK


# --- watch ------------------------------------------------------------------------


async def _watch(ctx: Context) -> int:
    handle = ctx.client.instance(ctx.args.instance_id)
    live = not ctx.json and ctx.out.isatty() and os.environ.get("TERM") != "dumb"
    view = await (_watch_live(ctx, handle) if live else _watch_lines(ctx, handle))
    return _outcome(view)


async def _watch_lines(ctx: Context, handle: InstanceHandle) -> InstanceView:
    """One line per event, from the first: for pipes, logs and ``--json``."""
    view = InstanceView(instance_id=handle.id)
    lines = render.EventLines(_style(ctx.out))
    async with _closing(handle.watch(after_sequence=0)) as events:
        async for event in events:
            item = event_view(event)
            render.apply_event(view, item)
            if ctx.json:
                ctx.print(render.json_line(item.to_json()))
            else:
                for line in lines.lines(item):
                    ctx.print(line)
    return view


class _LiveView:
    """The state of the live view: the instance as last known, and its screen."""

    def __init__(self, ctx: Context, view: InstanceView) -> None:
        self.ctx = ctx
        self.view = view
        self.screen = render.LiveScreen()
        self.style = _style(ctx.out)
        self.changed = asyncio.Event()

    def draw(self) -> None:
        size = shutil.get_terminal_size()
        lines = render.live_lines(self.view, _now(), self.style)
        # One row spare: a frame as tall as the screen would scroll, and the
        # next redraw could not move up over all of it.
        lines = render.fit(render.clip(lines, size.lines - 1), size.columns)
        self.ctx.out.write(self.screen.frame(lines))
        self.ctx.out.flush()

    async def follow(self, handle: InstanceHandle) -> None:
        """Fold the instance's events into the view until its final one."""
        events = handle.watch(after_sequence=self.view.last_sequence)
        async with _closing(events) as stream:
            async for event in stream:
                item = event_view(event)
                render.apply_event(self.view, item)
                if item.kind == "status_changed" and not item.final:
                    # Events do not carry wake-up times nor the step a wait is
                    # on; a fresh read does. It may be ahead of the stream:
                    # apply_event skips the events it already holds.
                    with contextlib.suppress(CruzflowError):
                        fresh = instance_view(await handle.status())
                        if fresh.last_sequence >= self.view.last_sequence:
                            self.view = fresh
                self.changed.set()


async def _watch_live(ctx: Context, handle: InstanceHandle) -> InstanceView:
    """A compact view redrawn in place on a terminal: status line, one line per step."""
    state = _LiveView(ctx, instance_view(await handle.status()))
    ctx.out.write(render.LiveScreen.HIDE_CURSOR)
    follower: asyncio.Task[None] | None = None
    try:
        state.draw()
        if state.view.final:
            return state.view
        follower = asyncio.create_task(state.follow(handle))
        while not follower.done():
            changed = asyncio.ensure_future(state.changed.wait())
            # Redraw on news, and at least every second so running times tick.
            await asyncio.wait({follower, changed}, timeout=1.0, return_when="FIRST_COMPLETED")
            changed.cancel()
            state.changed.clear()
            state.draw()
        follower.result()  # a failure of the watch (server gone for good) surfaces here
        # The last frame from a fresh read: the first read may have caught the
        # instance between its row and its steps, and the events since only
        # patch what they name. (Unless it was restarted in the meantime.)
        with contextlib.suppress(CruzflowError):
            fresh = instance_view(await handle.status())
            if fresh.final and fresh.last_sequence >= state.view.last_sequence:
                state.view = fresh
        state.draw()
        return state.view
    finally:
        if follower is not None and not follower.done():
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, CruzflowError):
                await follower
        ctx.out.write(render.LiveScreen.SHOW_CURSOR)
        ctx.out.flush()
