"""``ops chaos``: evict random pods of one service, a few at a time, then watch it recover.

The bound: each round evicts at most ``kill`` pods, through the Eviction API, so the service's
PodDisruptionBudget refuses what would break its budget; without a budget, a round never takes
the last ready pod. A namespace must be labelled ``zvt.io/chaos=allowed`` (refused otherwise,
dry run included), and nothing is evicted without ``yes`` (a dry run names what the first
round would take).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.ops.cluster import CHAOS_LABEL, Fleet, OpsError, Service

__all__ = ["ChaosPlan", "ChaosReport", "run_chaos"]


@dataclass(frozen=True)
class ChaosPlan:
    service: str
    kill: int
    every_s: float
    for_s: float
    recover_timeout_s: float = 120.0
    yes: bool = False
    seed: int | None = None


@dataclass
class ChaosReport:
    evicted: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    rounds: int = 0
    recovered: bool | None = None  # None: a dry run
    recovery_s: float | None = None


def _ready(pod: object) -> bool:
    conditions = getattr(getattr(pod, "status", None), "conditions", None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def _victims(fleet: Fleet, service: Service, kill: int, rng: random.Random) -> list[str]:
    pods = fleet.pods(service)
    ready = [p.metadata.name for p in pods if _ready(p)]
    bound = kill if service.budget is not None else min(kill, max(0, len(ready) - 1))
    return sorted(rng.sample(ready, min(bound, len(ready))))


def run_chaos(fleet: Fleet, plan: ChaosPlan, say: Callable[[str], None],
              clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> ChaosReport:
    labels = fleet.namespace_labels()
    key, value = CHAOS_LABEL
    if labels.get(key) != value:
        raise OpsError(f"namespace {fleet.namespace} is not labelled {key}={value}: chaos refused "
                       f"(kubectl label namespace {fleet.namespace} {key}={value})")
    service = fleet.service(plan.service)
    rng = random.Random(plan.seed)
    report = ChaosReport()
    if not plan.yes:
        victims = _victims(fleet, service, plan.kill, rng)
        say(f"dry run: the first round would evict {', '.join(victims) or 'nothing'} of {service.name} "
            f"({service.ready}/{service.desired} ready); pass --yes to do it")
        return report
    started = clock()
    while True:
        report.rounds += 1
        service = fleet.refresh(plan.service)
        victims = _victims(fleet, service, plan.kill, rng)
        for pod in victims:
            why = fleet.evict(pod)
            if why is None:
                report.evicted.append(pod)
                say(f"round {report.rounds}: evicted {pod}")
            else:
                report.refused.append((pod, why))
                say(f"round {report.rounds}: {pod} not evicted: {why}")
        if not victims:
            say(f"round {report.rounds}: no pod to evict within the bound")
        if clock() - started + plan.every_s > plan.for_s:
            break
        sleep(plan.every_s)
    ended = clock()
    while True:
        service = fleet.refresh(plan.service)
        # the evicted pods are gone (not merely terminating) and every desired replica is back
        left = {p.metadata.name for p in fleet.pods(service, terminating=True)} & set(report.evicted)
        if service.settled and not left:
            report.recovered, report.recovery_s = True, clock() - ended
            break
        if clock() - ended > plan.recover_timeout_s:
            report.recovered = False
            break
        sleep(1.0)
    outcome = (f"recovered in {report.recovery_s:.1f} s" if report.recovered
               else f"NOT recovered after {plan.recover_timeout_s:g} s")
    say(f"chaos on {service.name}: {report.rounds} round(s), {len(report.evicted)} evicted, "
        f"{len(report.refused)} refused; {service.ready}/{service.desired} ready: {outcome}")
    return report
