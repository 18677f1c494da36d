"""The machinery of ``cruzflow check`` and of exported instances: histories
read from a server, a store file or an export, replayed against a config's
workflow code (``engine.replay``), and the report of what would break."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import textwrap
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from cruzflow.client import Client, InstanceNotFound, InstanceStatusInfo
from cruzflow.client import InstanceStatus as ClientStatus
from cruzflow.client._client import EXPORT_FORMAT
from cruzflow.client._convert import instance as instance_info
from cruzflow.sdk.api import Env
from cruzflow.server.bindings import ServerLink, config_values
from cruzflow.server.engine.replay import History, ReplayResult, breaks, replay
from cruzflow.server.engine.steps import to_json
from cruzflow.server.records import (
    FINISHED,
    UNFINISHED,
    InstanceQuery,
    InstanceRecord,
    InstanceStatus,
    StepKind,
    StepRecord,
    StepStatus,
)
from cruzflow.v1 import workflows_pb2 as pb

# Instances fetched from a server at once while the check replays.
_FETCHES = 32
# Instances listed per breaking workflow in the text report (all in --json).
_SHOWN = 10


def _ms(when: datetime | None) -> int:
    return int(when.timestamp() * 1000) if when is not None else 0


def history_of_info(info: InstanceStatusInfo) -> History:
    """An instance as the client reads it (GetStatus, with its steps)."""
    steps = []
    for s in info.steps:
        status = StepStatus[s.status.name] if s.status.name in StepStatus.__members__ else None
        kind = StepKind[s.kind.name] if s.kind.name in StepKind.__members__ else None
        if status is None or kind is None:
            raise ValueError(
                f"instance {info.id!r}: step {s.name!r} has a status or kind this cruzflow does "
                f"not know ({s.status}, {s.kind}); use a cruzflow as new as the server"
            )
        succeeded = status is StepStatus.SUCCEEDED
        steps.append(
            StepRecord(
                info.id,
                s.index,
                s.name,
                s.occurrence,
                status,
                s.attempts,
                _ms(s.start_time),
                _ms(s.end_time) or None,
                output=to_json(s.output) if succeeded else None,
                error_name=s.error.name if s.error else None,
                error_message=s.error.message if s.error else None,
                kind=kind,
                event_type=s.child_id or s.event_type,
                error_traceback=s.error.traceback if s.error else None,
            )
        )
    return History(
        info.id, info.workflow, InstanceStatus[info.status.name], to_json(info.params),
        _ms(info.create_time), tuple(steps),
        to_json(info.output) if info.status is ClientStatus.COMPLETE else None,
        (info.error.name, info.error.message) if info.error else None,
    )  # fmt: skip


def history_of_record(record: InstanceRecord, steps: Iterable[StepRecord]) -> History:
    """An instance as the store holds it."""
    error = (record.error_name or "", record.error_message or "") if record.error_name else None
    return History(
        record.id, record.workflow, record.status, record.params, record.created_at,
        tuple(steps), record.output, error,
    )  # fmt: skip


def load_export(fixture: Mapping[str, Any] | str | Path) -> tuple[History, list[dict[str, Any]]]:
    """An exported instance (``cruzflow export``, ``InstanceHandle.export``):
    the data, its JSON text, or the path of its file; with its events."""
    if isinstance(fixture, Path) or (isinstance(fixture, str) and fixture.lstrip()[:1] != "{"):
        fixture = Path(fixture).read_text()
    data = json.loads(fixture) if isinstance(fixture, str) else fixture
    if not isinstance(data, Mapping) or data.get("format") != EXPORT_FORMAT:
        raise ValueError(
            f"not an exported instance: expected an object with format {EXPORT_FORMAT!r}, "
            f"as `cruzflow export ID > fixture.json` writes"
        )
    message = json_format.ParseDict(data["instance"], pb.Instance(), ignore_unknown_fields=True)
    events = list(data.get("events") or [])
    return history_of_info(instance_info(message)), events


async def export_instance(engine: Any, instance_id: str) -> dict[str, Any]:
    """What ``InstanceHandle.export`` of the client returns, read from an
    engine in-process (the test kit's ``InstanceHandle.export``)."""
    from cruzflow.server.transport import convert

    record, steps = await engine.get(instance_id)
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        page = await engine.store.read_events(instance_id, after, 1000)
        events += [json_format.MessageToDict(convert.event(e)) for e in page]
        if len(page) < 1000:
            break
        after = page[-1].seq
    return {
        "format": EXPORT_FORMAT,
        "instance": json_format.MessageToDict(
            convert.instance(record, steps, engine.limits.max_payload_bytes)
        ),
        "events": events,
    }


# ---------------------------------------------------------------------- check
@dataclass(slots=True)
class WorkflowCheck:
    """What the check found for one workflow."""

    name: str
    hosted: bool
    checked: int = 0
    clean: int = 0
    broken: list[tuple[History, ReplayResult | None]] = field(default_factory=list)


@dataclass(slots=True)
class Report:
    workflows: dict[str, WorkflowCheck] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def checked(self) -> int:
        return sum(w.checked for w in self.workflows.values())

    @property
    def breaking(self) -> int:
        return sum(len(w.broken) for w in self.workflows.values())


class Checker:
    """Replays histories against a config's workflows, one after another."""

    def __init__(self, specs: Mapping[str, Any], env: Any) -> None:
        self._specs = specs
        self._env = env
        self.report = Report({n: WorkflowCheck(n, True) for n in sorted(specs)})

    async def check(self, history: History) -> None:
        entry = self.report.workflows.get(history.workflow)
        if entry is None:
            entry = self.report.workflows[history.workflow] = WorkflowCheck(history.workflow, False)
        entry.checked += 1
        spec = self._specs.get(history.workflow)
        if spec is None:
            # Unfinished, it could not go on: the new server would not host it.
            if not history.status.finished:
                entry.broken.append((history, None))
            else:
                entry.clean += 1
            return
        result = await replay(spec.cls, self._env, history)
        if breaks(history, result):
            entry.broken.append((history, result))
        else:
            entry.clean += 1


async def _from_server(
    client: Client, workflows: list[str] | None, finished: int, finished_of: list[str]
) -> AsyncIterator[History]:
    """Histories of the unfinished instances (of ``workflows``, or all) and of
    the newest ``finished`` ones of each of ``finished_of`` that a server
    holds, fetched a few at a time."""
    unfinished = [ClientStatus[s.name] for s in UNFINISHED]
    ended = [ClientStatus[s.name] for s in FINISHED]
    names: list[str | None] = list(workflows) if workflows else [None]
    ids: list[str] = []
    for name in names:
        async for info in client.list_instances(workflow=name, status=unfinished, page_size=500):
            ids.append(info.id)
    if finished:
        for name in finished_of:
            taken = 0
            async for info in client.list_instances(workflow=name, status=ended, page_size=500):
                ids.append(info.id)
                taken += 1
                if taken >= finished:
                    break
    gate = asyncio.Semaphore(_FETCHES)

    async def fetch(instance_id: str) -> InstanceStatusInfo | None:
        async with gate:
            try:
                return await client.instance(instance_id).status()
            except InstanceNotFound:
                return None  # purged by retention meanwhile

    for batch in range(0, len(ids), 512):
        tasks = [asyncio.ensure_future(fetch(i)) for i in ids[batch : batch + 512]]
        try:
            for task in tasks:
                found = await task
                if found is not None:
                    yield history_of_info(found)
        finally:
            for task in tasks:
                task.cancel()


async def _from_store(
    path: Path, workflows: list[str] | None, finished: int, finished_of: list[str]
) -> AsyncIterator[History]:
    """The same, read from a SQLite store file (read-only: a server may run on it)."""
    from cruzflow.server.store.sqlite import SqliteStore

    store = SqliteStore(path)
    await store.open_read_only()
    try:
        names: list[str | None] = list(workflows) if workflows else [None]
        queries: list[tuple[InstanceQuery, int | None]] = [
            (InstanceQuery(workflow=name, statuses=UNFINISHED), None) for name in names
        ]
        if finished:
            ended = tuple(FINISHED)
            queries += [(InstanceQuery(workflow=n, statuses=ended), finished) for n in finished_of]
        for query, most in queries:
            taken = 0
            while most is None or taken < most:
                page = await store.list_instances(query, 500 if most is None else most - taken)
                for _, record in page:
                    yield history_of_record(record, await store.get_steps(record.id))
                taken += len(page)
                if not page or (most is None and len(page) < 500):
                    break
                query = dataclasses.replace(query, older_than=page[-1][0])
    finally:
        await store.close()


def _describe(history: History, result: ReplayResult | None) -> str:
    status = history.status.label
    if result is None:
        return (
            f"{history.instance_id} ({status}): workflow {history.workflow!r} is not in the new "
            f"config, so the instance could not go on; keep it hosted until it ends"
        )
    if result.divergence is not None:
        return f"{history.instance_id} ({status}): {result.divergence.message}"
    name, message = result.error or ("", "")
    return f"{history.instance_id} ({status}): the new code fails it: {name}: {message}"


def report_json(report: Report) -> dict[str, Any]:
    def instance(history: History, result: ReplayResult | None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "instance_id": history.instance_id,
            "status": history.status.label,
            "problem": _describe(history, result).split(": ", 1)[1],
        }
        if result is not None and result.divergence is not None:
            d = result.divergence
            doc["position"] = d.index
            doc["recorded"] = None if d.recorded is None else {
                "kind": d.recorded.kind, "name": d.recorded.name,
                "occurrence": d.recorded.occurrence,
            }  # fmt: skip
            doc["code"] = None if d.code is None else {
                "kind": d.code.kind, "name": d.code.name, "occurrence": d.code.occurrence,
            }  # fmt: skip
        elif result is not None and result.error is not None:
            doc["error"] = {"name": result.error[0], "message": result.error[1]}
        return doc

    return {
        "ok": report.breaking == 0,
        "checked": report.checked,
        "breaking": report.breaking,
        "seconds": round(report.seconds, 3),
        "workflows": [
            {
                "workflow": w.name,
                "hosted": w.hosted,
                "checked": w.checked,
                "clean": w.clean,
                "breaking": [instance(h, r) for h, r in w.broken],
            }
            for w in report.workflows.values()
        ],
    }


def report_lines(report: Report) -> list[str]:
    lines = []
    for w in report.workflows.values():
        head = f"{w.name}: {w.checked:,} replayed, {w.clean:,} clean"
        if w.broken:
            head += f", {len(w.broken):,} would break"
        if not w.hosted:
            head += " (not in the new config)"
        lines.append(head)
        for history, result in w.broken[:_SHOWN]:
            lines.extend(textwrap.wrap(_describe(history, result), 100, initial_indent="  ",
                                       subsequent_indent="    "))  # fmt: skip
        if len(w.broken) > _SHOWN:
            lines.append(f"  ... and {len(w.broken) - _SHOWN:,} more (--json lists them all)")
    verdict = (
        "the new code replays every one cleanly"
        if not report.breaking
        else f"{report.breaking:,} would break"
    )
    lines.append(
        f"checked {report.checked:,} instances of {len(report.workflows)} workflows in "
        f"{report.seconds:.1f} s: {verdict}"
    )
    return lines


async def run_check(
    config_path: str,
    *,
    store: str | None,
    client: Client | None,
    workflows: list[str] | None,
    finished: int,
) -> Report:
    """Check the histories of ``store`` (a SQLite file) or of the server
    behind ``client`` against the workflows of the config at ``config_path``."""
    from cruzflow.server.config import load_config

    config = load_config(config_path)
    unknown = sorted(set(workflows or ()) - set(config.workflows))
    if unknown:
        raise ValueError(
            f"--workflow {', '.join(unknown)}: not a workflow of {config_path} (it has: "
            f"{', '.join(sorted(config.workflows)) or 'none'})"
        )
    started = time.monotonic()
    # The env the new server would give the classes (run() may read a
    # binding); nothing connects, as no step body runs.
    env = Env(config_values(config, ServerLink()))
    checker = Checker(config.workflows, env)
    finished_of = workflows or sorted(config.workflows)
    if store is not None:
        source = _from_store(Path(store), workflows, finished, finished_of)
    else:
        assert client is not None
        source = _from_server(client, workflows, finished, finished_of)
    try:
        async for history in source:
            await checker.check(history)
    finally:
        await env.aclose()
    checker.report.seconds = time.monotonic() - started
    return checker.report
