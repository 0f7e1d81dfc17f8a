"""Drop one known, harmless Ray error line from the job's stderr (docs/ray-notes.md section 6).

Ray's core worker logs at error level, once per driver, "Actor with class name: 'MapWorker(...)' ... has
constructor arguments in the object store and max_restarts > 0 ..." (ray-project/ray#53727). Ray Data triggers
it in every run with an actor pool, whatever the UDF's arguments: it hands each pool actor its ``DataContext`` and
its ``MapTransformer`` as ``ray.put`` references. Those stay referenced by the operator and live on the driver's
node, so an actor restart after a worker node's loss finds them (the case of the issue, an argument nobody holds,
cannot occur). The line is written by C++ straight to file descriptor 2, out of reach of Python's logging, so
:class:`StderrFilter` puts a pipe on descriptor 2 and copies everything else through. The line stays in the
driver's log file under Ray's session folder.
"""

from __future__ import annotations

import os
import select
import sys
import threading

RAY_RESTART_WARNING = b"has constructor arguments in the object store and max_restarts > 0"
QUIET_S = 0.2  # a partial line (a progress bar's update) is passed on after this long without more output


class StderrFilter:
    """Copies file descriptor 2 through a pipe, leaving out each line that contains ``marker``."""

    def __init__(self, marker: bytes = RAY_RESTART_WARNING):
        self.marker = marker
        self._target: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> StderrFilter:
        sys.stderr.flush()
        self._target = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(target=self._copy, args=(read_end,), name="maskray-stderr-filter",
                                        daemon=True)
        self._thread.start()
        return self

    @property
    def started(self) -> bool:
        return self._thread is not None

    def stop(self) -> None:
        """Put the real stderr back and pass on what is still in the pipe."""
        sys.stderr.flush()
        os.dup2(self._target, 2)  # closes the pipe's write end: the copier reads to its end and stops
        self._thread.join(timeout=5)
        if not self._thread.is_alive():  # else a child process still holds the pipe: the copier keeps the target
            os.close(self._target)

    def _copy(self, read_end: int) -> None:
        pending = b""
        with open(read_end, "rb", buffering=0) as pipe:
            while True:
                if pending and not select.select([pipe], [], [], QUIET_S)[0]:
                    os.write(self._target, pending)
                    pending = b""
                    continue
                chunk = pipe.read(1 << 16)
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                kept = b"".join(line + b"\n" for line in lines if self.marker not in line)
                if kept:
                    os.write(self._target, kept)
        if pending and self.marker not in pending:
            os.write(self._target, pending)
