"""``RunLease``: one run at a time per ``--out``, on local disk and on object stores.

The lease is the object ``_lock.json`` under ``--out``: the owner (host, pid, a random token), when it
started and a heartbeat timestamp that a daemon thread rewrites every ``stale_seconds / 4``. A second run
finds a fresh heartbeat and is refused, naming the owner; a heartbeat older than ``stale_seconds`` (its
owner was killed), or a lease of a process of this host that no longer exists, is taken over; ``--force``
takes over a fresh one.

Object stores (and their stand-ins) offer no create-if-absent everywhere, so taking the lease is
write, wait ``SETTLE_SECONDS``, read back: of two runs that both found no live lease, the one that wrote last
keeps it and the other is refused when its read-back shows the other token. The race window left: a run whose
check and write are more than ``SETTLE_SECONDS`` apart (a stalled request) can miss a write made between them.
The heartbeat re-reads the lease each time, and the run checks it before ``finalize`` deletes anything
(``check``), so a run that lost its lease stops before it can remove another run's files.
Heartbeats compare wall clocks of different hosts: keep ``stale_seconds`` well above their skew.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from pipeline.storage import OutFileError, Storage

LOCK = "_lock.json"
SETTLE_SECONDS = 1.0


class OutBusy(ValueError):
    """Another live run holds ``--out``'s lease."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over (``--force`` or a stale heartbeat) while it ran."""


class RunLease:
    """The lease on ``storage``'s ``--out``; use as a context manager around everything that writes there."""

    def __init__(self, storage: Storage, stale_seconds: float = 120.0, force: bool = False,
                 log: Callable[[str], None] = print):
        self.storage, self.stale_seconds, self.force, self.log = storage, stale_seconds, force, log
        self.path = storage.path(LOCK)
        self.token = uuid.uuid4().hex
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                      "started_at": _iso(time.time())}
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lease, or raise ``OutBusy`` naming the live owner and how to proceed."""
        held = self._read()
        if held is not None and not self.force:
            age = time.time() - held.get("heartbeat", 0)
            if age < self.stale_seconds and not _dead_here(held):
                raise self._busy(held, age)
            why = "its process is gone" if _dead_here(held) else f"no heartbeat for {age:.0f} s"
            self.log(f"maskray generate: taking over the stale lock {self.storage.url(LOCK)} of "
                     f"{_describe(held)} ({why})")
        elif held is not None:
            self.log(f"maskray generate: --force: taking over the lock {self.storage.url(LOCK)} of {_describe(held)}")
        self._write()
        time.sleep(SETTLE_SECONDS)
        held = self._read()
        if held is None or held.get("token") != self.token:
            raise self._busy(held or {}, 0.0)
        self._thread = threading.Thread(target=self._beat, name="maskray-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise ``LeaseLost`` if another run took the lease over (read now, not from the last heartbeat)."""
        held = self._read()
        if held is None or held.get("token") != self.token:
            self.lost = f"now held by {_describe(held)}" if held else "removed"
        if self.lost:
            raise LeaseLost(f"the lock {self.storage.url(LOCK)} of this run was taken over ({self.lost}); this run "
                            f"stops before finalizing so that it cannot delete the other run's files")

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self._read()
        if held is not None and held.get("token") == self.token:
            self.storage.remove(self.path)

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_seconds / 4):
            try:
                held = self._read()
                if held is None or held.get("token") != self.token:
                    self.lost = f"now held by {_describe(held)}" if held else "removed"
                    self.log(f"maskray generate: warning: the lock {self.storage.url(LOCK)} was taken over "
                             f"({self.lost}); this run will not finalize")
                    return
                self._write()
            except OSError as error:  # a transient storage error: the next beat retries
                self.log(f"maskray generate: warning: lock heartbeat failed ({type(error).__name__}: {error})")

    def _busy(self, held: dict, age: float) -> OutBusy:
        return OutBusy(f"--out {self.storage.uri} is in use by {_describe(held)} (lock {self.storage.url(LOCK)}, "
                       f"last heartbeat {age:.0f} s ago); wait for that run to end, or if it is gone rerun with "
                       f"--force (a lock without heartbeat for --lock-stale-seconds {self.stale_seconds:g} is taken "
                       f"over by itself)")

    def _read(self) -> dict | None:
        """The lease on storage, None when there is none (or it is torn JSON, which the next write replaces).

        Raises:
            OutFileError: ``_lock.json`` is a folder, or JSON that is not a lease (a list, a string, a heartbeat
                that is not a number).
        """
        try:
            held = json.loads(self.storage.read(self.path))
        except FileNotFoundError:
            return None
        except (IsADirectoryError, PermissionError) as error:
            raise OutFileError(f"the lock {self.storage.url(LOCK)} cannot be read ({type(error).__name__}: it is a "
                               f"folder or not readable); delete it") from None
        except ValueError:  # a torn or foreign file: treat as no lease, the write below replaces it
            return None
        if not isinstance(held, dict):
            problem = f"a JSON {type(held).__name__}, not a maskray lease"
        elif not isinstance(held.get("heartbeat", 0), (int, float)) or isinstance(held.get("heartbeat"), bool):
            problem = f"a lease whose heartbeat is a {type(held['heartbeat']).__name__}, not a time in seconds"
        else:
            return held
        if self.force:  # --force replaces whatever the file holds
            return {}
        raise OutFileError(f"the lock {self.storage.url(LOCK)} is {problem}; delete it, or rerun with --force to "
                           f"replace it")

    def _write(self) -> None:
        now = time.time()
        lease = {**self.owner, "heartbeat": now, "heartbeat_at": _iso(now)}
        self.storage.write_atomic(self.path, json.dumps(lease, indent=2).encode())


def _dead_here(held: dict) -> bool:
    """The lease's owner ran on this host and its process is gone (killed): no need to wait for staleness."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _describe(held: dict | None) -> str:
    if not held:
        return "another run"
    return f"pid {held.get('pid')} on host {held.get('host')} (started {held.get('started_at')})"


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")
