"""The span pipeline (``cruzflow.server.spans``): records made from SDK spans
and back, and the exporter process, with a real OTLP/gRPC receiver.

The child process is the real one (``python -m cruzflow.server.spans``); the
receiver is ``bench.otlp_sink`` in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from bench.otlp_sink import OtlpSink
from cruzflow.server.spans import (
    ChildSink,
    PipeSpanProcessor,
    Record,
    encode,
    record_of,
    span_of,
)
from tests.procs import wait_for

RESOURCE = Resource({"service.name": "spans-test"})


def _record(n: int, trace_id: int = 0xABC) -> Record:
    return (
        f"span {n}",
        trace_id,
        n + 1,
        1,
        None,
        0,
        False,
        SpanKind.INTERNAL.value,
        1_000 + n,
        2_000 + n,
        {"n": n, "who": "test"},
        None,
        None,
        StatusCode.UNSET.value,
        None,
        ("cruzflow", None, None),
    )


def test_an_sdk_span_survives_the_round_trip() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("lib", "1.2")
    parent = SpanContext(0x1234, 0x99, True, TraceFlags(1), TraceState([("vendor", "x")]))
    linked = SpanContext(0x5678, 0x77, True, TraceFlags(1))
    span = tracer.start_span(
        "work",
        context=trace.set_span_in_context(trace.NonRecordingSpan(parent)),
        kind=SpanKind.SERVER,
        attributes={"a": 1, "b": "two", "c": 0.5, "d": True, "e": ("x", "y")},
        links=[Link(linked, {"why": "batch"})],
    )
    span.add_event("halfway", {"k": 3})
    span.record_exception(ValueError("bad"))
    span.set_status(Status(StatusCode.ERROR, "it failed"))
    span.end()
    (original,) = exporter.get_finished_spans()

    back = span_of(record_of(original), RESOURCE)

    assert back.name == "work"
    assert back.context == original.context
    assert back.parent is not None and original.parent is not None
    assert (back.parent.span_id, back.parent.is_remote) == (0x99, True)
    assert back.context is not None and back.context.trace_state.get("vendor") == "x"
    assert back.kind == SpanKind.SERVER
    assert dict(back.attributes or {}) == dict(original.attributes or {})
    assert [(e.name, e.timestamp, dict(e.attributes or {})) for e in back.events] == [
        (e.name, e.timestamp, dict(e.attributes or {})) for e in original.events
    ]
    assert [(lk.context.span_id, dict(lk.attributes or {})) for lk in back.links] == [
        (0x77, {"why": "batch"})
    ]
    assert (back.status.status_code, back.status.description) == (StatusCode.ERROR, "it failed")
    assert (back.start_time, back.end_time) == (original.start_time, original.end_time)
    assert back.instrumentation_scope is not None
    assert (back.instrumentation_scope.name, back.instrumentation_scope.version) == ("lib", "1.2")
    assert back.resource.attributes["service.name"] == "spans-test"


def test_the_encoding_is_the_sdk_encoders() -> None:
    """The child's OTLP encoding of records is byte for byte what the SDK's
    own encoder makes of the same spans."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    parent = SpanContext(0x1234, 0x99, True, TraceFlags(1), TraceState([("a", "1"), ("b", "2")]))
    for scope, version in (("lib", "1.2"), ("other", None)):
        span = provider.get_tracer(scope, version).start_span(
            f"from {scope}",
            context=trace.set_span_in_context(trace.NonRecordingSpan(parent)),
            kind=SpanKind.CLIENT,
            attributes={"s": "x", "i": 7, "f": 1.5, "b": False, "arr": ("p", "q"), "ints": (1, 2)},
            links=[Link(SpanContext(0x5, 0x6, False, TraceFlags(1)), {"k": "v"})],
        )
        span.record_exception(RuntimeError("boom"))
        span.set_status(Status(StatusCode.ERROR, "it broke"))
        span.end()
    root = provider.get_tracer("lib", "1.2").start_span("root", attributes={"n": 1})
    root.set_status(Status(StatusCode.OK))
    root.end()
    records = [record_of(s) for s in exporter.get_finished_spans()]
    # The engine's own records: no scope version, a local parent, no attributes.
    records += [
        _record(1),
        ("bare", 0xAB, 0xCD, 1, None, 0xEF, False, 0, 5, 6, None, None, None, 0, None, None),
    ]

    ours = encode(records, RESOURCE)
    theirs = encode_spans([span_of(r, RESOURCE) for r in records])
    assert ours == theirs
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(
        deterministic=True
    )
    assert sum(len(ss.spans) for ss in ours.resource_spans[0].scope_spans) == len(records)


def test_sampled_out_sdk_spans_are_not_piped() -> None:
    got: list[Record] = []

    class Collect:
        def record(self, record: Record) -> None:
            got.append(record)

        def force_flush(self, timeout_s: float = 30.0) -> bool:
            return True

        def shutdown(self) -> None:
            pass

    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(PipeSpanProcessor(Collect()))
    provider.get_tracer("x").start_span("dropped").end()
    sampled = TracerProvider()
    sampled.add_span_processor(PipeSpanProcessor(Collect()))
    sampled.get_tracer("x").start_span("kept").end()
    assert [r[0] for r in got] == ["kept"]


@pytest.fixture
def receiver() -> Iterator[OtlpSink]:
    with OtlpSink() as sink:
        yield sink


@pytest.fixture
def otlp_env(receiver: OtlpSink, monkeypatch: pytest.MonkeyPatch) -> OtlpSink:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    return receiver


def _children(sink: ChildSink) -> int | None:
    child = sink._child
    return child.pid if child is not None else None


def test_child_process_exports_every_span_and_exits_at_shutdown(otlp_env: OtlpSink) -> None:
    sink = ChildSink("otlp", None, RESOURCE)
    for n in range(2000):
        sink.record(_record(n))
    assert sink.force_flush(30)
    pid = _children(sink)
    assert pid is not None
    sink.shutdown()
    # Shutdown waits for the child to export what it was sent, and it exits.
    assert sink._child is not None and sink._child.returncode == 0
    spans = otlp_env.spans
    assert sorted(s.name for s in spans) == sorted(f"span {n}" for n in range(2000))
    assert {s.service_name for s in spans} == {"spans-test"}
    one = next(s for s in spans if s.name == "span 7")
    assert one.trace_id == format(0xABC, "032x")
    assert one.span_id == format(8, "016x")
    assert one.attributes == {"n": 7, "who": "test"}
    assert (one.start_ns, one.end_ns) == (1_007, 2_007)
    assert sink.dropped == 0


def test_a_killed_child_is_replaced(otlp_env: OtlpSink) -> None:
    sink = ChildSink("otlp", None, RESOURCE)
    try:
        sink.record(_record(1))
        assert sink.force_flush(30)
        wait_for(lambda: otlp_env.span_count == 1)
        first = _children(sink)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: not _alive(first))
        # Later batches find the pipe broken or the child gone, and start
        # another (at most one start a second, so some may be dropped).
        sent = iter(range(2, 10_000))

        def one_more_arrives() -> bool:
            sink.record(_record(next(sent)))
            sink.force_flush(30)
            return otlp_env.span_count >= 2

        wait_for(one_more_arrives, interval=0.1)
        assert _children(sink) not in (None, first)
    finally:
        sink.shutdown()
    assert "span 1" in {s.name for s in otlp_env.spans}


def test_a_full_queue_drops_and_counts_and_never_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Nothing listens there: the child's exports wait out their timeouts, the
    # pipe fills, and the queue behind it too.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "100")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "100")
    monkeypatch.setenv("OTEL_BSP_EXPORT_TIMEOUT", "500")
    sink = ChildSink("otlp", None, RESOURCE)
    try:
        total = 50_000
        for n in range(total):
            sink.record(_record(n))
        # Some were dropped, not all: the first batches went down the pipe.
        assert 0 < sink.dropped < total
    finally:
        sink.shutdown()
    # Shutdown gave the child its export timeout and then stopped it.
    assert sink._child is not None and sink._child.poll() is not None


def test_the_child_exports_what_it_has_when_the_server_is_killed(
    tmp_path: Path, receiver: OtlpSink
) -> None:
    script = tmp_path / "server.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            from opentelemetry.sdk.resources import Resource
            from cruzflow.server.spans import ChildSink
            from tests.test_spans import _record
            sink = ChildSink("otlp", None, Resource({"service.name": "killed"}))
            for n in range(300):
                sink.record(_record(n))
            assert sink.force_flush(30)
            print(sink._child.pid, flush=True)
            time.sleep(600)
            """
        )
    )
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    server = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, env=env, cwd=Path.cwd()
    )
    try:
        assert server.stdout is not None
        child = int(server.stdout.readline())
        server.send_signal(signal.SIGKILL)
        server.wait()
        # The pipe ends with the server: the child exports the batch it was
        # given and exits, leaving no process behind.
        wait_for(lambda: not _alive(child))
        wait_for(lambda: receiver.span_count == 300)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert {s.service_name for s in receiver.spans} == {"killed"}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_the_console_exporter_prints_the_spans(capfd: pytest.CaptureFixture[str]) -> None:
    sink = ChildSink("console", None, RESOURCE)
    sink.record(_record(42))
    sink.shutdown()
    out = capfd.readouterr().out
    printed = json.loads(out[out.index("{") : out.rindex("}") + 1])
    assert printed["name"] == "span 42"
    assert printed["attributes"] == {"n": 42, "who": "test"}
    assert printed["resource"]["attributes"]["service.name"] == "spans-test"


def test_a_record_that_cannot_be_sent_loses_its_batch_only(otlp_env: OtlpSink) -> None:
    sink = ChildSink("otlp", None, RESOURCE)
    try:
        bad = list(_record(1))
        bad[10] = {"not marshallable": object()}
        sink.record(tuple(bad))
        assert sink.force_flush(30)
        assert sink.dropped == 1
        # The sender thread is still there for the next spans.
        sink.record(_record(2))
        assert sink.force_flush(30)
        wait_for(lambda: otlp_env.span_count == 1)
    finally:
        sink.shutdown()
    assert [s.name for s in otlp_env.spans] == ["span 2"]
