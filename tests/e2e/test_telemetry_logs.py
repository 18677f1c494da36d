"""Log records over OTLP/gRPC from a real server process (``logs = "otlp"``).

The receiver is ``bench.otlp_sink`` in this test process (its own gRPC thread
pool). The records are held by the batch processor for a minute, so only the
flush of a graceful shutdown sends them.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc

from bench.otlp_sink import OtlpSink, ReceivedLog, ReceivedSpan
from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc
from tests.procs import ServerProcess, wait_for, write_config

CLIENT_TRACE = "6c6f67736c6f67736c6f67736c6f6773"
CLIENT_SPAN = "6c6f677300000001"
WARN = 13  # SEVERITY_NUMBER_WARN


def _one_span(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def _one_log(logs: list[ReceivedLog], body: str) -> ReceivedLog:
    found = [r for r in logs if r.body == body]
    assert len(found) == 1, (body, [r.body for r in logs])
    return found[0]


def test_log_records_carry_their_span_and_fields(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, {"logs-then-fails": "tests.e2e.logging_workflows:LogsThenFails"}
    )
    # The config file asks for the logs; the environment for the traces.
    config.write_text(config.read_text() + '[telemetry]\nlogs = "otlp"\n')
    with OtlpSink() as sink:
        server = ServerProcess(
            config,
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_METRICS_EXPORTER": "none",
                "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
                "OTEL_SERVICE_NAME": "cruzflow-logs",
                "OTEL_BSP_SCHEDULE_DELAY": "50",
                "OTEL_BLRP_SCHEDULE_DELAY": "60000",
            },
        )
        try:
            server.start()
            with grpc.insecure_channel(server.address) as channel:
                stub = workflows_pb2_grpc.WorkflowServiceStub(channel)
                created = stub.CreateInstance(
                    pb.CreateInstanceRequest(
                        workflow="logs-then-fails", params_json=json.dumps({"card": 4242})
                    ),
                    metadata=(("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),),
                    timeout=10,
                )
                done = stub.WaitInstance(
                    pb.WaitInstanceRequest(instance_id=created.instance_id), timeout=30
                )
            assert done.instance.status == pb.INSTANCE_STATUS_ERRORED
            wait_for(lambda: any(s.name == "run logs-then-fails" for s in sink.spans))
            assert sink.logs == []  # held for a minute...
            assert server.terminate() == 0
        finally:
            server.stop()
        logs = sink.logs  # ...and flushed by the shutdown
        spans = sink.spans

    run = _one_span(spans, "run logs-then-fails")
    attempt = _one_span(spans, "step logs-then-fails/charge")
    assert (attempt.trace_id, attempt.parent_span_id) == (CLIENT_TRACE, run.span_id)

    # The step's own record: logged inside the attempt, so in its span.
    own = _one_log(logs, "charging card 4242")
    assert (own.severity_number, own.severity_text) == (WARN, "WARN")
    assert (own.trace_id, own.span_id) == (attempt.trace_id, attempt.span_id)
    assert own.scope == "billing"
    assert own.service_name == "cruzflow-logs"

    # The engine's record of the failure, with the instance's fields as
    # attributes. It is logged before the attempt's span ends: in that span.
    failed = _one_log(logs, "step 'charge' failed after 1 attempt(s): ValueError: card declined")
    assert (failed.severity_number, failed.severity_text) == (WARN, "WARN")
    assert (failed.trace_id, failed.span_id) == (CLIENT_TRACE, attempt.span_id)
    assert failed.attributes["instance_id"] == created.instance_id
    assert failed.attributes["workflow"] == "logs-then-fails"
    assert failed.attributes["step"] == "charge"
    assert failed.attributes["attempt"] == 1
    traceback = failed.attributes["traceback"]
    assert traceback.startswith("Traceback (most recent call last):")
    assert 'raise ValueError("card declined")' in traceback
    # The ids are the record's own fields, not attributes as well.
    assert "trace_id" not in failed.attributes and "span_id" not in failed.attributes
    assert failed.scope == "cruzflow.engine"
