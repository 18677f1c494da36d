"""A real OTLP/gRPC receiver for tests and benchmarks (there is no collector here):
traces, metrics and logs.

It runs on a synchronous gRPC server with its own thread pool, never on the
event loop of the service it receives from (the exporter's flush blocks).
``python -m bench.otlp_sink`` runs it as a process and prints its port.
"""

from __future__ import annotations

import argparse
import sys
import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as logs_pb
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc as logs_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_pb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as metrics_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as trace_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind)


@dataclass(frozen=True)
class ReceivedSpan:
    """A span as it arrived, with its ids in hex."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str
    events: list[str]
    links: list[tuple[str, str]]
    service_name: str
    start_ns: int
    end_ns: int


@dataclass(frozen=True)
class ReceivedLog:
    """A log record as it arrived, with its trace and span ids in hex ("" if none)."""

    body: Any
    severity_number: int  # 9 INFO, 13 WARN, 17 ERROR
    severity_text: str
    trace_id: str
    span_id: str
    attributes: dict[str, Any]
    scope: str
    service_name: str
    time_ns: int


@dataclass
class _Received:
    spans: list[ReceivedSpan] = field(default_factory=list)
    logs: list[ReceivedLog] = field(default_factory=list)
    metric_names: set[str] = field(default_factory=set)
    span_count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Traces(trace_grpc.TraceServiceServicer):
    def __init__(self, received: _Received, keep: bool) -> None:
        self._received = received
        self._keep = keep

    def Export(
        self, request: trace_pb.ExportTraceServiceRequest, context: Any
    ) -> trace_pb.ExportTraceServiceResponse:
        spans: list[ReceivedSpan] = []
        count = 0
        for resource_spans in request.resource_spans:
            service = ""
            for attr in resource_spans.resource.attributes:
                if attr.key == "service.name":
                    service = attr.value.string_value
            for scope_spans in resource_spans.scope_spans:
                count += len(scope_spans.spans)
                if not self._keep:
                    continue
                for span in scope_spans.spans:
                    spans.append(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            status_code=span.status.code,
                            status_message=span.status.message,
                            events=[e.name for e in span.events],
                            links=[
                                (link.trace_id.hex(), link.span_id.hex()) for link in span.links
                            ],
                            service_name=service,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                        )
                    )
        with self._received.lock:
            self._received.spans.extend(spans)
            self._received.span_count += count
        return trace_pb.ExportTraceServiceResponse()


class _Metrics(metrics_grpc.MetricsServiceServicer):
    def __init__(self, received: _Received) -> None:
        self._received = received

    def Export(
        self, request: metrics_pb.ExportMetricsServiceRequest, context: Any
    ) -> metrics_pb.ExportMetricsServiceResponse:
        names = {
            metric.name
            for resource in request.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }
        with self._received.lock:
            self._received.metric_names |= names
        return metrics_pb.ExportMetricsServiceResponse()


class _Logs(logs_grpc.LogsServiceServicer):
    def __init__(self, received: _Received) -> None:
        self._received = received

    def Export(
        self, request: logs_pb.ExportLogsServiceRequest, context: Any
    ) -> logs_pb.ExportLogsServiceResponse:
        logs: list[ReceivedLog] = []
        for resource_logs in request.resource_logs:
            service = ""
            for attr in resource_logs.resource.attributes:
                if attr.key == "service.name":
                    service = attr.value.string_value
            for scope_logs in resource_logs.scope_logs:
                for record in scope_logs.log_records:
                    logs.append(
                        ReceivedLog(
                            body=_value(record.body),
                            severity_number=record.severity_number,
                            severity_text=record.severity_text,
                            trace_id=record.trace_id.hex(),
                            span_id=record.span_id.hex(),
                            attributes={a.key: _value(a.value) for a in record.attributes},
                            scope=scope_logs.scope.name,
                            service_name=service,
                            time_ns=record.time_unix_nano,
                        )
                    )
        with self._received.lock:
            self._received.logs.extend(logs)
        return logs_pb.ExportLogsServiceResponse()


class OtlpSink:
    """Receives OTLP/gRPC traces, metrics and logs on 127.0.0.1:``port`` (0: any free one).

    ``keep=False`` only counts spans (for benchmarks: no memory growth).
    """

    def __init__(self, port: int = 0, keep: bool = True) -> None:
        self._received = _Received()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        # The generated registration functions are untyped.
        trace_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _Traces(self._received, keep), self._server
        )
        metrics_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _Metrics(self._received), self._server
        )
        logs_grpc.add_LogsServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _Logs(self._received), self._server
        )
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> OtlpSink:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._received.lock:
            return list(self._received.spans)

    @property
    def logs(self) -> list[ReceivedLog]:
        with self._received.lock:
            return list(self._received.logs)

    @property
    def span_count(self) -> int:
        with self._received.lock:
            return self._received.span_count

    @property
    def metric_names(self) -> set[str]:
        with self._received.lock:
            return set(self._received.metric_names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Count OTLP spans received over gRPC.")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    with OtlpSink(args.port, keep=False) as sink:
        print(f"otlp sink listening on 127.0.0.1:{sink.port}", flush=True)
        try:
            for line in sys.stdin:
                if line.strip() == "count":
                    print(sink.span_count, flush=True)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
