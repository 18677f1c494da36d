"""The HTTP listener speaks every protocol and codec connectrpc serves: the
Connect protocol and gRPC-Web, each in JSON and binary protobuf, unary and
streaming calls alike, with the same refusals as over gRPC."""

from __future__ import annotations

import pytest
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType

from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1.workflows_connect import WorkflowServiceClient
from tests.conftest import ALL_WORKFLOWS, Server

TRANSPORTS = ("http",)
"""The server fixtures here have an HTTP listener."""


@pytest.mark.parametrize("protocol", [ProtocolType.CONNECT, ProtocolType.GRPC_WEB])
@pytest.mark.parametrize("codec", ["json", "proto"])
async def test_every_protocol_and_codec_serves_the_same_api(
    server: Server, protocol: ProtocolType, codec: str
) -> None:
    chosen = google_protobuf_json_codec() if codec == "json" else google_protobuf_binary_codec()
    url = f"http://127.0.0.1:{server.service.http_port}"
    async with WorkflowServiceClient(url, protocol=protocol, codec=chosen) as client:
        listed = await client.list_workflows(pb.ListWorkflowsRequest())
        assert sorted(w.name for w in listed.workflows) == sorted(ALL_WORKFLOWS)
        created = await client.create_instance(
            pb.CreateInstanceRequest(workflow="three-steps", params_json='{"n": 3}')
        )
        events = [
            event
            async for event in client.watch_instance(
                pb.WatchInstanceRequest(instance_id=created.instance_id)
            )
        ]
        # Every event once, in order, ending with the final status.
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert events[-1].status_changed.status == pb.INSTANCE_STATUS_COMPLETE
        with pytest.raises(ConnectError) as refused:
            await client.get_status(pb.GetStatusRequest(instance_id="no-such-instance"))
        assert refused.value.code == Code.NOT_FOUND
        assert "no instance 'no-such-instance'" in refused.value.message
        with pytest.raises(ConnectError) as bad:
            await client.create_instance(
                pb.CreateInstanceRequest(workflow="three-steps", params_json="{nope")
            )
        assert bad.value.code == Code.INVALID_ARGUMENT
        assert bad.value.message.startswith("params_json: not valid JSON")
