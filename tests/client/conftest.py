"""Fixtures of the client tests: a typed client on the in-process server."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest

from cruzflow.client import Client
from tests.conftest import Server


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    """A Client on the ``server`` fixture's address, closed afterwards."""
    async with Client(server.address) as made:
        yield made


def free_port() -> int:
    """A loopback port nobody listens on right now (for a server to be started on later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
