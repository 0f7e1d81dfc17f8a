"""Ray start-up for the commands that run on Ray Data (``generate``, ``evaluate``).

The job starts Ray, never the builders. ``RAY_ADDRESS`` when set joins an existing cluster; otherwise a
local Ray starts on this machine, on loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` before ``import
ray``) and without its dashboard. Connecting is deferred to the callback the context yields, so a bad
input file fails in a second, before Ray starts. Once connected, stderr leaves out Ray's harmless error line about
actor restarts that every Ray Data actor pool triggers (``jobs.stderr_filter``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from jobs.stderr_filter import StderrFilter


@contextlib.contextmanager
def ray_session() -> Iterator[Callable[[], None]]:
    """Yield ``connect()`` (``ray.init`` as above); Ray is shut down on exit, if it was started."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    address = os.environ.get("RAY_ADDRESS") or "local"

    quiet = StderrFilter()

    def connect() -> None:
        ray.init(address=address, **({"include_dashboard": False} if address == "local" else {}))
        quiet.start()  # after ray.init: the local Ray's processes keep the real stderr

    try:
        yield connect
    finally:
        try:
            ray.shutdown()
        finally:
            if quiet.started:
                quiet.stop()
