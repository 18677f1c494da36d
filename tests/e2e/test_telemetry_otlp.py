"""Real OTLP/gRPC export from real server processes, across a SIGKILL.

The receiver is ``bench.otlp_sink`` in this test process (its own gRPC thread
pool). The caller's trace context goes in as gRPC metadata; the steps that a
second server process runs after the first was killed land in that trace,
directly under the caller's span (no server spans by default).
"""

from __future__ import annotations

import json

from bench.otlp_sink import OtlpSink, ReceivedSpan
from cruzflow.v1 import workflows_pb2 as pb
from tests.e2e.conftest import ClusterFactory
from tests.procs import wait_for

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


def _one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def test_spans_after_a_kill_join_the_creators_trace(clusters: ClusterFactory) -> None:
    with OtlpSink() as sink:
        env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
            "OTEL_SERVICE_NAME": "cruzflow-e2e",
            # Export soon after each span ends, so the first server's spans
            # are out before it is killed.
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_METRIC_EXPORT_INTERVAL": "200",
        }
        cluster = clusters()
        cluster.start(env)
        created = cluster.stub.CreateInstance(
            pb.CreateInstanceRequest(
                workflow="long-first-attempt", params_json=json.dumps({"tag": "otlp"})
            ),
            metadata=(("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),),
            timeout=10,
        )
        instance_id = created.instance_id
        wait_for(lambda: cluster.in_attempt(instance_id, "work", "otlp:work:1", 1))
        wait_for(lambda: "cruzflow.instances.created" in sink.metric_names)
        cluster.kill()

        cluster.start(env)
        (final,) = cluster.finished([instance_id]).values()
        assert final.status == pb.INSTANCE_STATUS_COMPLETE
        wait_for(lambda: any(s.name == "run long-first-attempt" for s in sink.spans))
        wait_for(lambda: "cruzflow.instances.finished" in sink.metric_names)

        spans = sink.spans
        # rpc_spans = "none", the default: no server spans, and no create span
        # of its own either, since the call came with its caller's trace.
        assert not [s.name for s in spans if s.name.startswith("/") or s.name == "create"]
        # The first run never ended (killed mid-attempt); the second one did,
        # as a child of the caller's span, in the caller's trace.
        run = _one(spans, "run long-first-attempt")
        assert run.service_name == "cruzflow-e2e"
        assert run.trace_id == CLIENT_TRACE
        assert run.parent_span_id == CLIENT_SPAN
        assert run.attributes["cruzflow.instance.id"] == instance_id
        assert run.attributes["cruzflow.instance.status"] == "complete"
        assert run.attributes["cruzflow.run.replayed_steps"] == 1
        step = _one(spans, "step long-first-attempt/work")
        assert step.trace_id == CLIENT_TRACE
        assert step.parent_span_id == run.span_id
        assert step.attributes["cruzflow.step.attempt"] == 2
        assert step.attributes["cruzflow.step.outcome"] == "succeeded"
        assert {
            "cruzflow.instances",
            "cruzflow.step.attempts",
            "cruzflow.step.duration",
            "cruzflow.store.commit.duration",
            "cruzflow.store.commit.rows",
        } <= sink.metric_names
