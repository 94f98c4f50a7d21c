"""A write on a connection whose transport was closed under it (a failover tearing down a dead
node's connections) fails as a Redis ``ConnectionError``, which every retry layer and the
gateway's 503 understand; under uvloop the transport raised a bare ``RuntimeError`` instead
(a 500 from the gateway in the cluster chaos test)."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from redis.exceptions import ConnectionError

from services.core.redisconn import HiredisPackingConnection


def test_a_write_on_a_closed_transport_is_a_connection_error(redis_single_url: str) -> None:
    port = int(redis_single_url.rsplit(":", 1)[1].split("/")[0])

    async def attempt() -> None:
        conn = HiredisPackingConnection(host="127.0.0.1", port=port)
        await conn.connect()
        writer = conn._writer
        assert writer is not None
        writer.transport.close()
        await asyncio.sleep(0.01)
        with pytest.raises(ConnectionError):
            await conn.send_packed_command(conn.pack_command("PING"), check_health=False)
        await conn.disconnect()

    uvloop.run(attempt())
