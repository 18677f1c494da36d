"""Fixtures of the end-to-end tests: clusters of real server processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ON_POSTGRES, Stores
from tests.e2e import Cluster

ClusterFactory = Callable[..., Cluster]


@pytest.fixture
def clusters(tmp_path: Path, stores: Stores) -> Iterator[ClusterFactory]:
    """Make clusters under tmp_path, on the run's store (a SQLite file, or a
    PostgreSQL database); every server process is stopped afterwards."""
    made: list[Cluster] = []

    def make(name: str = "cluster", **kwargs: Any) -> Cluster:
        if ON_POSTGRES:
            kwargs.setdefault("store_url", stores.url(name))
        cluster = Cluster(tmp_path / name, **kwargs)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()
