"""Run ``python -m <module>`` under cProfile that is switched on and off by signals.

    python loadtest/profiled.py -m services.risk

``bench_pipeline.py --profile DIR`` starts the fleet through a small shell wrapper that execs
this file, so the services themselves need no profiling hook. The profiler is off at start;
SIGUSR1 turns it on, SIGUSR2 turns it off and dumps the stats to
``$ZVT_BENCH_PROFILE_DIR/<ZVT_SERVICE>-<pid>.pstats`` (so start-up and shutdown are not in
the profile). The service's event loop runs in the main thread, which is where the signal
handlers run, so the profiler sees the loop.

``ZVT_BENCH_LOOP=asyncio`` makes ``uvloop.run`` the stdlib's ``asyncio.run`` for the process
(``bench_pipeline.py --loop asyncio``), to compare the two event loops on the same code.
"""

from __future__ import annotations

import cProfile
import os
import runpy
import signal
import sys
from pathlib import Path
from types import FrameType

_profiler = cProfile.Profile()
_active = False


def _on(_signum: int, _frame: FrameType | None) -> None:
    global _active
    if not _active:
        _profiler.enable()
        _active = True


def _off(_signum: int, _frame: FrameType | None) -> None:
    global _active
    if _active:
        _profiler.disable()
        _active = False
    folder = Path(os.environ.get("ZVT_BENCH_PROFILE_DIR", "."))
    folder.mkdir(parents=True, exist_ok=True)
    _profiler.dump_stats(folder / f"{os.environ.get('ZVT_SERVICE', 'service')}-{os.getpid()}.pstats")


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        print("usage: profiled.py -m MODULE [ARGS...]", file=sys.stderr)
        raise SystemExit(2)
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    sys.path.insert(0, os.getcwd())
    signal.signal(signal.SIGUSR1, _on)
    signal.signal(signal.SIGUSR2, _off)
    if os.environ.get("ZVT_BENCH_LOOP") == "asyncio":  # A/B: the stdlib loop instead of uvloop
        import asyncio

        import uvloop

        uvloop.run = asyncio.run  # type: ignore[assignment]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
