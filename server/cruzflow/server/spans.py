"""The span pipeline: spans recorded as plain tuples, exported from a child process.

Why not the SDK's own span objects and ``BatchSpanProcessor``: measured in the
server under load (README, Performance, "What telemetry costs"), an SDK span
costs about 40 µs of the event loop's time to start and end, and its OTLP
encoding about 20 µs more in the exporter's thread, which holds the GIL that
the event loop needs. Six spans a workflow halved the server's throughput.

So the engine records each of its spans as one tuple of plain values (about
1 µs; see ``Record``), and spans made through the SDK (the gRPC server spans
of the standard instrumentation, spans of workflow code) become the same
tuple when they end (``PipeSpanProcessor``). A sender thread ships them in
batches, marshalled, down a pipe to a child process (``python -m
cruzflow.server.spans``), which encodes them as OTLP and sends them with
the SDK's own OTLP exporter (or prints them with its console exporter).
Encoding and network I/O never hold the server's GIL, and the encoding costs
about 4 µs a span instead of the SDK encoder's 24 µs: on a machine whose
cores the server, its clients and the exporter share, the exporter's CPU is
the server's loss.

The batching follows the SDK's batch processor and its variables:
``OTEL_BSP_SCHEDULE_DELAY`` (ms between sends when few spans come),
``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` (spans a batch) and
``OTEL_BSP_MAX_QUEUE_SIZE`` (spans held before new ones are dropped, counted
and logged; 16,384 by default, as a record is far smaller than an SDK span). If the child dies it is started again; the batch in flight is
lost. If the server is killed, the child exports what reached the pipe and
exits at its end.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import marshal
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import IO, Any, Protocol

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

log = logging.getLogger("cruzflow.telemetry")

Record = tuple[Any, ...]
"""One finished span, marshal-able:

``(name, trace_id, span_id, flags, trace_state, parent_span_id, parent_is_remote,
kind, start_ns, end_ns, attributes, events, links, status_code, status_message,
scope)``, where ``trace_state`` is a tuple of (key, value) or None,
``parent_span_id`` 0 for a root, ``kind`` and ``status_code`` the values of
``SpanKind`` and ``StatusCode``, ``attributes`` a dict or None, ``events`` a
list of (name, time_ns, attributes) or None, ``links`` a list of (trace_id,
span_id, flags, is_remote, attributes) or None, and ``scope`` (name, version,
schema_url) or None."""

_HEADER = struct.Struct("<I")
_PIPE_BYTES = 1 << 20
_ERROR = StatusCode.ERROR.value


def record_of(span: ReadableSpan) -> Record:
    """The record of a span the SDK made."""
    ctx = span.context
    assert ctx is not None
    parent = span.parent
    scope = span.instrumentation_scope
    return (
        span.name,
        ctx.trace_id,
        ctx.span_id,
        int(ctx.trace_flags),
        tuple(ctx.trace_state.items()) if ctx.trace_state else None,
        parent.span_id if parent is not None else 0,
        parent is not None and parent.is_remote,
        span.kind.value,
        span.start_time,
        span.end_time,
        dict(span.attributes) if span.attributes else None,
        [(e.name, e.timestamp, dict(e.attributes or {})) for e in span.events] or None,
        [
            (
                link.context.trace_id,
                link.context.span_id,
                int(link.context.trace_flags),
                link.context.is_remote,
                dict(link.attributes or {}),
            )
            for link in span.links
        ]
        or None,
        span.status.status_code.value,
        span.status.description,
        (scope.name, scope.version, scope.schema_url) if scope is not None else None,
    )


def span_of(record: Record, resource: Resource) -> ReadableSpan:
    """The SDK's span for a record, as its exporters take it."""
    (
        name,
        trace_id,
        span_id,
        flags,
        state,
        parent_id,
        parent_remote,
        kind,
        start,
        end,
        attributes,
        events,
        links,
        code,
        message,
        scope,
    ) = record
    trace_flags = TraceFlags(flags)
    trace_state = TraceState(list(state)) if state else None
    return ReadableSpan(
        name=name,
        context=SpanContext(trace_id, span_id, False, trace_flags, trace_state),
        parent=(
            SpanContext(trace_id, parent_id, parent_remote, trace_flags, trace_state)
            if parent_id
            else None
        ),
        resource=resource,
        attributes=attributes or {},
        events=[Event(n, a, t) for n, t, a in events or ()],
        links=[Link(SpanContext(t, s, r, TraceFlags(f)), a) for t, s, f, r, a in links or ()],
        kind=SpanKind(kind),
        status=Status(StatusCode(code), message if code == _ERROR else None),
        start_time=start,
        end_time=end,
        instrumentation_scope=InstrumentationScope(*scope) if scope is not None else None,
    )


class SpanSink(Protocol):
    """Where finished spans go."""

    def record(self, record: Record) -> None:
        """Take one finished span; never blocks, never raises."""

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        """Hand on what is held; True when done within the time."""

    def shutdown(self) -> None:
        """Hand on what is held and stop."""


class ProcessorSink:
    """In process: each record becomes an SDK span for a span processor at
    once (tests give their in-memory exporter's processor)."""

    def __init__(self, processor: SpanProcessor, resource: Resource) -> None:
        self._processor = processor
        self._resource = resource

    def record(self, record: Record) -> None:
        self._processor.on_end(span_of(record, self._resource))

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        return self._processor.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        self._processor.shutdown()


class PipeSpanProcessor(SpanProcessor):
    """The tracer provider's processor: spans the SDK made (server spans,
    workflow code's own) go to the sink as records when they end."""

    def __init__(self, sink: SpanSink) -> None:
        self._sink = sink

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.context
        if ctx is not None and ctx.trace_flags.sampled:
            self._sink.record(record_of(span))

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._sink.force_flush(timeout_millis / 1000)

    def shutdown(self) -> None:
        self._sink.shutdown()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return max(int(value), 1) if value else default
    except ValueError:
        log.warning("%s=%r is not a whole number; using %d", name, value, default)
        return default


class ChildSink:
    """Records batched by a sender thread and exported by a child process.

    ``exporter`` is "otlp" or "console"; the child reads the standard
    OTEL_EXPORTER_OTLP_* variables itself, as the SDK exporter does. The child
    starts with the first batch.
    """

    def __init__(self, exporter: str, endpoint: str | None, resource: Resource) -> None:
        self._args = json.dumps(
            {"exporter": exporter, "endpoint": endpoint, "resource": dict(resource.attributes)}
        )
        self._delay_s = _env_int("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
        self._batch = _env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        # A record is a few hundred bytes, not an SDK span object: hold more of
        # them than the SDK's 2,048 before dropping, to ride out bursts.
        self._max_queue = max(_env_int("OTEL_BSP_MAX_QUEUE_SIZE", 16_384), self._batch)
        self._timeout_s = _env_int("OTEL_BSP_EXPORT_TIMEOUT", 30000) / 1000
        self._queue: deque[Record] = deque()
        self._wake = threading.Event()
        self._flushed = threading.Condition()
        self._sent = 0  # batches written, read under _flushed
        self._wanted = 0  # flushes asked for
        self.dropped = 0
        self._closing = False
        self._child: subprocess.Popen[bytes] | None = None
        self._next_start = 0.0
        self._thread = threading.Thread(target=self._run, name="cruzflow-spans", daemon=True)
        self._thread.start()

    # ------------------------------------------------------ the loop's side
    def record(self, record: Record) -> None:
        queue = self._queue
        if len(queue) >= self._max_queue:
            if not self.dropped:
                log.warning(
                    "span queue full (%d spans; OTEL_BSP_MAX_QUEUE_SIZE): dropping spans "
                    "until the exporter catches up",
                    self._max_queue,
                )
            self.dropped += 1
            return
        queue.append(record)
        if len(queue) == self._batch:
            self._wake.set()

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        """Everything recorded so far is written to the exporter process."""
        with self._flushed:
            self._wanted += 1
            wanted = self._wanted
            self._wake.set()
            return self._flushed.wait_for(lambda: self._sent >= wanted, timeout_s)

    def shutdown(self) -> None:
        """Send what is held, close the pipe and wait for the child to export
        it (at most OTEL_BSP_EXPORT_TIMEOUT)."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        self._thread.join(self._timeout_s)
        child = self._child
        if child is not None:
            try:
                child.wait(self._timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("span exporter did not finish in %.0f s; stopping it", self._timeout_s)
                child.kill()
                child.wait()
        if self.dropped:
            log.warning("%d spans were dropped: the span queue was full", self.dropped)

    # ---------------------------------------------------- the sender thread
    def _run(self) -> None:
        while True:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            with self._flushed:
                wanted = self._wanted
            self._drain()
            with self._flushed:
                self._sent = max(self._sent, wanted)
                self._flushed.notify_all()
            if self._closing:
                self._drain()
                self._close()
                return

    def _drain(self) -> None:
        queue = self._queue
        while queue:
            count = min(len(queue), self._batch)
            self._send([queue.popleft() for _ in range(count)])

    def _send(self, batch: list[Record]) -> None:
        try:
            data = marshal.dumps(batch)
        except ValueError:
            # A value no span attribute may hold (the SDK cleans its own);
            # the batch is lost, the thread goes on.
            log.exception("%d spans could not be encoded; dropped", len(batch))
            self.dropped += len(batch)
            return
        for attempt in (1, 2):
            stream = self._stream()
            if stream is None:
                break
            try:
                stream.write(_HEADER.pack(len(data)))
                stream.write(data)
                stream.flush()
                return
            except OSError as exc:  # the child died: start another, once
                log.warning("span exporter process failed (%s); starting another", exc)
                if attempt == 2:
                    break
        self.dropped += len(batch)

    def _stream(self) -> IO[bytes] | None:
        child = self._child
        if child is not None:
            if child.poll() is None:
                assert child.stdin is not None
                return child.stdin
            log.warning("span exporter process exited with %s", child.returncode)
            self._child = None
        # Not more than one start a second, so a child that cannot start does
        # not spin; spans meanwhile are dropped and counted.
        now = time.monotonic()
        if now < self._next_start:
            return None
        self._next_start = now + 1.0
        try:
            self._child = subprocess.Popen(
                [sys.executable, "-m", "cruzflow.server.spans", self._args],
                stdin=subprocess.PIPE,
            )
        except OSError as exc:
            log.error("cannot start the span exporter process: %s", exc)
            return None
        assert self._child.stdin is not None
        if hasattr(fcntl, "F_SETPIPE_SZ"):
            # A deeper pipe (Linux) absorbs a burst while the child exports.
            with contextlib.suppress(OSError):
                fcntl.fcntl(self._child.stdin.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        return self._child.stdin

    def _close(self) -> None:
        child = self._child
        if child is not None and child.stdin is not None:
            with contextlib.suppress(OSError):
                child.stdin.close()


# ------------------------------------------------------- the child process
# OTLP span flags: the parent's is_remote is known, and whether it is remote.
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200


def _set_value(value: Any, item: Any) -> None:
    """An OTLP AnyValue, as the SDK's encoder writes it."""
    if item is None:
        return
    kind = type(item)
    if kind is str:
        value.string_value = item
    elif kind is bool:
        value.bool_value = item
    elif kind is int:
        value.int_value = item
    elif kind is float:
        value.double_value = item
    elif kind is bytes:
        value.bytes_value = item
    elif isinstance(item, (tuple, list)):
        values = value.array_value.values
        value.array_value.SetInParent()
        for each in item:
            _set_value(values.add(), each)
    else:
        _set_value(value, str(item))


def _set_attributes(target: Any, attributes: dict[str, Any] | None) -> None:
    if attributes:
        for key, item in attributes.items():
            kv = target.add()
            kv.key = key
            _set_value(kv.value, item)


def encode(records: Sequence[Record], resource: Resource) -> Any:
    """The OTLP ExportTraceServiceRequest for records: the same message the
    SDK's ``encode_spans`` makes of their ``span_of`` spans (a test holds the
    two equal), about six times faster, since it builds the messages in place
    rather than through the SDK's span objects and helper objects."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.SetInParent()
    _set_attributes(resource_spans.resource.attributes, dict(resource.attributes))
    if resource.schema_url:
        resource_spans.schema_url = resource.schema_url
    scopes: dict[Any, Any] = {}
    for (
        name,
        trace_id,
        span_id,
        _flags,
        state,
        parent_id,
        parent_remote,
        kind,
        start,
        end,
        attributes,
        events,
        links,
        code,
        message,
        scope,
    ) in records:
        spans = scopes.get(scope)
        if spans is None:
            scope_spans = resource_spans.scope_spans.add()
            scope_spans.scope.SetInParent()
            if scope is not None:
                scope_spans.scope.name = scope[0]
                if scope[1]:
                    scope_spans.scope.version = scope[1]
                if scope[2]:
                    scope_spans.schema_url = scope[2]
            spans = scopes[scope] = scope_spans.spans
        span = spans.add()
        span.trace_id = trace_id.to_bytes(16, "big")
        span.span_id = span_id.to_bytes(8, "big")
        if state:
            span.trace_state = ",".join(f"{k}={v}" for k, v in state)
        if parent_id:
            span.parent_span_id = parent_id.to_bytes(8, "big")
        span.name = name
        span.kind = kind + 1  # SpanKind.INTERNAL is 0; SPAN_KIND_INTERNAL is 1
        span.start_time_unix_nano = start
        span.end_time_unix_nano = end
        _set_attributes(span.attributes, attributes)
        for event_name, at, event_attributes in events or ():
            event = span.events.add()
            event.name = event_name
            event.time_unix_nano = at
            _set_attributes(event.attributes, event_attributes)
        for link_trace, link_span, _link_flags, link_remote, link_attributes in links or ():
            link = span.links.add()
            link.trace_id = link_trace.to_bytes(16, "big")
            link.span_id = link_span.to_bytes(8, "big")
            _set_attributes(link.attributes, link_attributes)
            link.flags = _HAS_IS_REMOTE | (_IS_REMOTE if link_remote else 0)
        span.status.SetInParent()
        if code:
            span.status.code = code
        if message:
            span.status.message = message
        span.flags = _HAS_IS_REMOTE | (_IS_REMOTE if parent_id and parent_remote else 0)
    return request


class _Exporter:
    """Exports batches of records: OTLP/gRPC through the SDK's own exporter
    (endpoint, headers, TLS, compression, timeout and retries from the
    OTEL_EXPORTER_OTLP_* variables), handed a request ``encode`` built; or
    the SDK's console exporter, handed SDK spans."""

    def __init__(self, kind: str, endpoint: str | None, resource: Resource) -> None:
        self._resource = resource
        self._otlp: Any = None
        self._console: Any = None
        if kind == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            class RequestExporter(OTLPSpanExporter):
                # The exporter's two hooks for what it is given: here the
                # request is already built.
                def _translate_data(self, data: Any) -> Any:
                    return data

                def _count_data(self, data: Any) -> int:
                    return sum(len(s.spans) for r in data.resource_spans for s in r.scope_spans)

            self._otlp = RequestExporter(endpoint=endpoint)
        else:
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            self._console = ConsoleSpanExporter()

    def export(self, batch: list[Record]) -> None:
        if self._otlp is not None:
            self._otlp.export(encode(batch, self._resource))
        else:
            self._console.export([span_of(r, self._resource) for r in batch])

    def shutdown(self) -> None:
        (self._otlp or self._console).shutdown()


def _read(stream: IO[bytes]) -> list[Record] | None:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        return None
    batch: list[Record] = marshal.loads(data)
    return batch


def serve(args: Sequence[str]) -> int:
    """Export the batches read from stdin until it ends."""
    # The server ends this process by closing the pipe, after its last spans:
    # a Ctrl-C or SIGTERM sent to the whole process group must not cut them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = json.loads(args[0])
    exporter = _Exporter(settings["exporter"], settings["endpoint"], Resource(settings["resource"]))
    stream = sys.stdin.buffer
    try:
        while (batch := _read(stream)) is not None:
            try:
                exporter.export(batch)
            except Exception:
                log.exception("span export failed; %d spans lost", len(batch))
    finally:
        exporter.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(serve(sys.argv[1:]))
