"""What ``GET /v1/workflows/{run_id}`` answers: each run's status and result, kept in Redis
by whoever starts the run and by its tasks (so the API does not depend on Hatchet's REST API)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import msgspec

from services.core.events import utcnow
from services.core.keys import Keys

__all__ = ["RunStatus", "RunStore", "WorkflowRun"]

RETENTION_S = 7 * 86_400


class RunStatus:
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class WorkflowRun(msgspec.Struct, frozen=True, kw_only=True):
    run_id: str
    workflow: str
    status: str
    portfolio_id: str
    correlation_id: str
    created_at: dt.datetime
    updated_at: dt.datetime
    result: dict[str, Any] | None = None
    error: str | None = None
    step: str | None = None


class RunStore:
    def __init__(self, redis: Any, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    def key(self, run_id: str) -> str:
        return self.keys.global_key("wfrun", run_id)

    async def queued(self, run_id: str, workflow: str, portfolio_id: str, correlation_id: str) -> None:
        now = utcnow().isoformat()
        await self._set(run_id, {
            "run_id": run_id, "workflow": workflow, "status": RunStatus.QUEUED, "portfolio_id": portfolio_id,
            "correlation_id": correlation_id, "created_at": now, "updated_at": now,
        }, only_new=True)

    async def running(self, run_id: str, workflow: str, portfolio_id: str, correlation_id: str) -> None:
        now = utcnow().isoformat()
        await self._set(run_id, {
            "run_id": run_id, "workflow": workflow, "portfolio_id": portfolio_id, "correlation_id": correlation_id,
            "created_at": now,
        }, only_new=True)
        await self._set(run_id, {"status": RunStatus.RUNNING, "updated_at": now}, unless_final=True)

    async def completed(self, run_id: str, result: dict[str, Any]) -> None:
        await self._set(run_id, {
            "status": RunStatus.COMPLETED, "result": json.dumps(result), "updated_at": utcnow().isoformat(),
        })

    async def failed(self, run_id: str, error: str, step: str | None) -> None:
        await self._set(run_id, {
            "status": RunStatus.FAILED, "error": error[:2000], "step": step or "", "updated_at": utcnow().isoformat(),
        })

    async def get(self, run_id: str) -> WorkflowRun | None:
        raw: Any = await self.redis.hgetall(self.key(run_id))
        if not raw:
            return None
        fields = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                  for k, v in raw.items()}
        if "workflow" not in fields:
            return None
        return WorkflowRun(
            run_id=run_id, workflow=fields["workflow"], status=fields.get("status", RunStatus.QUEUED),
            portfolio_id=fields.get("portfolio_id", ""), correlation_id=fields.get("correlation_id", ""),
            created_at=dt.datetime.fromisoformat(fields["created_at"]),
            updated_at=dt.datetime.fromisoformat(fields.get("updated_at", fields["created_at"])),
            result=json.loads(fields["result"]) if fields.get("result") else None,
            error=fields.get("error") or None, step=fields.get("step") or None,
        )

    async def _set(self, run_id: str, fields: dict[str, str], *, only_new: bool = False, unless_final: bool = False) -> None:
        key = self.key(run_id)
        if only_new:
            await self.redis.eval(_SET_NEW, 1, key, RETENTION_S, *[x for kv in fields.items() for x in kv])
        elif unless_final:
            await self.redis.eval(_SET_UNLESS_FINAL, 1, key, RETENTION_S, *[x for kv in fields.items() for x in kv])
        else:
            await self.redis.hset(key, mapping=fields)
            await self.redis.expire(key, RETENTION_S)


_SET_NEW = """
for i = 2, #ARGV, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
"""

_SET_UNLESS_FINAL = """
local s = redis.call('HGET', KEYS[1], 'status')
if s == 'completed' or s == 'failed' then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""
