"""One writer per run folder: a lease file with its holder and a heartbeat.

    <folder>/.lease.json   {"token", "host", "pid", "user", "since", "heartbeat", "ttl_s"}

Works wherever the run's storage does (a local or network filesystem, an object store): it
needs whole-file writes and reads, nothing else.  A holder rewrites its heartbeat every
``ttl/4`` seconds from a daemon thread; a lease whose heartbeat is older than its ttl, or
whose holder is a process of this host that no longer exists, is dead and may be taken over
(Ray worker restarts, SLURM requeues and a rerun after a crash resume without cleanup).  A
live lease refuses a second writer, at once or after ``wait_s`` (a launcher restarting a
trial on another node waits out the dead holder's ttl).

Two processes that find the folder free at the same moment both write; each then reads the
file back after a pause and only the one whose token stayed keeps the lease.  Clocks across
hosts must agree to well within the ttl (default 60 s, ``MTL_LEASE_TTL_S``).
"""
from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid

from mtl import storage
from mtl.errors import MtlError, StorageError

log = logging.getLogger(__name__)
NAME = ".lease.json"


class LeaseHeld(MtlError):
    pass


def ttl_s() -> float:
    return float(os.environ.get("MTL_LEASE_TTL_S", "60"))


def takeover_wait_s() -> float:
    """How long a launcher's restart of a trial waits for the lease: past the ttl, so a holder
    that died on another node (no release, no heartbeat) is outlived and taken over."""
    return ttl_s() * 1.25 + 5


class Lease:
    def __init__(self, folder: str, purpose: str = "run"):
        self.url = storage.join(folder, NAME)
        self.folder, self.purpose = folder, purpose
        self.token = uuid.uuid4().hex
        self.ttl = ttl_s()
        # A local write is visible at once (atomic rename); an object store's may lag a little.
        self._settle = 0.05 if storage.is_local(folder) else min(1.0, self.ttl / 20)
        self.lost: str | None = None      # why the lease was lost while held, if it was
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquiring -------------------------------------------------------------------------
    def acquire(self, wait_s: float = 0.0) -> "Lease":
        """Take the lease, or raise LeaseHeld naming the holder (after waiting up to ``wait_s``
        for a live holder to release it or die)."""
        deadline = time.monotonic() + wait_s
        while True:
            holder = self.read()
            if holder is None or not self._alive(holder):
                if holder is not None:
                    log.warning("taking over %s from %s (%s)", self.url, describe(holder), self._why_dead(holder))
                self._write(since=time.time())
                time.sleep(self._settle)       # let a racing writer's file land first
                winner = self.read()
                if winner and winner.get("token") == self.token:
                    break
                holder = winner
            if holder is not None and time.monotonic() >= deadline:
                raise LeaseHeld(f"{self.folder} is in use by {describe(holder)}, heartbeat "
                                f"{time.time() - holder.get('heartbeat', 0):.0f} s ago (a second {self.purpose} "
                                f"would mix its files with that one's; its lease expires {self.ttl:.0f} s after "
                                f"its last heartbeat)")
            time.sleep(min(2.0, max(0.1, self.ttl / 10)))
        self._thread = threading.Thread(target=self._beat, name="mtl-lease", daemon=True)
        self._thread.start()
        return self

    def read(self) -> dict | None:
        try:
            return json.loads(storage.read_text(self.url))
        except StorageError:
            return None
        except ValueError:      # a torn or foreign file: nobody holds it
            return {}

    def _alive(self, holder: dict) -> bool:
        if not holder.get("token"):
            return False
        if holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid", -1)):
            return False
        return time.time() - holder.get("heartbeat", 0) < holder.get("ttl_s", self.ttl)

    def _why_dead(self, holder: dict) -> str:
        if holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid", -1)):
            return "its process is gone"
        return f"no heartbeat for {time.time() - holder.get('heartbeat', 0):.0f} s"

    def _write(self, since: float) -> None:
        self.since = since
        storage.write_text(self.url, json.dumps({
            "token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "user": _user(),
            "purpose": self.purpose, "since": since, "heartbeat": time.time(), "ttl_s": self.ttl}))

    # -- holding -----------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                current = self.read()
                if current and current.get("token") != self.token:
                    self.lost = f"{self.folder} was taken over by {describe(current)}"
                    log.error("lease lost: %s", self.lost)
                    return
                self._write(self.since)
            except Exception as exc:  # noqa: BLE001 - a storage hiccup: the next beat retries
                log.warning("lease heartbeat on %s failed: %s", self.url, exc)

    def check(self) -> None:
        """Raise if the lease was lost (another writer took the folder over)."""
        if self.lost:
            raise LeaseHeld(f"lost the lease: {self.lost}; stopping so two writers never mix files")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        try:
            current = self.read()
            if current and current.get("token") == self.token:
                storage.remove(self.url)
        except Exception as exc:  # noqa: BLE001 - the lease expires by itself
            log.warning("could not release %s: %s", self.url, exc)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return (f"{holder.get('purpose', 'run')} of {holder.get('user', '?')} on {holder.get('host', '?')} "
            f"pid {holder.get('pid', '?')} since {since}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # another user's live process
        return True
    return True


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment
        return str(os.getuid())
