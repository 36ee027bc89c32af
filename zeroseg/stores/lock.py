"""One writer per store: a lock file inside the store, with its owner and a heartbeat.

`STORE/zeroseg.lock` is created exclusively (fsspec mode "xb": O_EXCL on a local disk, the
equivalent on an object store that supports it) and holds JSON: host, pid, started, heartbeat,
token. A thread rewrites the heartbeat every `heartbeat_s` while the job runs, atomically (a
temporary file renamed over the lock), so a reader sees the old heartbeat or the new one, never
half a file. A lock is stale, and is taken over with a printed notice, when its heartbeat is older
than `stale_s` or when its owner ran on this host and that pid is gone (a SIGKILLed driver).

An unreadable lock (not JSON: cut short by a full disk or a crash) names no owner and no
heartbeat, so its age is the file's own modification time. Only one live moment shows a lock
unreadable: between the exclusive create and the write of its few bytes (heartbeats are renamed
into place, and a live owner that finds its lock unreadable stops beating). So an unreadable lock
older than UNREADABLE_GRACE_S is damaged and is taken over; a younger one is refused.
A live lock refuses the second writer with a one-line error naming the owner.

Takeover is check-then-delete-then-create: two takers racing over the same stale lock can both
believe they won only if both read it before either created a new one; the exclusive create
makes that window as small as one round trip. Good enough for a human re-running a command.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import fsspec

from zeroseg.errors import UserError

LOCK_NAME = "zeroseg.lock"
UNREADABLE_GRACE_S = 10.0  # far longer than an exclusive create takes to write ~150 bytes


class LockedError(UserError):
    """Another job holds the store."""


def _fs_path(url: str):
    """(filesystem, path) for a plain path, file:// or any fsspec URL."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") + "/" + LOCK_NAME


def lock_holder(url: str) -> dict | None:
    """The lock's content (see StoreLock.read) without taking it: workers check before each
    write that their job still holds the store."""
    return StoreLock(url).read()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


@dataclass
class StoreLock:
    """Use as a context manager, or acquire() / release()."""

    url: str
    heartbeat_s: float = 10.0
    stale_s: float = 60.0
    notify: Callable[[str], None] = print

    def __post_init__(self):
        self.fs, self.path = _fs_path(self.url)
        self.token = uuid.uuid4().hex
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "token": self.token}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> StoreLock:
        if not self._create():
            held = self.read()
            reason = self._stale_reason(held)
            if reason is None:
                raise LockedError(f"{self.url} is being written by {_describe(held)}; wait for it or stop it")
            self.notify(f"taking over a stale lock on {self.url}: {_describe(held)}, {reason}")
            if self.read() == held:  # unchanged since we judged it
                self.fs.rm(self.path)
            if not self._create():
                raise LockedError(f"{self.url} is being written by {_describe(self.read())}; wait for it or stop it")
        self._thread = threading.Thread(target=self._beat, name="zeroseg-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        held = self.read()
        if held is not None and held.get("token") == self.token:
            self.fs.rm(self.path)

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def read(self) -> dict | None:
        """The lock's content; None when there is no lock; {} when it cannot be parsed."""
        try:
            with self.fs.open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return {}

    # ---- internals ---------------------------------------------------------------------

    def _create(self) -> bool:
        """Exclusive create; False when a lock is already there."""
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(self._content())
            return True
        except FileExistsError:
            return False

    def _content(self) -> bytes:
        return json.dumps({**self.owner, "heartbeat": time.time()}).encode()

    def _stale_reason(self, held: dict | None) -> str | None:
        if held is None:
            return "released meanwhile"
        if not held:  # unreadable: being created this instant, or damaged (module docstring)
            age = self._file_age()
            return f"unreadable {LOCK_NAME}, unchanged for {age:.0f} s" if age > UNREADABLE_GRACE_S else None
        age = time.time() - held.get("heartbeat", 0)
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s"
        if held.get("host") == self.owner["host"] and not _pid_alive(int(held.get("pid", -1))):
            return f"pid {held.get('pid')} is no longer running"
        return None

    def _file_age(self) -> float:
        try:
            return time.time() - self.fs.modified(self.path).timestamp()
        except (FileNotFoundError, NotImplementedError):
            return 0.0

    def _beat(self) -> None:
        tmp = f"{self.path}.{self.token}.tmp"
        while not self._stop.wait(self.heartbeat_s):
            if (self.read() or {}).get("token") != self.token:
                return  # taken over by someone who judged us stale: don't fight over it
            with self.fs.open(tmp, "wb") as f:
                f.write(self._content())
            self.fs.mv(tmp, self.path)  # a rename: readers never see a half-written lock


def _describe(held: dict | None) -> str:
    if not held:
        return f"an unknown job (unreadable {LOCK_NAME}; delete it if no job is running)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("started", 0)))
    return f"pid {held.get('pid')} on {held.get('host')} (started {started})"
