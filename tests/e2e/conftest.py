"""Fixtures of the end-to-end tests: clusters of real server processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import Cluster

ClusterFactory = Callable[..., Cluster]


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[ClusterFactory]:
    """Make clusters under tmp_path; every server process is stopped afterwards."""
    made: list[Cluster] = []

    def make(name: str = "cluster", **kwargs: Any) -> Cluster:
        cluster = Cluster(tmp_path / name, **kwargs)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()
