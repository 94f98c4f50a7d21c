"""Session-wide infrastructure: each fixture starts its piece of the local stack through
devstack (idempotent, data under .zvt/) and returns where to connect. Nothing is skipped: if
the infrastructure cannot start, the fixture errors with devstack's reason."""

from __future__ import annotations

import pytest

from devstack import stack


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cluster_chaos: kills and restarts Redis Cluster nodes; leaves the cluster whole again",
    )


@pytest.fixture(scope="session")
def redis_single_url() -> str:
    return stack.ensure_single()


@pytest.fixture(scope="session")
def redis_cluster_url() -> str:
    stack.ensure_cluster()
    return stack.redis_url(stack.CLUSTER_PORTS[0])


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    return stack.ensure_postgres()


@pytest.fixture(scope="session")
def hatchet_env() -> dict[str, str]:
    """The local Hatchet engine (built once into .cache/tools), as ZVT_HATCHET_* settings."""
    from devstack import hatchet

    client = hatchet.ensure_hatchet()
    return {
        "ZVT_HATCHET_TOKEN": client["HATCHET_CLIENT_TOKEN"],
        "ZVT_HATCHET_HOST_PORT": client["HATCHET_CLIENT_HOST_PORT"],
        "ZVT_HATCHET_TLS_STRATEGY": "none",
    }
