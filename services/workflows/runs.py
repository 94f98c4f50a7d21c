"""What ``GET /v1/workflows/{run_id}`` answers: each run's status and result, kept in Redis
by whoever starts the run and by its tasks (so the API does not depend on Hatchet's REST API)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import msgspec

from services.core.events import utcnow
from services.core.keys import Keys

__all__ = ["RunStatus", "RunStore", "StepRecord", "WorkflowRun"]

RETENTION_S = 7 * 86_400


class RunStatus:
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class StepRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One step of a run, as far as it got: ``ended_at`` and ``ms`` once it has ended, and the
    types of the events it emitted (its result)."""

    name: str
    started_at: dt.datetime
    ended_at: dt.datetime | None = None
    ms: float | None = None
    events: list[str] | None = None

    @property
    def status(self) -> str:
        return "completed" if self.ended_at is not None else "running"

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name, "status": self.status, "started_at": self.started_at.isoformat(),
            "ended_at": self.ended_at.isoformat() if self.ended_at else None, "ms": self.ms, "events": self.events,
        }


_STEP = "step."  # a run's hash field per step: step.<name> -> the step's record (JSON)


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
    steps: list[dict[str, Any]] | None = None


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

    async def running(self, run_id: str, workflow: str, portfolio_id: str, correlation_id: str, *,
                      step: str | None = None, at: dt.datetime | None = None) -> None:
        """The run is running (unless it has already ended), and with ``step`` that step started at ``at``."""
        now = (at or utcnow()).isoformat()
        fields = {"status": RunStatus.RUNNING, "updated_at": now}
        if step is not None:
            fields |= {"step": step, _STEP + step: _step_json(StepRecord(name=step, started_at=at or utcnow()))}
        identity = {"run_id": run_id, "workflow": workflow, "portfolio_id": portfolio_id,
                    "correlation_id": correlation_id, "created_at": now}
        await self.redis.eval(
            _SET_RUNNING, 1, self.key(run_id), RETENTION_S, len(identity),
            *[x for kv in identity.items() for x in kv], *[x for kv in fields.items() for x in kv],
        )

    async def step(self, run_id: str, *, ended: StepRecord | None, started: str, at: dt.datetime) -> None:
        """In one write: ``ended`` (the step before) is over, step ``started`` began at ``at``."""
        fields = {"step": started, _STEP + started: _step_json(StepRecord(name=started, started_at=at)),
                  "updated_at": at.isoformat()}
        if ended is not None:
            fields[_STEP + ended.name] = _step_json(ended)
        await self._set(run_id, fields, unless_final=True)

    async def completed(self, run_id: str, result: dict[str, Any], *, last: StepRecord | None = None) -> None:
        fields = {"status": RunStatus.COMPLETED, "result": json.dumps(result), "updated_at": utcnow().isoformat()}
        if last is not None:
            fields[_STEP + last.name] = _step_json(last)
        await self._set(run_id, fields)

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
            steps=_steps(fields),
        )

    async def _set(self, run_id: str, fields: dict[str, str], *, only_new: bool = False, unless_final: bool = False) -> None:
        key = self.key(run_id)
        if only_new:
            await self.redis.eval(_SET_NEW, 1, key, RETENTION_S, *[x for kv in fields.items() for x in kv])
        elif unless_final:
            await self.redis.eval(_SET_UNLESS_FINAL, 1, key, RETENTION_S, *[x for kv in fields.items() for x in kv])
        else:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(key, mapping=fields)
            pipe.expire(key, RETENTION_S)
            await pipe.execute()


def _step_json(record: StepRecord) -> str:
    return json.dumps(record.public())


def _steps(fields: dict[str, str]) -> list[dict[str, Any]] | None:
    """The steps a run has recorded, in the order they started."""
    steps = [json.loads(v) for k, v in fields.items() if k.startswith(_STEP)]
    return sorted(steps, key=lambda s: s["started_at"]) or None


_SET_NEW = """
for i = 2, #ARGV, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
"""

_SET_RUNNING = """
local n = tonumber(ARGV[2])
for i = 3, 2 + 2 * n, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'completed' and s ~= 'failed' then
  for i = 3 + 2 * n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
"""

_SET_UNLESS_FINAL = """
local s = redis.call('HGET', KEYS[1], 'status')
if s == 'completed' or s == 'failed' then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""
