"""The single-host backend's primitives: one flock per acquisition, and a waiter's inotify watch.

Job: :class:`_Flock`, an exclusive ``flock`` through its own open file description,
:class:`_Watch`, what a waiter of :mod:`.filelock` sleeps on and how it reads the events, and
the queue's two file formats (a ticket, the arrival counter).

Must not: decide anything (the policy is :mod:`.core` and :mod:`.scheduler`; the lock
directory's records are :mod:`.filelock`); reclaim a lock by its age.

Why fcntl.flock directly instead of the ``filelock`` package: we need exactly "one open file
description per acquisition": exclusive between threads of one process as much as between
processes, never reentrant, dropped by the kernel when the holder dies, and never a soft
(existence-file) lock, which outlives a SIGKILL and is then only reclaimable by age. filelock's
per-thread reentrancy registry and its soft fallback work against each of these. Corollary: a
process that ``fork()``s while holding a lease shares the lock with its child (POSIX semantics),
so spawn, not fork, worker processes while holding boards.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_hilfarm.errors import UsageError
from pytest_hilfarm.reservation.allocate import BoardRequest

from .scheduler import Ask

try:  # Linux only; without it waiters fall back to a short periodic recheck
    import inotify_simple
except ImportError:  # pragma: no cover - every supported Linux has it installed
    inotify_simple = None

_SHARED_HINT = ("everyone sharing a rack needs write access to its lock_dir: give them a common "
                "group, make the directory setgid and use umask 002")
# Recheck period when inotify is not available.
FALLBACK_RECHECK = 0.05
# After a lock closed by a process that died, look once more after this long: the kernel
# reports a dead process's close just before it drops that process's flocks.
AFTER_CLOSE_RECHECK = 0.02
# A waiter not woken after a clean release or leave looks once more after this long: it covers
# a releaser that died between its unlock and its wake-up call, or one of an older version.
HANDOFF_RECHECK = 0.25


# -- the lock primitive -----------------------------------------------------------------------


class _Flock:
    """An exclusive flock through one private open file description (see module docstring).

    ``probe=True`` opens the file read-only: its close wakes nobody, so probing is silent.
    """

    __slots__ = ("path", "fd", "probe", "create")

    def __init__(self, path: Path, *, probe: bool = False, create: bool = True) -> None:
        self.path = path
        self.fd: int | None = None
        self.probe = probe
        self.create = create

    def try_acquire(self) -> bool:
        flags = (os.O_RDONLY if self.probe else os.O_RDWR) | os.O_CLOEXEC
        flags |= os.O_CREAT if self.create else 0
        try:
            fd = os.open(self.path, flags, 0o666)
        except PermissionError as exc:
            raise UsageError(
                f"cannot open lock file: {exc.strerror}",
                where=str(self.path),
                hint=_SHARED_HINT,
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        self.fd = fd
        return True

    def acquire(self, deadline: float) -> bool:
        # Non-blocking tries, so a stopped holder cannot hang us past the deadline; the pause
        # between tries grows, so many waiters do not eat the CPU the holder needs to finish.
        pause = 0.00005
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.0005)
        return True

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            # Unlock before close: the close is what wakes waiters, so the lock must be free
            # by then (and close() alone would not unlock a duplicated descriptor).
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def busy(self) -> bool:
        """Whether someone holds this lock right now (a silent probe)."""
        probe = _Flock(self.path, probe=True)
        if probe.try_acquire():
            probe.release()
            return False
        return True


class _Watch:
    """What a waiter sleeps on: inotify on each board's lock and release marker, the nudge
    file, the queue and its own ticket.

    Files, not the lock directory: owner records are written on every grant and release, and
    a directory watch woke every waiter for each of those writes.

    Wake-ups are targeted: whoever frees boards (a release) or leaves the queue works out, under
    the scheduling lock, which waiters a decision would now serve and touches their tickets
    (:meth:`Reserver._wake_servable`); only those waiters wake up to decide. Events that nobody
    answers that way wake everyone: a board lock closed by a holder that died (its owner record
    is still there), a ticket closed by a waiter that died (the file is still there), a nudge
    (a bench hold ended). A clean release or leave that this waiter was not woken for arms one
    recheck :data:`HANDOFF_RECHECK` later, in case its releaser died before waking anyone (or
    runs an older version that does not wake by ticket).
    """

    def __init__(self, lock_dir: Path, queue_dir: Path, boards: Sequence[str]) -> None:
        self._inotify: Any = None
        self._lock_dir = lock_dir
        self._queue_dir = queue_dir
        self._locks: dict[int, str] = {}  # watch descriptor -> board, for its lock file
        self._markers: dict[int, str] = {}  # ... for its release marker
        self._nudge_wd: int | None = None
        self._after_death = False
        self._ticket_wd: int | None = None
        self._recheck_at: float | None = None  # armed by an event someone else answers
        self._released: set[str] = set()  # boards whose next lock close is a clean release
        if inotify_simple is None:
            return
        flags = inotify_simple.flags
        try:
            self._inotify = inotify_simple.INotify()
        except OSError:  # EMFILE: the per-user limit of inotify instances is reached
            return
        try:
            for board in boards:
                self._locks[self._inotify.add_watch(lock_dir / f"{board}.lock",
                                                    flags.CLOSE_WRITE)] = board
                self._markers[self._inotify.add_watch(lock_dir / f"{board}.released",
                                                      flags.CLOSE_WRITE)] = board
            self._nudge_wd = self._inotify.add_watch(lock_dir / "nudge", flags.CLOSE_WRITE)
            self._inotify.add_watch(queue_dir, flags.CLOSE_WRITE)
        except OSError:  # ENOSPC: the per-user limit of watches is reached
            self.close()

    def reset(self) -> None:
        """Forget a previous wait (its events and its ticket) before this one."""
        self._after_death = False
        self._recheck_at = None
        self._released.clear()
        if self._inotify is not None and self._ticket_wd is not None:
            # Normally gone with the ticket's file already (IN_IGNORED).
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(self._ticket_wd)
        self._ticket_wd = None
        if self._inotify is not None:
            self._inotify.read(timeout=0)  # stale events are about the past

    def watch_ticket(self, path: Path) -> None:
        """Wake when someone touches ``path`` (our ticket): a decision would now serve us."""
        if self._inotify is None:
            return
        try:
            self._ticket_wd = self._inotify.add_watch(path, inotify_simple.flags.ATTRIB)
        except OSError:  # no watch left: wake on every event instead
            self._ticket_wd = None

    def wait(self, seconds: float) -> tuple[bool, bool]:
        """Sleep until an event that can change a decision, or ``seconds``.

        Returns (look closely, tickets closed). Not looking closely: we were woken because a
        decision would serve us. Look closely: the time ran out (something without an event
        may have changed), or something happened that nobody woke us for (a death, a nudge).
        Tickets closed: a waiter died, so the queue's liveness must be checked again.
        """
        if self._inotify is None:
            time.sleep(max(0.0, min(seconds, FALLBACK_RECHECK)))
            return True, True
        if self._after_death:
            # The kernel reports a dead process's close just before it drops its flocks.
            seconds = min(seconds, AFTER_CLOSE_RECHECK)
        deadline = time.monotonic() + max(0.0, seconds)
        while True:
            until = deadline if self._recheck_at is None else min(deadline, self._recheck_at)
            left = until - time.monotonic()
            ready, _, _ = select.select([self._inotify.fileno()], [], [], max(0.0, left))
            if not ready:
                self._after_death = False
                self._recheck_at = None
                return True, True
            woken, look, closed = self._classify(self._inotify.read(timeout=0))
            if woken or look:
                self._recheck_at = None
                return look, closed

    def _classify(self, events: list[Any]) -> tuple[bool, bool, bool]:
        """(woken for us, look closely, tickets closed) from one batch of events."""
        flags = inotify_simple.flags
        woken = look = closed = handed_off = False
        self._after_death = False
        for event in events:
            name, wd = event.name, event.wd
            if wd == self._ticket_wd:
                woken = woken or bool(event.mask & flags.ATTRIB)
            elif wd == self._nudge_wd:
                look = True
            elif wd in self._markers:
                self._released.add(self._markers[wd])
            elif wd in self._locks and event.mask & flags.CLOSE_WRITE:
                board = self._locks[wd]
                if board in self._released or not self._died(board):
                    # A clean release: its releaser wakes whom it serves.
                    self._released.discard(board)
                    handed_off = True
                else:  # a holder that died (or, rarely, a lost race for the lock)
                    look = self._after_death = True
            elif name.endswith(".ticket"):  # the queue directory's watch
                if (self._queue_dir / name).exists():
                    look = closed = True  # closed but still queued: its waiter died
                else:
                    handed_off = True  # a waiter left (an older version, which unlinks first)
        if handed_off and self._recheck_at is None and not (woken or look):
            self._recheck_at = time.monotonic() + HANDOFF_RECHECK
        return woken, look, closed

    def _died(self, board: str) -> bool:
        owner = self._lock_dir / (board + ".owner.json")
        try:
            return os.stat(owner).st_size > 0
        except FileNotFoundError:
            return False

    def close(self) -> None:
        if self._inotify is not None:
            inotify, self._inotify = self._inotify, None
            inotify.close()


# -- the queue's files ---------------------------------------------------------------------------


def parse_ticket(path: Path) -> Ask | None:
    """A waiting request from its ticket file, or None if it cannot be read (yet)."""
    try:
        data = json.loads(path.read_text())
        hold = data.get("hold")
        return Ask(int(data["seq"]), BoardRequest.from_json(data), frozenset(data["boards"]),
                   int(data.get("priority", 0)), float(data.get("since", 0.0)),
                   None if hold is None else float(hold), str(data["owner"]))
    except (OSError, ValueError, KeyError, TypeError, UsageError):
        return None  # being written, or by a waiter of another version; skip this round


def write_counter(counter: Path, seq: int) -> None:
    """Overwrite the arrival counter in place, at a fixed width, in one write.

    Not truncated and rewritten: ext4 starts writing back a file truncated to zero when it
    is closed (about 5 ms here, under the scheduling lock, on every queued request). The
    fixed width overwrites any shorter number an older version left; one ``pwrite`` of 20
    bytes is never seen half-done by a reader.
    """
    fd = os.open(counter, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        os.pwrite(fd, f"{seq:020d}".encode(), 0)
    finally:
        os.close(fd)
