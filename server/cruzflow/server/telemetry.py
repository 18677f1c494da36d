"""OpenTelemetry at the edges of runs and steps: spans, metrics, log fields.

The engine calls the ``Observer`` methods of ``Telemetry`` (see
``engine/observer.py``); with telemetry off it holds ``None`` and pays
nothing. The providers, the sampler, the id generator, the exporters and the
gRPC server instrumentation are the OpenTelemetry SDK's own. The engine's
spans are not SDK span objects but records, which ``spans.py`` exports from
a child process: an SDK span costs the event loop tens of microseconds.

Traces: one span per run of ``run()`` in memory (``run <workflow>``), under it
one span per step attempt (``step <workflow>/<step>``) and one per finished
sleep or event wait. Every run's span sits in the trace of the call that
created the instance: its W3C traceparent is stored with the instance, so
runs after a restart or a long sleep join the same trace (or start a new
trace linked to it, after ``new_trace_after``). Steps answered from their
checkpoints make no span; the run span counts them. The span of a wait that
took an event links to the span of the SendEvent call that sent it (its
traceparent is stored with the event).

Logs: every record on stderr carries the current trace and span ids; with
``logs`` on (``OTEL_LOGS_EXPORTER``), the root logger's records also go
through the SDK's logs API, each in the context it was logged in.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    TracerProvider,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from cruzflow.server.engine.tracebacks import format_error
from cruzflow.server.records import InstanceStatus, StepKind

if TYPE_CHECKING:
    from cruzflow.server.spans import SpanSink

_PROPAGATOR = TraceContextTextMapPropagator()
_SCOPE = "cruzflow"
# Pieces of span records (see spans.Record).
_SCOPE_RECORD = (_SCOPE, None, None)
_INTERNAL = SpanKind.INTERNAL.value
_UNSET = StatusCode.UNSET.value
_ERROR = StatusCode.ERROR.value
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
# attributes, events, links, status, message, scope of a span with none of them.
_PLAIN = (None, None, None, _UNSET, None, _SCOPE_RECORD)

# Attribute keys, on spans, metrics and log records alike.
WORKFLOW = "cruzflow.workflow.name"
INSTANCE = "cruzflow.instance.id"
STEP = "cruzflow.step.name"
OCCURRENCE = "cruzflow.step.occurrence"
INDEX = "cruzflow.step.index"
ATTEMPT = "cruzflow.step.attempt"
OUTCOME = "cruzflow.step.outcome"
RETRY_DELAY = "cruzflow.step.retry_delay_s"
STATUS = "cruzflow.instance.status"
LINK = "cruzflow.link"

# Seconds: from a fast step to a slow external call.
_STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
_ROW_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# The read RPCs, left out of server spans with rpc_spans = "writes".
_READS = (
    "GetStatus",
    "WaitInstance",
    "WatchInstance",
    "WatchInstances",
    "ListInstances",
    "ListWorkflows",
)
# Services that never get server spans: health checks, reflection.
_UNTRACED = ("/grpc.health.", "/grpc.reflection.")
# (name, unit, description, attribute keys) of the counters kept as tallies.
_COUNTERS = (
    ("cruzflow.instances.created", "{instance}", "Instances created, by workflow", (WORKFLOW,)),
    (
        "cruzflow.instances.finished",
        "{instance}",
        "Instances that reached a final status (complete, errored, terminated)",
        (WORKFLOW, STATUS),
    ),
    ("cruzflow.step.attempts", "{attempt}", "Step attempts, by outcome", (WORKFLOW, STEP, OUTCOME)),
    ("cruzflow.step.failures", "{step}", "Steps that failed for good", (WORKFLOW, STEP)),
)
_GAUGED = (
    InstanceStatus.QUEUED,
    InstanceStatus.RUNNING,
    InstanceStatus.PAUSED,
    InstanceStatus.WAITING,
    InstanceStatus.WAITING_FOR_PAUSE,
)


@dataclass(slots=True)
class _RunToken:
    workflow: str
    instance_id: str
    sampled: bool
    trace_id: int = 0
    span_id: int = 0
    parent_id: int = 0
    start: int = 0
    links: list[tuple[Any, ...]] | None = None
    events: list[tuple[str, int, dict[str, Any]]] | None = None
    context: otel_context.Context | None = None
    """The run span's context: current in the run's task, so the spans of
    workflow code nest in the run."""
    detach: object | None = None


@dataclass(slots=True)
class _AttemptToken:
    run: _RunToken
    step: str
    began: float
    span_id: int = 0
    """0 when the run is not sampled: no span."""
    start: int = 0
    attributes: dict[str, Any] | None = None
    events: list[tuple[str, int, dict[str, Any]]] | None = None
    detach: object | None = None


_NO_RUN = otel_context.Context()


class Telemetry:
    """The engine's observer: spans into ``spans`` (sampled and identified by
    ``tracer_provider``'s sampler and id generator), metrics on
    ``meter_provider``; either provider may be None (that signal is off).

    The engine's spans are records (see ``spans.py``), not SDK span objects:
    an SDK span costs the event loop tens of microseconds, a record about one.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        *,
        new_trace_after: float | None = None,
        spans: SpanSink | None = None,
    ) -> None:
        self._spans: SpanSink | None = None
        if tracer_provider is not None:
            sdk: Any = tracer_provider
            self._sampler = sdk.sampler
            self._ids = sdk.id_generator
            self._spans = spans if spans is not None else _processor_sink(sdk)
        self._new_trace_after_ms = None if new_trace_after is None else new_trace_after * 1000
        # Instances per unfinished status, indexed by the status number: a
        # list never resizes, so the exporter's thread may read it any time.
        self._counts = [0] * (max(InstanceStatus) + 1)
        self._metered = meter_provider is not None
        # The counters are plain ints here, read by observable instruments when
        # the reader collects: an increment costs a dict update, not an SDK
        # measurement (a few us each, on the event loop).
        self._tallies: dict[tuple[str, ...], list[int]] = {}
        if meter_provider is not None:
            self._instruments(meter_provider.get_meter(_SCOPE))

    def _instruments(self, meter: Meter) -> None:
        for name, unit, description, keys in _COUNTERS:
            meter.create_observable_counter(
                name,
                callbacks=[self._observer_of(name, keys)],
                unit=unit,
                description=description,
            )
        self._duration = meter.create_histogram(
            "cruzflow.step.duration",
            "s",
            "Duration of one step attempt",
            explicit_bucket_boundaries_advisory=_STEP_BUCKETS,
        )
        self._commit = meter.create_histogram(
            "cruzflow.store.commit.duration",
            "s",
            "Duration of one group commit (one transaction, one fsync)",
            explicit_bucket_boundaries_advisory=_COMMIT_BUCKETS,
        )
        self._rows = meter.create_histogram(
            "cruzflow.store.commit.rows",
            "{row}",
            "Rows written by one group commit: the batch size",
            explicit_bucket_boundaries_advisory=_ROW_BUCKETS,
        )
        meter.create_observable_gauge(
            "cruzflow.instances",
            callbacks=[self._observe_counts],
            unit="{instance}",
            description="Instances in each unfinished status",
        )

    def _tally(self, key: tuple[str, ...], count: int = 1) -> None:
        cell = self._tallies.get(key)
        if cell is None:
            self._tallies[key] = [count]
        else:
            cell[0] += count

    def _observer_of(
        self, name: str, keys: tuple[str, ...]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            # dict.copy() is one step under the GIL: safe from the reader's thread.
            tallies = self._tallies.copy()
            return [
                Observation(cell[0], dict(zip(keys, key[1:], strict=True)))
                for key, cell in tallies.items()
                if key[0] == name
            ]

        return observe

    def _observe_counts(self, options: CallbackOptions) -> Iterable[Observation]:
        counts = self._counts
        return [Observation(max(counts[s], 0), {STATUS: s.label}) for s in _GAUGED]

    def count(self, status: InstanceStatus) -> int:
        """How many instances are in the unfinished ``status`` now."""
        return self._counts[status]

    # ----------------------------------------------------------- instances
    def _root_sampled(self, trace_id: int, name: str) -> bool:
        result = self._sampler.should_sample(None, trace_id, name, SpanKind.INTERNAL)
        return bool(result.decision.is_sampled())

    def creating(self) -> str | None:
        sink = self._spans
        if sink is None:
            return None
        ctx = trace.get_current_span().get_span_context()
        if not ctx.is_valid:
            # No caller's trace (an in-process create, or no trace context in
            # the call): a root of its own, so that every run of the instance
            # still shares one trace.
            trace_id, span_id = self._ids.generate_trace_id(), self._ids.generate_span_id()
            sampled = self._root_sampled(trace_id, "create")
            if sampled:
                now = time.time_ns()
                sink.record(
                    ("create", trace_id, span_id, 1, None, 0, False, _INTERNAL, now, now, *_PLAIN)
                )
            ctx = SpanContext(trace_id, span_id, False, TraceFlags(1 if sampled else 0))
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, trace.set_span_in_context(NonRecordingSpan(ctx)))
        return carrier.get("traceparent")

    def sending(self) -> str | None:
        if self._spans is None:
            return None
        ctx = trace.get_current_span().get_span_context()
        if not ctx.is_valid:
            # No caller's trace and no server span: nothing to link to.
            return None
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def created(self, workflow: str, count: int) -> None:
        if self._metered:
            self._tally(("cruzflow.instances.created", workflow), count)

    def census(self, status: InstanceStatus, count: int) -> None:
        self._counts[status] += count

    def status_changed(
        self, workflow: str, old: InstanceStatus | None, new: InstanceStatus
    ) -> None:
        counts = self._counts
        if old is not None and not old.finished:
            counts[old] -= 1
        if new.finished:
            if self._metered:
                self._tally(("cruzflow.instances.finished", workflow, new.label))
        else:
            counts[new] += 1

    # ---------------------------------------------------------------- runs
    def run_started(
        self, workflow: str, instance_id: str, trace_parent: str | None, created_at: int
    ) -> _RunToken:
        if self._spans is None:
            return _RunToken(workflow, instance_id, False)
        creator: SpanContext | None = None
        if trace_parent:
            extracted = _PROPAGATOR.extract({"traceparent": trace_parent})
            creator = trace.get_current_span(extracted).get_span_context()
            if not creator.is_valid:
                creator = None
        links: list[tuple[Any, ...]] | None = None
        limit = self._new_trace_after_ms
        if creator is not None and limit is not None and time.time() * 1000 - created_at > limit:
            links = [(creator.trace_id, creator.span_id, int(creator.trace_flags), True, {})]
            creator = None
        if creator is not None:
            trace_id, parent_id, sampled = (
                creator.trace_id,
                creator.span_id,
                creator.trace_flags.sampled,
            )
        else:
            trace_id, parent_id = self._ids.generate_trace_id(), 0
            sampled = self._root_sampled(trace_id, f"run {workflow}")
        span_id = self._ids.generate_span_id()
        ctx = trace.set_span_in_context(
            NonRecordingSpan(
                SpanContext(trace_id, span_id, False, TraceFlags(1 if sampled else 0))
            ),
            _NO_RUN,
        )
        # Current for the run's task, so user code's own spans nest in the run.
        return _RunToken(
            workflow,
            instance_id,
            sampled,
            trace_id,
            span_id,
            parent_id,
            time.time_ns(),
            links,
            None,
            ctx,
            otel_context.attach(ctx),
        )

    def run_ended(
        self,
        token: _RunToken,
        status: InstanceStatus,
        replayed: int,
        error: tuple[str, str, str | None] | None,
    ) -> None:
        if token.context is None:
            return
        _detach(token.detach)
        sink = self._spans
        if sink is None or not token.sampled:
            return
        failed = status == InstanceStatus.ERRORED and error is not None
        if failed and error is not None:
            # As the SDK's record_exception: the error that ended the instance,
            # with the traceback the engine kept (the step's, for a step failure).
            attributes = {"exception.type": error[0], "exception.message": error[1]}
            if error[2] is not None:
                attributes["exception.stacktrace"] = error[2]
            attributes["exception.escaped"] = "True"
            event = ("exception", time.time_ns(), attributes)
            if token.events is None:
                token.events = [event]
            else:
                token.events.append(event)
        sink.record(
            (
                f"run {token.workflow}",
                token.trace_id,
                token.span_id,
                1,
                None,
                token.parent_id,
                True,
                _INTERNAL,
                token.start,
                time.time_ns(),
                {
                    WORKFLOW: token.workflow,
                    INSTANCE: token.instance_id,
                    STATUS: status.label,
                    "cruzflow.run.replayed_steps": replayed,
                },
                token.events,
                token.links,
                _ERROR if failed else _UNSET,
                f"{error[0]}: {error[1]}" if failed and error is not None else None,
                _SCOPE_RECORD,
            )
        )

    def parked(self, token: _RunToken, wake_at: int) -> None:
        if token.sampled:
            wake = datetime.fromtimestamp(wake_at / 1000, UTC).isoformat()
            event = ("parked", time.time_ns(), {"cruzflow.wake_at": wake})
            if token.events is None:
                token.events = [event]
            else:
                token.events.append(event)

    # --------------------------------------------------------------- steps
    def attempt_started(
        self, run: _RunToken, name: str, occurrence: int, index: int, attempt: int
    ) -> _AttemptToken:
        if not run.sampled:
            # Sampled out (or tracing off): the run's context stays current, and
            # the attempt costs no span of its own.
            return _AttemptToken(run, name, time.perf_counter())
        span_id = self._ids.generate_span_id()
        ctx = trace.set_span_in_context(
            NonRecordingSpan(SpanContext(run.trace_id, span_id, False, _SAMPLED)), run.context
        )
        return _AttemptToken(
            run,
            name,
            time.perf_counter(),
            span_id,
            time.time_ns(),
            {
                WORKFLOW: run.workflow,
                INSTANCE: run.instance_id,
                STEP: name,
                OCCURRENCE: occurrence,
                INDEX: index,
                ATTEMPT: attempt,
            },
            None,
            otel_context.attach(ctx),
        )

    def attempt_failed(self, token: _AttemptToken, exc: BaseException) -> None:
        if token.span_id:
            # What the SDK's Span.record_exception records.
            event = (
                "exception",
                time.time_ns(),
                {
                    "exception.type": type(exc).__name__,
                    "exception.message": str(exc),
                    "exception.stacktrace": format_error(exc),
                    "exception.escaped": "False",
                },
            )
            if token.events is None:
                token.events = [event]
            else:
                token.events.append(event)

    def attempt_ended(
        self,
        token: _AttemptToken,
        outcome: str,
        error: tuple[str, str] | None,
        retry_delay_s: float | None,
    ) -> None:
        sink = self._spans
        if token.span_id and sink is not None:
            _detach(token.detach)
            run = token.run
            attributes = token.attributes
            assert attributes is not None
            attributes[OUTCOME] = outcome
            if retry_delay_s is not None:
                attributes[RETRY_DELAY] = retry_delay_s
            sink.record(
                (
                    f"step {run.workflow}/{token.step}",
                    run.trace_id,
                    token.span_id,
                    1,
                    None,
                    run.span_id,
                    False,
                    _INTERNAL,
                    token.start,
                    time.time_ns(),
                    attributes,
                    token.events,
                    None,
                    _UNSET if error is None else _ERROR,
                    None if error is None else f"{error[0]}: {error[1]}",
                    _SCOPE_RECORD,
                )
            )
        if self._metered:
            workflow, step = token.run.workflow, token.step
            self._duration.record(
                time.perf_counter() - token.began, {WORKFLOW: workflow, STEP: step}
            )
            self._tally(("cruzflow.step.attempts", workflow, step, outcome))
            if outcome == "failed":
                self._tally(("cruzflow.step.failures", workflow, step))

    def waited(
        self,
        run: _RunToken,
        kind: StepKind,
        name: str,
        occurrence: int,
        started_at: int,
        outcome: str,
        detail: str | None,
        sender: str | None = None,
    ) -> None:
        sink = self._spans
        if sink is None or not run.sampled:
            return
        links = None
        if sender is not None:
            # Who woke the wait: the SendEvent call's span, in its caller's trace.
            link = _link_to(sender)
            if link is not None:
                links = [link]
        what = "sleep" if kind == StepKind.SLEEP else "wait_for_event"
        attributes: dict[str, Any] = {
            WORKFLOW: run.workflow,
            INSTANCE: run.instance_id,
            STEP: name,
            OCCURRENCE: occurrence,
            OUTCOME: outcome,
        }
        if detail is not None:
            attributes["cruzflow.event.type"] = detail
        failed = outcome != "succeeded"
        # The wait may have begun in an earlier run (before a restart or a
        # park): the span covers all of it.
        sink.record(
            (
                f"{what} {run.workflow}/{name}",
                run.trace_id,
                self._ids.generate_span_id(),
                1,
                None,
                run.span_id,
                False,
                _INTERNAL,
                started_at * 1_000_000,
                time.time_ns(),
                attributes,
                None,
                links,
                _ERROR if failed else _UNSET,
                f"{what} {outcome}" if failed else None,
                _SCOPE_RECORD,
            )
        )

    # --------------------------------------------------------------- store
    def committed(self, seconds: float, rows: int) -> None:
        if self._metered:
            self._commit.record(seconds)
            self._rows.record(rows)


class _CallerTrace(grpc.aio.ServerInterceptor):
    """Makes the caller's trace context (a W3C traceparent in the metadata, read
    by the configured propagators) current while a create or a SendEvent runs,
    without a server span: the new instance's spans join the caller's trace,
    and the wait that takes an event links to the span of its sender."""

    _TRACED = frozenset(
        f"/cruzflow.v1.WorkflowService/{m}"
        for m in ("CreateInstance", "CreateInstances", "RunInstance", "SendEvent")
    )

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler_call_details.method not in self._TRACED or handler is None:
            return handler
        caller = propagate.extract(dict(handler_call_details.invocation_metadata or ()))
        if not trace.get_current_span(caller).get_span_context().is_valid:
            return handler
        inner = handler.unary_unary
        assert inner is not None

        async def within(request: Any, context: Any) -> Any:
            token = otel_context.attach(caller)
            try:
                return await inner(request, context)
            finally:
                otel_context.detach(token)

        return grpc.unary_unary_rpc_method_handler(
            within,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _ConnectCallerTrace:
    """``_CallerTrace`` for the Connect application: a metadata interceptor
    (the library calls ``on_start`` and ``on_end`` in the call's task)."""

    _TRACED = frozenset(("CreateInstance", "CreateInstances", "RunInstance", "SendEvent"))

    async def on_start(self, ctx: Any) -> object | None:
        if ctx.method.name not in self._TRACED:
            return None
        caller = propagate.extract(ctx.request_headers)
        if not trace.get_current_span(caller).get_span_context().is_valid:
            return None
        return otel_context.attach(caller)

    async def on_end(self, token: object | None, ctx: Any, error: Exception | None) -> None:
        _detach(token)


class _ConnectWrites:
    """connectrpc-otel's spans for all but the read methods (rpc_spans = "writes")."""

    def __init__(self, spans: Any) -> None:
        self._spans = spans

    async def on_start(self, ctx: Any) -> object | None:
        if ctx.method.name in _READS:
            return None
        token: object = await self._spans.on_start(ctx)
        return token

    async def on_end(self, token: object | None, ctx: Any, error: Exception | None) -> None:
        if token is not None:
            await self._spans.on_end(token, ctx, error)


def _link_to(trace_parent: str) -> tuple[Any, ...] | None:
    """A span record's link (see spans.Record) to the span of a stored W3C
    traceparent, or None if it is not a valid one."""
    extracted = _PROPAGATOR.extract({"traceparent": trace_parent})
    ctx = trace.get_current_span(extracted).get_span_context()
    if not ctx.is_valid:
        return None
    return (ctx.trace_id, ctx.span_id, int(ctx.trace_flags), True, {LINK: "send_event"})


def _processor_sink(provider: Any) -> SpanSink:
    """The engine's spans straight into an SDK provider's span processors
    (``Providers.of``: tests with in-memory exporters)."""
    from cruzflow.server.spans import ProcessorSink

    return ProcessorSink(provider._active_span_processor, provider.resource)


def _detach(token: object | None) -> None:
    if token is not None:
        otel_context.detach(token)  # type: ignore[arg-type]


# ------------------------------------------------------------------ logs
_RECORD_FIELDS = ("instance_id", "workflow", "step", "attempt")


class _TraceFields(logging.Filter):
    """Adds the current trace and span ids to every record that passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the
    instance, workflow, step, attempt and trace ids when the record has them."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in (*_RECORD_FIELDS, "trace_id", "span_id"):
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        traceback = getattr(record, "traceback", None)
        if traceback is not None:
            out["traceback"] = traceback
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The plain format, with ``key=value`` pairs for the instance fields."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs = [
            f"{key}={value}"
            for key in (*_RECORD_FIELDS, "trace_id")
            if (value := getattr(record, key, None)) is not None
        ]
        line = f"{line} [{' '.join(pairs)}]" if pairs else line
        # The engine's failures carry where they were raised (see engine/tracebacks.py).
        traceback = getattr(record, "traceback", None)
        return line if traceback is None else f"{line}\n{traceback.rstrip()}"


def configure_logging(fmt: str = "text", level: str | None = None) -> None:
    """Log to stderr as ``text`` or ``json``, with trace ids on every record;
    ``level`` None keeps the root logger's level."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_TraceFields())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    if level is not None:
        root.setLevel(level.upper())


def env_choice(name: str, configured: str | None, default: str) -> str:
    """A standard OTEL_* variable wins over the config file, which wins over the default."""
    value = os.environ.get(name, "").strip().lower()
    return value or configured or default


# ------------------------------------------------------------- providers
@dataclass(frozen=True, slots=True)
class Settings:
    """What the config file says; the standard OTEL_* variables win over it."""

    traces: str | None = None
    """none, otlp or console (OTEL_TRACES_EXPORTER)."""
    metrics: str | None = None
    """none, otlp, console or prometheus (OTEL_METRICS_EXPORTER)."""
    otlp_endpoint: str | None = None
    """e.g. http://127.0.0.1:4317 (OTEL_EXPORTER_OTLP_ENDPOINT)."""
    service_name: str = "cruzflow"
    """service.name (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES)."""
    metric_interval_s: float = 60.0
    """How often metrics are exported (OTEL_METRIC_EXPORT_INTERVAL, ms)."""
    prometheus_listen: str = "127.0.0.1:9464"
    """Where the Prometheus scrape endpoint listens (OTEL_EXPORTER_PROMETHEUS_HOST/_PORT)."""
    new_trace_after_s: float | None = None
    """Runs resumed this long after creation start a trace linked to the creator's."""
    rpc_spans: str = "none"
    """"none" (the default): no server spans, and the runs' spans sit directly
    under the caller's span (its traceparent is still read on creates and
    SendEvent); "writes": server spans for all but the reads (GetStatus,
    WaitInstance, WatchInstance(s), ListInstances, ListWorkflows); "all": for
    every RPC. The standard gRPC instrumentation that makes them costs tens of
    microseconds a call, even for calls it leaves out (README, Performance)."""
    logs: str | None = None
    """none, otlp or console (OTEL_LOGS_EXPORTER): log records through the
    SDK's logs API, next to the stderr log."""


class Providers:
    """The SDK providers and exporters the settings ask for; ``observer`` is the
    engine's ``Telemetry``, or None when traces and metrics are both off.

    The SDK is imported only when a signal is on, so a server without
    telemetry does not pay for loading it.
    """

    def __init__(self, settings: Settings) -> None:
        self.tracer_provider: Any = None
        self.meter_provider: Any = None
        self.logger_provider: Any = None
        self.prometheus_address: tuple[str, int] | None = None
        self._prometheus: Any = None
        self._log_handler: logging.Handler | None = None
        self._handled: list[logging.Logger] = []
        self.rpc_spans = settings.rpc_spans
        self.observer: Telemetry | None = None
        if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return
        traces = env_choice("OTEL_TRACES_EXPORTER", settings.traces, "none")
        metrics = env_choice("OTEL_METRICS_EXPORTER", settings.metrics, "none")
        logs = env_choice("OTEL_LOGS_EXPORTER", settings.logs, "none")
        for name, value, allowed in (
            ("traces", traces, ("none", "otlp", "console")),
            ("metrics", metrics, ("none", "otlp", "console", "prometheus")),
            ("logs", logs, ("none", "otlp", "console")),
        ):
            if value not in allowed:
                raise ValueError(
                    f"telemetry {name} exporter {value!r} is not one of {', '.join(allowed)} "
                    f"(set by OTEL_{name.upper()}_EXPORTER or [telemetry] {name})"
                )
        if traces == "none" and metrics == "none" and logs == "none":
            return
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource

        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: settings.service_name}))
        endpoint = None if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") else settings.otlp_endpoint
        sink = None
        if traces != "none":
            self.tracer_provider, sink = _tracer_provider(traces, resource, endpoint)
        if metrics != "none":
            self.meter_provider = self._meter_provider(metrics, resource, endpoint, settings)
        if logs != "none":
            self.logger_provider = _logger_provider(logs, resource, endpoint)
        if traces == "none" and metrics == "none":
            # Logs alone: the engine has nothing to tell, and pays nothing.
            return
        self.observer = Telemetry(
            self.tracer_provider,
            self.meter_provider,
            new_trace_after=settings.new_trace_after_s,
            spans=sink,
        )

    @classmethod
    def of(
        cls,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        new_trace_after_s: float | None = None,
        rpc_spans: str = "none",
        logger_provider: Any = None,
    ) -> Providers:
        """Given providers (tests: in-memory exporters), ignoring the environment;
        as a server's default, no server spans per RPC unless told."""
        self = cls.__new__(cls)
        self.tracer_provider, self.meter_provider = tracer_provider, meter_provider
        self.logger_provider = logger_provider
        self._log_handler, self._handled = None, []
        self.rpc_spans = rpc_spans
        self.prometheus_address = self._prometheus = None
        self.observer = None
        if tracer_provider is not None or meter_provider is not None:
            self.observer = Telemetry(
                tracer_provider, meter_provider, new_trace_after=new_trace_after_s
            )
        return self

    def _meter_provider(
        self, kind: str, resource: Any, endpoint: str | None, settings: Settings
    ) -> Any:
        from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
        from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader

        reader: MetricReader
        if kind == "prometheus":
            import prometheus_client
            from opentelemetry.exporter.prometheus import PrometheusMetricReader

            host, _, port = settings.prometheus_listen.rpartition(":")
            host = os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", host)
            port = os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", port)
            reader = PrometheusMetricReader()
            server, _ = prometheus_client.start_http_server(int(port), addr=host)
            self._prometheus = server
            self.prometheus_address = (host, server.server_port)
        else:
            if kind == "otlp":
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                    OTLPMetricExporter,
                )

                exporter: Any = OTLPMetricExporter(endpoint=endpoint)
            else:
                from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

                exporter = ConsoleMetricExporter()
            interval = None
            if not os.environ.get("OTEL_METRIC_EXPORT_INTERVAL"):
                interval = settings.metric_interval_s * 1000
            reader = PeriodicExportingMetricReader(exporter, export_interval_millis=interval)
        return SdkMeterProvider(resource=resource, metric_readers=[reader])

    def install_global(self) -> None:
        """Make these the process's providers, so spans, metrics and logs of
        workflow code and its libraries go to the same place; with logs on, the
        root logger's records go to the logger provider too (next to stderr)."""
        from opentelemetry import metrics as otel_metrics

        if self.tracer_provider is not None:
            trace.set_tracer_provider(self.tracer_provider)
        if self.meter_provider is not None:
            otel_metrics.set_meter_provider(self.meter_provider)
        if self.logger_provider is not None:
            from opentelemetry._logs import set_logger_provider

            set_logger_provider(self.logger_provider)
            self.log_to_provider(logging.getLogger())

    def log_to_provider(self, logger: logging.Logger) -> logging.Handler | None:
        """Send ``logger``'s records to the logger provider too (the SDK's
        LoggingHandler): each with the trace and span ids of the context it was
        logged in and its extra fields as attributes. The handler, or None with
        logs off."""
        if self.logger_provider is None:
            return None
        if self._log_handler is None:
            self._log_handler = _log_handler(self.logger_provider)
        logger.addHandler(self._log_handler)
        self._handled.append(logger)
        return self._log_handler

    def server_interceptors(self) -> list[Any]:
        """The standard gRPC server instrumentation (server spans, and the caller's
        trace context made current), or none with tracing off. With rpc_spans =
        "none", only the caller's trace context is made current, for creates."""
        if self.tracer_provider is None:
            return []
        if self.rpc_spans == "none":
            return [_CallerTrace()]
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        left_out = _READS if self.rpc_spans == "writes" else ()

        def traced(details: grpc.HandlerCallDetails) -> bool:
            # One test a call: the instrumentation's composed filters cost
            # microseconds each, on every call.
            service, _, method = (details.method or "").rpartition("/")
            return not service.startswith(_UNTRACED) and method not in left_out

        interceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self.tracer_provider, filter_=traced
        )
        return [interceptor]

    def connect_interceptors(self) -> list[Any]:
        """The same for the Connect (HTTP) application: connectrpc-otel's server
        spans for the RPCs ``rpc_spans`` names, else the caller's trace context
        made current for creates and SendEvent."""
        if self.tracer_provider is None:
            return []
        if self.rpc_spans == "none":
            return [_ConnectCallerTrace()]
        from connectrpc_otel import OpenTelemetryInterceptor
        from opentelemetry.metrics import NoOpMeterProvider

        spans = OpenTelemetryInterceptor(
            tracer_provider=self.tracer_provider,
            # The gRPC instrumentation records no metrics either: the
            # engine's own say what a call did.
            meter_provider=NoOpMeterProvider(),
        )
        if self.rpc_spans == "all":
            return [spans]
        return [_ConnectWrites(spans)]

    def shutdown(self) -> None:
        """Flush what is buffered and stop the exporters (blocks: run it off the loop)."""
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()
        if self.logger_provider is not None:
            # Records logged from here on go to stderr only.
            handler = self._log_handler
            if handler is not None:
                for logger in self._handled:
                    logger.removeHandler(handler)
            self.logger_provider.shutdown()
        if self._prometheus is not None:
            self._prometheus.shutdown()


def _tracer_provider(kind: str, resource: Any, endpoint: str | None) -> tuple[Any, SpanSink]:
    """The SDK provider (its sampler, id generator and resource; the gRPC
    instrumentation's and workflow code's spans) and the sink that exports
    them and the engine's spans from a child process (see ``spans.py``)."""
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

    from cruzflow.server.spans import ChildSink, PipeSpanProcessor

    provider = SdkTracerProvider(resource=resource)
    sink = ChildSink(kind, endpoint, provider.resource)
    provider.add_span_processor(PipeSpanProcessor(sink))
    return provider, sink


def _logger_provider(kind: str, resource: Any, endpoint: str | None) -> Any:
    """The SDK's logger provider, exporting in batches (``OTEL_BLRP_*``) over
    OTLP/gRPC (the ``OTEL_EXPORTER_OTLP_*`` variables) or to stdout."""
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter

    exporter: LogRecordExporter
    if kind == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

        if os.environ.get("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"):
            endpoint = None
        exporter = OTLPLogExporter(endpoint=endpoint)
    else:
        from opentelemetry.sdk._logs.export import ConsoleLogRecordExporter

        exporter = ConsoleLogRecordExporter()
    provider = LoggerProvider(resource=resource)
    provider.add_log_record_processor(BatchLogRecordProcessor(exporter))
    return provider


def _log_handler(provider: Any) -> logging.Handler:
    """The SDK's LoggingHandler on ``provider``, less what would loop or repeat."""
    from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
    from opentelemetry.context import get_value as context_value
    from opentelemetry.sdk._logs import LoggingHandler

    class Handler(LoggingHandler):
        @staticmethod
        def _get_attributes(record: logging.LogRecord) -> Any:
            attributes = dict(LoggingHandler._get_attributes(record) or {})
            # The stderr handler's filter puts the ids on the record; the log
            # record carries them in its own fields.
            attributes.pop("trace_id", None)
            attributes.pop("span_id", None)
            return attributes

        def emit(self, record: logging.LogRecord) -> None:
            # The exporters' own complaints (logged from the export thread,
            # which suppresses instrumentation) go to stderr only: sent as log
            # records, a failing export would feed itself.
            if not context_value(_SUPPRESS_INSTRUMENTATION_KEY):
                super().emit(record)

    with warnings.catch_warnings():
        # Deprecated in favour of opentelemetry-instrumentation-logging's
        # handler, which this server does not depend on.
        warnings.simplefilter("ignore", DeprecationWarning)
        return Handler(logger_provider=provider)
