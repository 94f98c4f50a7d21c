"""The Hatchet client of a worker or of the gateway, from ``ZVT_HATCHET_*`` settings."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from typing import Any

from hatchet_sdk import ClientConfig, Hatchet
from hatchet_sdk.config import ClientTLSConfig, HealthcheckConfig

from services.workflows.settings import HatchetSettings

__all__ = ["WorkerConfig", "hatchet_client"]

WORKER_PID = "ZVT_WORKFLOWS_WORKER_PID"
_PR_SET_PDEATHSIG = 1


class WorkerConfig(ClientConfig):
    """A worker's client configuration, which also ties the SDK's listener process to the worker.

    The SDK runs a worker's connection to the engine (the one tasks are assigned through) in a
    second process it spawns with ``multiprocessing``, passing it this configuration. Left
    behind by a worker killed with -9, that process stays connected and keeps taking tasks that
    nothing runs, each until its execution timeout (a container runtime kills it with the
    container; a bare process manager may not). Unpickled in that process, this configuration
    asks the kernel to kill it when its parent dies (``PR_SET_PDEATHSIG``), and exits at once if
    the worker (``ZVT_WORKFLOWS_WORKER_PID``) is already gone. Its SDK logger passes warnings
    and errors, as in the worker (``hatchet_client``).
    """

    def __setstate__(self, state: Any) -> None:
        super().__setstate__(state)
        _die_with_the_worker()
        logging.getLogger("hatchet").setLevel(logging.WARNING)


def _die_with_the_worker() -> None:
    worker = os.environ.get(WORKER_PID)
    if worker is None or worker == str(os.getpid()) or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if str(os.getppid()) != worker:
        os._exit(1)


def hatchet_client(settings: HatchetSettings, *, health: HealthcheckConfig | None = None,
                   worker: bool = False) -> Hatchet:
    """A client for the engine; ``worker``: for this process's worker (see ``WorkerConfig``)."""
    if settings.token is None:
        raise ValueError("ZVT_HATCHET_TOKEN is not set")
    if worker:
        os.environ[WORKER_PID] = str(os.getpid())  # inherited by the SDK's listener process
    # The SDK's logger (a handler of its own, at INFO) writes three lines for every task run
    # (received, started, finished), a CPU cost on every run for what the run records and our
    # own logs already say. It passes what every other library's logger passes here: the root
    # logger's level, warnings and errors (``services.core.telemetry.setup_logging``).
    logging.getLogger("hatchet").setLevel(max(logging.getLogger().getEffectiveLevel(), logging.WARNING))
    config = (WorkerConfig if worker else ClientConfig)(
        token=settings.token.get_secret_value(),
        host_port=settings.host_port,
        namespace=settings.namespace,
        tls_config=ClientTLSConfig(strategy=settings.tls_strategy),
        healthcheck=health or HealthcheckConfig(enabled=False),
        # Our services log to stdout (structlog); the SDK's capture would also ship every
        # record of a task to the engine, a gRPC call and an engine write on the run's path.
        disable_log_capture=True,
    )
    return Hatchet(config=config)
