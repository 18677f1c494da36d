"""A throw-away PostgreSQL server for the tests, started by the test session.

``postgres_server`` (session-scoped) starts a cluster of its own
(tests/pgcluster.py: ``initdb`` into a temporary folder, ``pg_ctl start`` on a
free loopback port, with its socket in that folder); it is stopped and
deleted when the session ends. Without the machine's PostgreSQL binaries, or
run as root with no ``postgres`` user to run them as, every test that asks
for the server skips with one line saying so.

The stores under test connect as the role ``cruzflow`` with its password in
the URL, as a deployment does. ``postgres_url`` gives each test a database of
its own, so tests never see each other's rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pgcluster import ROLE, PostgresServer, Unavailable, start_cluster

__all__ = ["ROLE", "PostgresServer", "postgres_server", "postgres_url"]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        server = start_cluster()
    except Unavailable as exc:
        pytest.skip(f"PostgreSQL tests skipped: {exc}")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a new empty database of this test's own."""
    return postgres_server.url(postgres_server.create_database())
