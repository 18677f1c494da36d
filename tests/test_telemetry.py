"""OpenTelemetry: the span tree of a run, trace context from the caller,
metrics after a known workload, and log records that name their instance.

The SDK's in-memory exporters stand in for a backend; the engine and the
gRPC server are the real ones on a real SQLite file.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, StatusCode, TraceFlags

from cruzflow.server.app import Service
from cruzflow.server.config import ConfigError, load_config
from cruzflow.server.engine.runtime import Engine, Limits
from cruzflow.server.records import InstanceStatus
from cruzflow.server.store.sqlite import SqliteStore
from cruzflow.server.telemetry import (
    JsonFormatter,
    Providers,
    Settings,
    Telemetry,
    TextFormatter,
    _CallerTrace,
    _TraceFields,
)
from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc as pb_grpc
from tests.conftest import ALL_WORKFLOWS, eventually, finished, specs
from tests.procs import write_config


class Recorded:
    """In-memory exporters behind real SDK providers."""

    def __init__(self, rpc_spans: str = "none") -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.providers = Providers.of(
            self.tracer_provider, self.meter_provider, rpc_spans=rpc_spans
        )

    @property
    def observer(self) -> Telemetry:
        assert self.providers.observer is not None
        return self.providers.observer

    def finished_spans(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def named(self, prefix: str) -> list[ReadableSpan]:
        return [s for s in self.finished_spans() if s.name.startswith(prefix)]

    def metric(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, value) of every point of a metric; value is the sum, the
        gauge value, or the histogram's count."""
        data = self.reader.get_metrics_data()
        out: list[tuple[dict[str, Any], Any]] = []
        if data is None:
            return out
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != name:
                        continue
                    for point in metric.data.data_points:
                        value = getattr(point, "value", None)
                        if value is None:
                            value = point.count  # type: ignore[union-attr]
                        out.append((dict(point.attributes or {}), value))
        return out

    def total(self, name: str, **match: Any) -> Any:
        return sum(
            value
            for attrs, value in self.metric(name)
            if all(attrs.get(k) == v for k, v in match.items())
        )


@pytest.fixture
def rpc_spans() -> str:
    """The default; a test parametrized on ``rpc_spans`` gets its own."""
    return "none"


@pytest.fixture
def recorded(rpc_spans: str) -> Recorded:
    return Recorded(rpc_spans)


@pytest.fixture
async def traced_engine(tmp_path: Path, recorded: Recorded) -> AsyncIterator[Engine]:
    store = SqliteStore(tmp_path / "store.db")
    await store.open()
    engine = Engine(store, specs(), None, Limits(), recorded.observer)
    await engine.start()
    yield engine
    if not engine.stopping:
        await engine.shutdown(0.1)
    await store.close()


def _hex(span_id: int) -> str:
    return format(span_id, "016x")


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_span_tree_of_three_steps_with_a_retry_and_a_sleep(
    traced_engine: Engine, recorded: Recorded
) -> None:
    # A nap long enough that the run parks and a second run finishes it.
    instance_id, _ = await traced_engine.create("traced", params='{"nap_ms": 300}')
    record = await finished(traced_engine, instance_id)
    assert record.status == InstanceStatus.COMPLETE
    assert json.loads(record.output) == 6

    runs = recorded.named("run traced")
    assert len(runs) == 2, [s.name for s in recorded.finished_spans()]
    first, second = sorted(runs, key=lambda s: s.start_time or 0)
    # One trace for the instance, rooted at the create span.
    (create,) = recorded.named("create")
    trace_ids = {s.context.trace_id for s in recorded.finished_spans()}
    assert trace_ids == {create.context.trace_id}
    for run in runs:
        assert run.parent is not None and run.parent.span_id == create.context.span_id
        assert attrs(run)["cruzflow.instance.id"] == instance_id
        assert attrs(run)["cruzflow.workflow.name"] == "traced"
    assert attrs(first)["cruzflow.instance.status"] == "waiting"
    assert attrs(first)["cruzflow.run.replayed_steps"] == 0
    assert [e.name for e in first.events] == ["parked"]
    assert attrs(second)["cruzflow.instance.status"] == "complete"
    # fetch, charge and the pending nap were on record when the second run began.
    assert attrs(second)["cruzflow.run.replayed_steps"] == 3

    steps = recorded.named("step traced/")
    # One span per attempt; the replay made none for fetch and charge.
    assert [(s.name, attrs(s)["cruzflow.step.attempt"]) for s in steps] == [
        ("step traced/fetch", 1),
        ("step traced/charge", 1),
        ("step traced/charge", 2),
        ("step traced/notify", 1),
    ]
    fetch, charge1, charge2, notify = steps
    assert {fetch.parent.span_id, charge1.parent.span_id, charge2.parent.span_id} == {  # type: ignore[union-attr]
        first.context.span_id
    }
    assert notify.parent is not None and notify.parent.span_id == second.context.span_id
    assert attrs(charge1)["cruzflow.step.outcome"] == "retrying"
    assert attrs(charge1)["cruzflow.step.retry_delay_s"] == 0
    assert charge1.status.status_code == StatusCode.ERROR
    assert "ConnectionError: the card service hung up" in (charge1.status.description or "")
    (exception,) = [e for e in charge1.events if e.name == "exception"]
    assert (exception.attributes or {})["exception.type"] == "ConnectionError"
    assert attrs(charge2)["cruzflow.step.outcome"] == "succeeded"
    assert charge2.status.status_code == StatusCode.UNSET
    assert attrs(charge2)["cruzflow.step.occurrence"] == 1
    assert attrs(charge2)["cruzflow.step.index"] == 1

    (nap,) = recorded.named("sleep traced/nap")
    assert nap.parent is not None and nap.parent.span_id == second.context.span_id
    # The sleep span covers the whole nap, from the first run into the second.
    assert nap.start_time is not None and nap.end_time is not None
    assert nap.end_time - nap.start_time >= 300 * 1_000_000 - 2_000_000
    assert nap.start_time < (second.start_time or 0)


async def test_failed_step_and_run_carry_the_error(
    traced_engine: Engine, recorded: Recorded
) -> None:
    instance_id, _ = await traced_engine.create("raises")
    record = await finished(traced_engine, instance_id)
    assert record.status == InstanceStatus.ERRORED
    # retries.limit=1: a retried attempt, then the last one.
    retried, step = recorded.named("step raises/boom")
    assert attrs(retried)["cruzflow.step.outcome"] == "retrying"
    assert attrs(step)["cruzflow.step.outcome"] == "failed"
    assert step.status.status_code == StatusCode.ERROR
    (raised,) = [e for e in step.events if e.name == "exception"]
    stack = (raised.attributes or {})["exception.stacktrace"]
    assert isinstance(stack, str) and stack == record.error_traceback
    assert 'raise ValueError("bad input row 7")' in stack
    (run,) = recorded.named("run raises")
    assert run.status.status_code == StatusCode.ERROR
    assert record.error_name is not None and record.error_name in (run.status.description or "")
    assert attrs(run)["cruzflow.instance.status"] == "errored"
    # The run's span records the error that ended the instance, with its traceback.
    (ended,) = [e for e in run.events if e.name == "exception"]
    assert dict(ended.attributes or {}) == {
        "exception.type": "ValueError",
        "exception.message": "bad input row 7",
        "exception.stacktrace": record.error_traceback,
        "exception.escaped": "True",
    }


async def test_an_error_raised_by_run_is_on_its_span_and_in_the_log(
    traced_engine: Engine, recorded: Recorded
) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("cruzflow")
    logger.addHandler(handler)
    try:
        instance_id, _ = await traced_engine.create("raises-outside")
        record = await finished(traced_engine, instance_id)
    finally:
        logger.removeHandler(handler)
    assert record.error_traceback is not None
    assert 'raise KeyError("missing-key")' in record.error_traceback
    (run,) = recorded.named("run raises-outside")
    (ended,) = [e for e in run.events if e.name == "exception"]
    assert (ended.attributes or {})["exception.stacktrace"] == record.error_traceback
    # The log's line about it is followed by the traceback itself.
    text = stream.getvalue()
    line = f"instance {instance_id} errored: run() raised KeyError: 'missing-key'"
    assert line in text
    after = text.split(line, 1)[1].split("\n", 1)[1]
    assert after.startswith(record.error_traceback.rstrip())


async def test_event_wait_is_a_span(traced_engine: Engine, recorded: Recorded) -> None:
    instance_id, _ = await traced_engine.create("approval")

    async def waiting() -> bool:
        return (await traced_engine.get(instance_id))[0].status == InstanceStatus.WAITING

    await eventually(waiting)
    await traced_engine.send_event(instance_id, "approval", '{"ok": true}')
    await finished(traced_engine, instance_id)
    (wait,) = recorded.named("wait_for_event approval/approval")
    assert attrs(wait)["cruzflow.event.type"] == "approval"
    assert attrs(wait)["cruzflow.step.outcome"] == "succeeded"


SENDER = SpanContext(
    0x5E7D0000000000000000000000000001, 0x5E7D000000000001, True, TraceFlags(TraceFlags.SAMPLED)
)


async def test_the_wait_links_to_its_sender_across_an_engine_restart(
    tmp_path: Path, traced_engine: Engine, recorded: Recorded, gate: asyncio.Event
) -> None:
    # Sent while the first step holds (the gate is shut), so the wait takes it
    # only after a restart: the sender's context comes back from the store.
    instance_id, _ = await traced_engine.create("blocks-then-waits")
    with trace.use_span(NonRecordingSpan(SENDER)):
        await traced_engine.send_event(instance_id, "approval", '{"ok": true}')
    await traced_engine.shutdown(0.1)
    await traced_engine.store.close()
    assert recorded.named("wait_for_event") == []

    again = Recorded()
    store = SqliteStore(tmp_path / "store.db")
    await store.open()
    engine = Engine(store, specs(), None, Limits(), again.observer)
    gate.set()
    await engine.start()
    try:
        record = await finished(engine, instance_id)
    finally:
        await engine.shutdown(0.1)
        await store.close()
    assert record.status == InstanceStatus.COMPLETE
    (wait,) = again.named("wait_for_event blocks-then-waits/approval")
    (link,) = wait.links
    assert (link.context.trace_id, link.context.span_id) == (SENDER.trace_id, SENDER.span_id)
    assert link.context.is_remote and link.context.trace_flags.sampled
    assert dict(link.attributes or {}) == {"cruzflow.link": "send_event"}
    # The wait stays in its instance's trace; the link only points at the sender's.
    (run,) = again.named("run blocks-then-waits")
    assert wait.context.trace_id == run.context.trace_id != SENDER.trace_id


async def test_metrics_after_a_known_workload(
    tmp_path: Path, traced_engine: Engine, recorded: Recorded, gate: asyncio.Event
) -> None:
    engine = traced_engine
    done = [(await engine.create("three-steps"))[0] for _ in range(3)]
    failed = (await engine.create("raises"))[0]
    flaky = (await engine.create("flaky", params='{"failures": 1, "limit": 3}'))[0]
    held = (await engine.create("blocks"))[0]
    for _ in range(2):
        await engine.create("naps", params='{"ms": 3600000}')
    for instance_id in [*done, failed]:
        await finished(engine, instance_id)
    await finished(engine, flaky, timeout=30)
    await engine.terminate(held)

    async def two_waiting() -> bool:
        return recorded.observer.count(InstanceStatus.WAITING) == 2

    await eventually(two_waiting)

    assert (
        recorded.total("cruzflow.instances.created", **{"cruzflow.workflow.name": "three-steps"})
        == 3
    )
    assert recorded.total("cruzflow.instances.created") == 8
    finished_by = {
        (a["cruzflow.workflow.name"], a["cruzflow.instance.status"]): v
        for a, v in recorded.metric("cruzflow.instances.finished")
    }
    assert finished_by == {
        ("three-steps", "complete"): 3,
        ("raises", "errored"): 1,
        ("flaky", "complete"): 1,
        ("blocks", "terminated"): 1,
    }
    attempts = {
        (a["cruzflow.step.name"], a["cruzflow.step.outcome"]): v
        for a, v in recorded.metric("cruzflow.step.attempts")
        if a["cruzflow.workflow.name"] in ("flaky", "raises")
    }
    assert attempts == {
        ("flaky", "retrying"): 1,
        ("flaky", "succeeded"): 1,
        ("fine", "succeeded"): 1,
        ("boom", "retrying"): 1,
        ("boom", "failed"): 1,
    }
    assert recorded.total("cruzflow.step.failures") == 1
    # Three steps of three-steps each, plus the "before" steps of the sleepers.
    assert (
        recorded.total("cruzflow.step.duration", **{"cruzflow.workflow.name": "three-steps"}) == 9
    )
    assert recorded.total("cruzflow.store.commit.duration") >= 1
    assert recorded.total("cruzflow.store.commit.rows") == recorded.total(
        "cruzflow.store.commit.duration"
    )
    gauge = {a["cruzflow.instance.status"]: v for a, v in recorded.metric("cruzflow.instances")}
    assert gauge["waiting"] == 2
    assert gauge["running"] == 0
    assert gauge["queued"] == 0

    # A new engine on the same store starts from the stored counts.
    await engine.shutdown(0.1)
    await engine.store.close()
    again = Recorded()
    store = SqliteStore(tmp_path / "store.db")
    await store.open()
    second = Engine(store, specs(), None, Limits(), again.observer)
    await second.start()
    try:
        assert again.observer.count(InstanceStatus.WAITING) == 2
        gauge = {a["cruzflow.instance.status"]: v for a, v in again.metric("cruzflow.instances")}
        assert gauge["waiting"] == 2
    finally:
        await second.shutdown(0.1)
        await store.close()


async def test_step_logs_name_instance_step_and_trace(
    traced_engine: Engine, recorded: Recorded
) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_TraceFields())
    logger = logging.getLogger("cruzflow")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        instance_id, _ = await traced_engine.create("traced")
        await finished(traced_engine, instance_id)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    (retry,) = [r for r in records if "retrying" in r["message"]]
    assert retry["traceback"].startswith("Traceback (most recent call last):")
    assert retry["traceback"].endswith("ConnectionError: the card service hung up\n")
    assert retry["instance_id"] == instance_id
    assert retry["workflow"] == "traced"
    assert retry["step"] == "charge"
    assert retry["attempt"] == 1
    assert retry["level"] == "INFO"
    (charge1,) = [
        s for s in recorded.named("step traced/charge") if attrs(s)["cruzflow.step.attempt"] == 1
    ]
    # The record was written inside the run: it carries the run's trace.
    assert retry["trace_id"] == format(charge1.context.trace_id, "032x")


async def test_log_records_go_through_the_logs_api(
    traced_engine: Engine, recorded: Recorded
) -> None:
    exported = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(exported))
    providers = Providers.of(logger_provider=logger_provider)
    assert providers.observer is None  # logs alone tell the engine nothing
    logger = logging.getLogger("cruzflow")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    handler = providers.log_to_provider(logger)
    assert handler is not None
    # A stderr-like handler first, whose filter puts the ids on the record.
    plain = logging.StreamHandler(io.StringIO())
    plain.addFilter(_TraceFields())
    logger.handlers.insert(0, plain)
    try:
        instance_id, _ = await traced_engine.create("traced")
        await finished(traced_engine, instance_id)
        # What the exporters log from their own thread is not sent again.
        token = otel_context.attach(otel_context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            logger.warning("export failed")
        finally:
            otel_context.detach(token)
    finally:
        logger.removeHandler(plain)
        logger.setLevel(old_level)
        await asyncio.to_thread(providers.shutdown)
    assert handler not in logger.handlers
    records = [r.log_record for r in exported.get_finished_logs()]
    assert not [r for r in records if r.body == "export failed"]
    (retry,) = [r for r in records if "retrying" in str(r.body)]
    assert retry.body == (
        "step 'charge' attempt 1 failed (ConnectionError: the card service hung up); "
        "retrying in 0 s"
    )
    assert retry.severity_text == "INFO"
    (charge1,) = [
        s for s in recorded.named("step traced/charge") if attrs(s)["cruzflow.step.attempt"] == 1
    ]
    # Logged before the attempt's span ended: in its span.
    assert (retry.trace_id, retry.span_id) == (charge1.context.trace_id, charge1.context.span_id)
    attributes = dict(retry.attributes or {})
    assert {k: attributes[k] for k in ("instance_id", "workflow", "step", "attempt")} == {
        "instance_id": instance_id,
        "workflow": "traced",
        "step": "charge",
        "attempt": 1,
    }
    assert str(attributes["traceback"]).endswith("ConnectionError: the card service hung up\n")
    assert "trace_id" not in attributes and "span_id" not in attributes


def test_text_format_appends_the_instance_fields() -> None:
    record = logging.LogRecord(
        "cruzflow.engine", logging.WARNING, __file__, 1, "step %r failed", ("x",), None
    )
    record.instance_id = "abc"
    record.step = "x"
    line = TextFormatter().format(record)
    assert line.endswith("step 'x' failed [instance_id=abc step=x]")


# ------------------------------------------------------------------ gRPC
@pytest.fixture
async def traced_server(
    tmp_path: Path, recorded: Recorded
) -> AsyncIterator[tuple[Service, pb_grpc.WorkflowServiceAsyncStub]]:
    config = load_config(write_config(tmp_path, ALL_WORKFLOWS))
    service = Service(config, recorded.providers)
    await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    yield service, pb_grpc.WorkflowServiceStub(channel)
    await channel.close()
    await service.stop(0.1)


CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.mark.parametrize("rpc_spans", ["all"])
async def test_create_joins_the_callers_trace(
    traced_server: tuple[Service, pb_grpc.WorkflowServiceAsyncStub], recorded: Recorded
) -> None:
    service, stub = traced_server
    metadata = (("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),)
    created = await stub.CreateInstance(
        pb.CreateInstanceRequest(workflow="traced"), metadata=metadata
    )
    await finished(service.engine, created.instance_id)
    # The server span comes from the gRPC instrumentation, child of the caller's span.
    (server_span,) = [
        s for s in recorded.finished_spans() if s.name.endswith("WorkflowService/CreateInstance")
    ]
    assert format(server_span.context.trace_id, "032x") == CLIENT_TRACE
    assert server_span.parent is not None and _hex(server_span.parent.span_id) == CLIENT_SPAN
    (run,) = recorded.named("run traced")
    assert format(run.context.trace_id, "032x") == CLIENT_TRACE
    assert run.parent is not None and run.parent.span_id == server_span.context.span_id
    for step in recorded.named("step traced/"):
        assert format(step.context.trace_id, "032x") == CLIENT_TRACE
    # The context is stored with the instance, for the runs after a restart.
    record = await service.store.get_instance(created.instance_id)
    assert record is not None and record.trace_parent is not None
    assert CLIENT_TRACE in record.trace_parent
    # No create span of its own: the caller's trace was there.
    assert recorded.named("create") == []


@pytest.mark.parametrize("rpc_spans", ["all"])
async def test_health_checks_make_no_spans(
    traced_server: tuple[Service, pb_grpc.WorkflowServiceAsyncStub], recorded: Recorded
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    service, stub = traced_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    await stub.ListWorkflows(pb.ListWorkflowsRequest())
    names = [s.name for s in recorded.finished_spans()]
    assert any(n.endswith("ListWorkflows") for n in names)
    assert not any("Health" in n for n in names)


SENDER_TRACE = "5e7d5e7d5e7d5e7d5e7d5e7d5e7d5e7d"
SENDER_SPAN = "5e7d0000000000aa"


async def _waiting(service: Service, instance_id: str) -> None:
    async def waiting() -> bool:
        return (await service.engine.get(instance_id))[0].status == InstanceStatus.WAITING

    await eventually(waiting)


@pytest.mark.parametrize("rpc_spans", ["none", "writes", "all"])
async def test_the_wait_links_to_the_send_event_call(
    traced_server: tuple[Service, pb_grpc.WorkflowServiceAsyncStub],
    recorded: Recorded,
    rpc_spans: str,
) -> None:
    service, stub = traced_server
    created = await stub.CreateInstance(pb.CreateInstanceRequest(workflow="approval"))
    await _waiting(service, created.instance_id)
    await stub.SendEvent(
        pb.SendEventRequest(
            instance_id=created.instance_id, type="approval", payload_json='{"ok": true}'
        ),
        metadata=(("traceparent", f"00-{SENDER_TRACE}-{SENDER_SPAN}-01"),),
    )
    record = await finished(service.engine, created.instance_id)
    assert record.status == InstanceStatus.COMPLETE
    (wait,) = recorded.named("wait_for_event approval/approval")
    (link,) = wait.links
    linked = (format(link.context.trace_id, "032x"), _hex(link.context.span_id))
    sends = [s for s in recorded.finished_spans() if s.name.endswith("WorkflowService/SendEvent")]
    if rpc_spans == "none":
        # No server span: the link is to the caller's own span.
        assert sends == []
        assert linked == (SENDER_TRACE, SENDER_SPAN)
    else:
        # The SendEvent call's server span, in its caller's trace.
        (send,) = sends
        assert send.parent is not None and _hex(send.parent.span_id) == SENDER_SPAN
        assert linked == (SENDER_TRACE, _hex(send.context.span_id))
    assert link.context.trace_flags.sampled
    assert dict(link.attributes or {}) == {"cruzflow.link": "send_event"}
    # The wait itself stays in its instance's trace.
    (run,) = [
        s
        for s in recorded.named("run approval")
        if attrs(s)["cruzflow.instance.status"] == "complete"
    ]
    assert wait.context.trace_id == run.context.trace_id != int(SENDER_TRACE, 16)
    assert wait.parent is not None and wait.parent.span_id == run.context.span_id


async def test_an_event_sent_outside_a_trace_links_nothing(
    traced_server: tuple[Service, pb_grpc.WorkflowServiceAsyncStub], recorded: Recorded
) -> None:
    service, stub = traced_server
    created = await stub.CreateInstance(pb.CreateInstanceRequest(workflow="approval"))
    await _waiting(service, created.instance_id)
    await stub.SendEvent(
        pb.SendEventRequest(instance_id=created.instance_id, type="approval", payload_json="1")
    )
    await finished(service.engine, created.instance_id)
    (wait,) = recorded.named("wait_for_event approval/approval")
    assert list(wait.links) == []


async def test_new_trace_after_links_late_runs(tmp_path: Path) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    # Any run that is not the first is "late" with a limit this small.
    providers = Providers.of(provider, None, new_trace_after_s=0.001)
    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    assert providers.observer is not None
    engine = Engine(store, specs(), None, Limits(), providers.observer)
    await engine.start()
    try:
        instance_id, _ = await engine.create("naps", params='{"ms": 200}')
        await finished(engine, instance_id)
    finally:
        await engine.shutdown(0.1)
        await store.close()
    (create,) = [s for s in spans.get_finished_spans() if s.name == "create"]
    runs = sorted(
        (s for s in spans.get_finished_spans() if s.name == "run naps"),
        key=lambda s: s.start_time or 0,
    )
    assert len(runs) == 2
    late = runs[1]
    assert late.context.trace_id != create.context.trace_id
    assert late.parent is None
    assert [link.context.span_id for link in late.links] == [create.context.span_id]


# --------------------------------------------------------- configuration
def test_telemetry_is_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    providers = Providers(Settings())
    assert providers.observer is None
    assert providers.server_interceptors() == []


def test_no_server_spans_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The standard gRPC instrumentation costs throughput even for the spans it
    # samples out: on request only. The caller's trace context is still read.
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    default = load_config(write_config(tmp_path, {})).telemetry
    assert default.rpc_spans == "none"
    providers = Providers(replace(default, traces="console"))
    try:
        (interceptor,) = providers.server_interceptors()
        assert isinstance(interceptor, _CallerTrace)
    finally:
        providers.shutdown()
    path = write_config(tmp_path, {})
    path.write_text(path.read_text() + '[telemetry]\nrpc_spans = "writes"\n')
    assert load_config(path).telemetry.rpc_spans == "writes"
    (interceptor,) = Providers.of(TracerProvider(), rpc_spans="writes").server_interceptors()
    assert not isinstance(interceptor, _CallerTrace)


def test_environment_wins_over_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    providers = Providers(Settings(traces="console", service_name="from-config"))
    try:
        assert providers.tracer_provider is None
        assert providers.meter_provider is not None
        assert (
            providers.meter_provider._sdk_config.resource.attributes["service.name"] == "from-env"
        )
    finally:
        providers.shutdown()


def test_logs_setting_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_LOGS_EXPORTER", raising=False)
    assert Providers(Settings()).logger_provider is None
    providers = Providers(Settings(logs="console", service_name="billing"))
    try:
        assert providers.logger_provider is not None
        assert providers.logger_provider.resource.attributes["service.name"] == "billing"
        # Logs alone give the engine no observer: nothing runs per step.
        assert providers.observer is None
        assert providers.server_interceptors() == []
    finally:
        providers.shutdown()
    monkeypatch.setenv("OTEL_LOGS_EXPORTER", "none")
    assert Providers(Settings(logs="otlp")).logger_provider is None
    monkeypatch.setenv("OTEL_LOGS_EXPORTER", "otlp")
    providers = Providers(Settings())
    try:
        assert providers.logger_provider is not None
    finally:
        providers.shutdown()
    monkeypatch.setenv("OTEL_LOGS_EXPORTER", "file")
    with pytest.raises(ValueError, match="OTEL_LOGS_EXPORTER"):
        Providers(Settings())


def test_sdk_disabled_turns_everything_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert Providers(Settings(traces="console", metrics="console")).observer is None


def test_a_bad_exporter_name_says_where_it_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER"):
        Providers(Settings())


def test_config_section_is_checked(tmp_path: Path) -> None:
    path = write_config(tmp_path, {})
    path.write_text(path.read_text() + '[telemetry]\ntraces = "jaeger"\n')
    with pytest.raises(ConfigError, match=r"telemetry\.traces"):
        load_config(path)
    path = write_config(tmp_path, {})
    path.write_text(
        path.read_text()
        + '[telemetry]\ntraces = "otlp"\notlp_endpoint = "http://127.0.0.1:4317"\n'
        + 'service_name = "billing"\nnew_trace_after = "1 day"\n'
    )
    settings = load_config(path).telemetry
    assert settings.traces == "otlp"
    assert settings.otlp_endpoint == "http://127.0.0.1:4317"
    assert settings.service_name == "billing"
    assert settings.new_trace_after_s == 86400
    assert settings.logs is None
    path = write_config(tmp_path, {})
    path.write_text(path.read_text() + '[telemetry]\nlogs = "otlp"\n')
    assert load_config(path).telemetry.logs == "otlp"
    path = write_config(tmp_path, {})
    path.write_text(path.read_text() + '[telemetry]\nlogs = "syslog"\n')
    with pytest.raises(ConfigError, match=r"telemetry\.logs"):
        load_config(path)


@pytest.fixture
def prometheus(monkeypatch: pytest.MonkeyPatch) -> Iterator[Providers]:
    for name in ("OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_PROMETHEUS_PORT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    providers = Providers(Settings(metrics="prometheus", prometheus_listen="127.0.0.1:0"))
    yield providers
    providers.shutdown()


async def test_prometheus_endpoint_serves_the_metrics(
    tmp_path: Path, prometheus: Providers
) -> None:
    assert prometheus.observer is not None and prometheus.prometheus_address is not None
    store = SqliteStore(tmp_path / "p.db")
    await store.open()
    engine = Engine(store, specs(), None, Limits(), prometheus.observer)
    await engine.start()
    try:
        instance_id, _ = await engine.create("three-steps")
        await finished(engine, instance_id)
    finally:
        await engine.shutdown(0.1)
        await store.close()
    host, port = prometheus.prometheus_address

    def scrape() -> str:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(scrape)
    created = [line for line in text.splitlines() if line.startswith("cruzflow_instances_created")]
    assert len(created) == 1 and 'cruzflow_workflow_name="three-steps"' in created[0], created
    assert created[0].endswith(" 1.0")
    assert "cruzflow_step_duration_seconds_count" in text
    assert "cruzflow_store_commit_duration_seconds_bucket" in text


async def test_rpc_spans_writes_leaves_out_the_reads(tmp_path: Path) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    config = load_config(write_config(tmp_path, ALL_WORKFLOWS))
    service = Service(config, Providers.of(provider, None, rpc_spans="writes"))
    await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = pb_grpc.WorkflowServiceStub(channel)
            created = await stub.CreateInstance(pb.CreateInstanceRequest(workflow="three-steps"))
            await stub.WaitInstance(pb.WaitInstanceRequest(instance_id=created.instance_id))
            await stub.GetStatus(pb.GetStatusRequest(instance_id=created.instance_id))
    finally:
        await service.stop(0.1)
    rpcs = sorted(s.name for s in spans.get_finished_spans() if s.name.startswith("/"))
    assert rpcs == ["/cruzflow.v1.WorkflowService/CreateInstance"]
    # The workflow's spans still sit under the create call.
    (server_span,) = [s for s in spans.get_finished_spans() if s.name.startswith("/")]
    (run,) = [s for s in spans.get_finished_spans() if s.name == "run three-steps"]
    assert run.parent is not None and run.parent.span_id == server_span.context.span_id


async def test_rpc_spans_none_puts_the_runs_under_the_callers_span(tmp_path: Path) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    config = load_config(write_config(tmp_path, ALL_WORKFLOWS))
    service = Service(config, Providers.of(provider, None, rpc_spans="none"))
    await service.start()
    metadata = (("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = pb_grpc.WorkflowServiceStub(channel)
            created = await stub.CreateInstance(
                pb.CreateInstanceRequest(workflow="three-steps"), metadata=metadata
            )
            batch = await stub.CreateInstances(
                pb.CreateInstancesRequest(
                    requests=[pb.CreateInstanceRequest(workflow="three-steps")]
                ),
                metadata=metadata,
            )
            untraced = await stub.CreateInstance(pb.CreateInstanceRequest(workflow="three-steps"))
            for instance_id in (
                created.instance_id,
                batch.instances[0].instance_id,
                untraced.instance_id,
            ):
                await stub.WaitInstance(pb.WaitInstanceRequest(instance_id=instance_id))
    finally:
        await service.stop(0.1)
    finished_spans = spans.get_finished_spans()
    assert not [s.name for s in finished_spans if s.name.startswith("/")]
    runs = {attrs(s)["cruzflow.instance.id"]: s for s in finished_spans if s.name.startswith("run")}
    for instance_id in (created.instance_id, batch.instances[0].instance_id):
        run = runs[instance_id]
        assert format(run.context.trace_id, "032x") == CLIENT_TRACE
        assert run.parent is not None and _hex(run.parent.span_id) == CLIENT_SPAN
    # A call without trace context gets a trace of its own, rooted at "create".
    (create,) = [s for s in finished_spans if s.name == "create"]
    lone = runs[untraced.instance_id]
    assert lone.context.trace_id == create.context.trace_id != int(CLIENT_TRACE, 16)
    assert lone.parent is not None and lone.parent.span_id == create.context.span_id
