"""Fixtures of the client tests: a typed client on the in-process server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from cruzflow.client import Client
from tests.conftest import Server


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    """A Client on the ``server`` fixture's address, closed afterwards."""
    async with Client(server.address) as made:
        yield made
