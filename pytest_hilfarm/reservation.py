"""Exclusive, fair board reservation on one host: one flock per board plus owner records.

Job: hand out leases on distinct boards, exclusively across threads, processes (xdist workers) and
separate CI jobs sharing a lock directory; all-or-nothing for multi-board requests; no deadlock;
no starvation (a 3-board request behind a stream of 1-board requests is served in arrival order
among the requests that compete for the same boards). A holder killed with SIGKILL frees its boards
at once because the kernel drops its flocks; the next reserver finds its owner record, marks the
board UNKNOWN in the store and reports it on :attr:`Lease.needs_check`.

Must not: reclaim any lock by its age (only the kernel frees a lock, when its holder dies); block
on one board while holding another (boards are only ever taken non-blocking, all at once, under a
short global scheduling lock); talk to hardware; import pytest.

Lock directory layout (one host, a local filesystem: flock is not reliable over NFS)::

    <board>.lock          flock held for the whole lease (never deleted, so every process
                          locks the same inode)
    <board>.owner.json    who holds it: pid, host, user, test id, CI job, since, lease id;
                          emptied on a clean release, so a non-empty record on a board whose
                          lock is free was left by a holder that died
    queue.lock            global scheduling lock: held for one short decision, never while waiting
    queue.counter         arrival sequence numbers
    queue/<seq>.ticket    a waiting request; its waiter holds a flock on it, so a dead waiter's
                          ticket is recognisably dead (its lock is free)
    queue/<seq>.wake      a FIFO the waiter sleeps on (select); every release writes a byte to
                          each, so waiters wake within microseconds instead of polling
    generation            one byte appended per release, checked by a waiter between its
                          decision and its sleep so that no release is missed

Why fcntl.flock directly instead of the ``filelock`` package: we need exactly "one open file
description per acquisition": exclusive between threads of one process as much as between
processes, never reentrant, dropped by the kernel when the holder dies, and never a soft
(existence-file) lock, which outlives a SIGKILL and is then only reclaimable by age. filelock's
per-thread reentrancy registry and its soft fallback work against each of these. Corollary: a
process that ``fork()``s while holding a lease shares the lock with its child (POSIX semantics),
so spawn, not fork, worker processes while holding boards.

The :class:`ReservationBackend` protocol is the seam for the PostgreSQL backend (issue 8).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import json
import os
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Protocol

from .allocate import (
    BoardDescription,
    BoardInfo,
    BoardRequest,
    can_ever_satisfy,
    choose,
    natural_sorted,
)
from .errors import InfrastructureError, ReservationTimeout, UsageError
from .store import (
    OUTCOMES_NEEDING_CHECK,
    BoardHealth,
    BoardState,
    FarmStoreProtocol,
    HoldRecord,
    LeaseOutcome,
    board_outcomes,
    check_due_reason,
    outcome_of,
    overall_outcome,
)

# CI systems and the variable that names the running job, checked in this order.
CI_JOB_VARIABLES = (
    "GITHUB_RUN_ID",  # GitHub Actions
    "CI_JOB_ID",  # GitLab CI
    "BUILD_TAG",  # Jenkins: "jenkins-<job>-<number>"
    "BUILDKITE_JOB_ID",
    "CIRCLE_WORKFLOW_JOB_ID",
    "TRAVIS_JOB_ID",
    "SYSTEM_JOBID",  # Azure Pipelines
    "DRONE_BUILD_NUMBER",
    "TEAMCITY_BUILD_ID",
)
# When a release wakes every waiter, the k-th in line waits k steps before it competes for the
# scheduling lock, so the head of the queue (the one that usually wins) is not stuck behind
# the others' futile decisions.
STAGGER_STEP = 0.0005
# Full re-evaluation period even without a release: catches a SIGKILL'd holder (the kernel frees
# its lock but nobody appends to `generation`), unholds and restores done from another host.
RECHECK_INTERVAL = 0.05
# The generation file grows one byte per release; it is truncated past this size.
_GENERATION_LIMIT = 1 << 16


def _utc_iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")


# -- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """Who asks for boards: enough for a person to find the process and the CI job."""

    pid: int
    host: str
    user: str
    test_id: str = ""
    ci_job: str = ""  # "GITHUB_RUN_ID=123"; empty outside CI
    worker: str = ""  # pytest-xdist worker id ("gw0"), if any
    reason: str = ""

    @classmethod
    def current(
        cls, test_id: str = "", reason: str = "", environ: Mapping[str, str] | None = None
    ) -> Owner:
        env = os.environ if environ is None else environ
        ci_job = next((f"{v}={env[v]}" for v in CI_JOB_VARIABLES if env.get(v)), "")
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry in some containers
            user = str(os.getuid())
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            user=user,
            test_id=test_id,
            ci_job=ci_job,
            worker=env.get("PYTEST_XDIST_WORKER", ""),
            reason=reason,
        )

    def to_dict(self) -> dict[str, str | int]:
        # By hand rather than dataclasses.asdict: it deep-copies, and this is on the hot path.
        return {"pid": self.pid, "host": self.host, "user": self.user, "test_id": self.test_id,
                "ci_job": self.ci_job, "worker": self.worker, "reason": self.reason}

    def describe(self) -> str:
        text = f"pid {self.pid} on {self.host} (user {self.user}"
        if self.test_id:
            text += f", test {self.test_id}"
        if self.worker:
            text += f", xdist {self.worker}"
        if self.ci_job:
            text += f", CI job {self.ci_job}"
        if self.reason:
            text += f", reason: {self.reason}"
        return text + ")"


@dataclass(frozen=True)
class OwnerRecord:
    """The content of ``<board>.owner.json``: who holds the board, since when, under which lease."""

    board: str
    lease_id: str
    since: str  # ISO 8601, UTC
    owner: Owner

    def to_json(self) -> str:
        return json.dumps(
            {"board": self.board, "lease_id": self.lease_id, "since": self.since,
             **self.owner.to_dict()},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> OwnerRecord:
        data = json.loads(text)
        fields = Owner.__dataclass_fields__
        owner = Owner(**{k: v for k, v in data.items() if k in fields})
        return cls(str(data["board"]), str(data["lease_id"]), str(data["since"]), owner)


@dataclass(frozen=True)
class BoardStatus:
    """One board as ``hilfarm status`` shows it."""

    board: str
    chip: str
    health: BoardState
    holder: OwnerRecord | None  # a live lease
    hold: HoldRecord | None  # a person at the bench
    stale_owner: OwnerRecord | None  # a dead holder's record, not yet cleaned up


@dataclass(frozen=True)
class HoldResult:
    hold: HoldRecord
    in_use_by: OwnerRecord | None  # a lease still running; the board is free when it ends


class LeaseProtocol(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def boards(self) -> tuple[str, ...]: ...
    @property
    def needs_check(self) -> frozenset[str]: ...
    @property
    def released(self) -> bool: ...
    def release(
        self,
        outcomes: Mapping[str, str | LeaseOutcome] | None = None,
        *,
        default: str | LeaseOutcome = LeaseOutcome.OK,
        note: str = "",
    ) -> None: ...
    def __enter__(self) -> LeaseProtocol: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class ReservationBackend(Protocol):
    """Exclusive, fair reservation of boards. Files + flock today; PostgreSQL later (issue 8)."""

    def reserve(
        self,
        request: BoardRequest,
        owner: Owner | None = None,
        timeout: float = 300.0,
        *,
        as_person: str | None = None,
    ) -> LeaseProtocol: ...
    def hold(self, board: str, reason: str, person: str) -> HoldResult: ...
    def unhold(self, board: str) -> HoldRecord | None: ...
    def status(self) -> list[BoardStatus]: ...


# -- the lock primitive -----------------------------------------------------------------------


class _Flock:
    """An exclusive flock through one private open file description (see module docstring)."""

    __slots__ = ("path", "fd")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except PermissionError as exc:
            raise UsageError(
                f"cannot open lock file: {exc.strerror}",
                where=str(self.path),
                hint="everyone sharing a rack needs write access to its lock_dir: give them a "
                "common group, make the directory setgid and use umask 002",
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
        # Non-blocking tries with tiny sleeps, so a stopped holder cannot hang us past deadline.
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.00005)  # held for well under a millisecond: check often
        return True

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            # close() alone drops the flock; unlock first anyway in case the fd was duplicated.
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


@dataclass(frozen=True)
class _Ticket:
    seq: int
    path: Path
    request: BoardRequest
    boards: frozenset[str]  # the waiter's candidate boards (its rack's ids)
    owner: str  # Owner.describe(), for timeout messages


@dataclass(frozen=True)
class _Grant:
    """What one successful scheduling decision hands to reserve()."""

    lease_id: str
    locks: dict[str, _Flock]
    needs_check: frozenset[str]
    stale: dict[str, OwnerRecord]  # dead holders' records found on the granted boards


@dataclass
class _WaitState:
    """One reserve() call's mutable bookkeeping (local to that call, never shared)."""

    ticket: _Ticket | None = None
    ticket_lock: _Flock | None = None
    wake_fd: int | None = None  # read end of the ticket's FIFO
    older: int = 0  # live older competing tickets seen at the last attempt


# -- the lease ----------------------------------------------------------------------------------


class Lease:
    """Exclusive use of ``boards`` until :meth:`release` (idempotent; also a context manager).

    ``needs_check`` names boards that must pass a health check before a test uses them: boards
    not GOOD in the store, and boards whose previous holder died without releasing.
    """

    def __init__(
        self,
        reserver: Reserver,
        lease_id: str,
        boards: tuple[str, ...],
        needs_check: frozenset[str],
        owner: Owner,
        request: BoardRequest,
        granted_at: float,
        waited: float,
        locks: Mapping[str, _Flock],
    ) -> None:
        self._reserver = reserver
        self._id = lease_id
        self._boards = boards
        self._needs_check = needs_check
        self.owner = owner
        self.request = request
        self.granted_at = granted_at  # epoch seconds
        self.waited = waited  # seconds between reserve() and the grant
        self._locks = dict(locks)
        self._mutex = threading.Lock()
        self._released = False

    @property
    def id(self) -> str:
        return self._id

    @property
    def boards(self) -> tuple[str, ...]:
        return self._boards

    @property
    def needs_check(self) -> frozenset[str]:
        return self._needs_check

    @property
    def released(self) -> bool:
        return self._released

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"Lease({self._id[:8]}, boards={list(self._boards)}, {state})"

    def release(
        self,
        outcomes: Mapping[str, str | LeaseOutcome] | None = None,
        *,
        default: str | LeaseOutcome = LeaseOutcome.OK,
        note: str = "",
    ) -> None:
        """Record history and health changes, then unlock. Calling it again does nothing.

        ``outcomes`` maps board ids to ``"ok"``, ``"failed"``, ``"infra_error"``, ...; boards
        not named get ``default``. ``infra_error``, ``aborted`` and ``broken_app`` mark the board
        UNKNOWN ("health check due"), with ``note`` (e.g. the signal that interrupted the holder)
        in the reason ``hilfarm status`` shows.
        """
        where = f"release of lease {self._id[:8]} ({', '.join(self._boards)})"
        per_board = board_outcomes(self._boards, outcomes, default, where=where)
        with self._mutex:
            if self._released:
                return
            self._released = True
            self._reserver._finish(self, per_board, self._locks, note)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release(default=outcome_of(exc))


# -- the reserver -------------------------------------------------------------------------------



class Reserver:
    """File-based reservation backend (the single-host default).

    ``boards`` are the rack's boards (anything with ``id``, ``chip`` and ``features``); health
    and manual holds come from ``store``. Every process on the host that shares ``lock_dir``
    (and the store) shares the boards, fairly.
    """

    def __init__(
        self,
        boards: Sequence[BoardDescription],
        lock_dir: str | os.PathLike[str],
        store: FarmStoreProtocol,
        *,
        stagger_step: float = STAGGER_STEP,
        recheck_interval: float = RECHECK_INTERVAL,
        max_failures: int | None = None,
    ) -> None:
        seen: set[str] = set()
        for board in boards:
            bid = board.id
            if not bid or bid in {".", ".."} or "/" in bid or "\0" in bid or bid.startswith("."):
                raise UsageError(
                    f"board id {bid!r} cannot name a lock file",
                    where="rack boards",
                    hint="use ids made of letters, digits, '-', '_' and '.'",
                )
            if bid in seen:
                raise UsageError(
                    f"board id {bid!r} appears twice", where="rack boards",
                    hint="give every board a unique id",
                )
            seen.add(bid)
        self._boards = {b.id: BoardInfo.of(b) for b in boards}
        self._order = natural_sorted(self._boards)
        self.lock_dir = Path(lock_dir)
        self._lock_paths: dict[str, Path] = {}
        self.store = store
        self.stagger_step = stagger_step
        self.recheck_interval = recheck_interval
        self.max_failures = (
            max_failures if max_failures is not None else getattr(store, "quarantine_after", 3)
        )
        self._queue_dir = self.lock_dir / "queue"
        try:
            self._queue_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"cannot create the lock directory: {exc}",
                where=str(self.lock_dir),
                hint="set the rack's lock_dir to a writable directory on a local filesystem",
            ) from exc
        self._generation_path = self.lock_dir / "generation"

    # -- paths and small file helpers ---------------------------------------------------------

    def _lock_path(self, board: str) -> Path:
        # Built once per board: every attempt probes every lock under the scheduling lock.
        path = self._lock_paths.get(board)
        if path is None:
            path = self._lock_paths[board] = self.lock_dir / f"{board}.lock"
        return path

    def _owner_path(self, board: str) -> Path:
        return self.lock_dir / f"{board}.owner.json"

    def _read_owner(self, board: str) -> OwnerRecord | None:
        """The board's owner record, or None if it is empty (nobody has it, or left cleanly)."""
        try:
            text = self._owner_path(board).read_text()
        except FileNotFoundError:
            return None
        if not text:
            return None
        try:
            return OwnerRecord.from_json(text)
        except (ValueError, KeyError, TypeError):
            # A torn or foreign file: treat as "someone held it and did not clean up".
            return OwnerRecord(board, "", "", Owner(0, "?", "?", reason="unreadable owner record"))

    def _write_owner(self, record: OwnerRecord) -> None:
        # Rewritten in place, not via a temporary file and rename: creating an inode per grant
        # cost more than the rest of a reservation on ext4. Only the lock holder writes this
        # file, and a reader that catches it mid-write gets unparsable text, which it reports
        # as such (see _read_owner).
        data = record.to_json().encode()
        fd = os.open(self._owner_path(record.board), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,
                     0o666)
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)

    def _clear_owner(self, board: str) -> None:
        # Emptied, not deleted: an empty record means "released cleanly".
        with contextlib.suppress(FileNotFoundError):
            os.truncate(self._owner_path(board), 0)

    def _generation(self) -> tuple[int, int]:
        try:
            st = os.stat(self._generation_path)
        except FileNotFoundError:
            return (0, 0)
        return (st.st_ino, st.st_size)

    def _bump_generation(self) -> None:
        """Tell waiters that boards (or queue places) were freed: generation, then FIFOs."""
        # O_APPEND writes are atomic, so concurrent releasers need no lock to signal.
        fd = os.open(self._generation_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, b".")
            if os.fstat(fd).st_size > _GENERATION_LIMIT:
                # Waiters compare sizes for inequality, so shrinking is a wake-up like any other.
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        try:
            names = os.listdir(self._queue_dir)
        except FileNotFoundError:
            return
        for name in names:
            if name.endswith(".wake"):
                try:
                    # Non-blocking: ENXIO if its waiter is gone, EAGAIN if a wake is pending.
                    fifo = os.open(self._queue_dir / name, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:
                    continue
                try:
                    os.write(fifo, b"!")
                except OSError:
                    pass
                finally:
                    os.close(fifo)

    @contextlib.contextmanager
    def _scheduling_lock(self, deadline: float | None = None) -> Iterator[None]:
        lock = _Flock(self.lock_dir / "queue.lock")
        limit = time.monotonic() + 30.0 if deadline is None else max(deadline, time.monotonic())
        if not lock.acquire(limit + 0.5):
            raise ReservationTimeout(
                "the reservation scheduling lock stayed busy",
                where=str(self.lock_dir / "queue.lock"),
                hint="a process holding it may be stopped (SIGSTOP/debugger); "
                "find it with `fuser -v` on that file",
            )
        try:
            yield
        finally:
            lock.release()

    # -- the wait queue -------------------------------------------------------------------------

    def _live_tickets(self) -> list[_Ticket]:
        """Waiting requests in arrival order; dead waiters' tickets are removed. Needs the lock."""
        tickets: list[_Ticket] = []
        for name in os.listdir(self._queue_dir):
            if not name.endswith(".ticket"):
                continue
            path = self._queue_dir / name
            probe = _Flock(path)
            try:
                dead = probe.try_acquire()
            except FileNotFoundError:
                continue
            if dead:
                # Its waiter died (the kernel dropped its lock): forget the ticket.
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                with contextlib.suppress(FileNotFoundError):
                    path.with_suffix(".wake").unlink()
                probe.release()
                continue
            try:
                data = json.loads(path.read_text())
                request = BoardRequest.from_json(data)
                tickets.append(
                    _Ticket(int(data["seq"]), path, request, frozenset(data["boards"]),
                            str(data["owner"]))
                )
            except (OSError, ValueError, KeyError, TypeError, UsageError):
                continue  # being written by a waiter of another version; skip this round
        tickets.sort(key=lambda t: t.seq)
        return tickets

    def _waiting_count(self) -> int:
        try:
            return sum(name.endswith(".ticket") for name in os.listdir(self._queue_dir))
        except FileNotFoundError:
            return 0

    def _new_ticket(self, request: BoardRequest, owner: Owner, state: _WaitState) -> None:
        """Append a ticket to the queue. Needs the scheduling lock (it orders arrivals)."""
        counter = self.lock_dir / "queue.counter"
        try:
            last = int(counter.read_text() or "0")
        except (FileNotFoundError, ValueError):
            last = 0  # missing, or torn by a writer killed mid-write
        # Never below a live ticket, even if the counter file was lost: arrival order must hold.
        queued = [int(n.split(".")[0]) for n in os.listdir(self._queue_dir)
                  if n.endswith(".ticket") and n.split(".")[0].isdigit()]
        seq = max([last, *queued]) + 1
        counter.write_text(str(seq))
        path = self._queue_dir / f"{seq:016d}.ticket"
        lock = _Flock(path)
        if not lock.try_acquire():  # pragma: no cover - seq is above every ticket seen
            raise InfrastructureError(
                f"queue ticket {path.name} is locked by another waiter",
                where=str(self._queue_dir),
                hint="another program writes to this lock directory; give the rack its own",
            )
        path.write_text(
            json.dumps(
                {"seq": seq, **request.to_json(), "boards": self._order,
                 "owner": owner.describe()}
            )
        )
        state.ticket = _Ticket(seq, path, request, frozenset(self._order), owner.describe())
        state.ticket_lock = lock
        wake = path.with_suffix(".wake")
        with contextlib.suppress(FileExistsError):
            os.mkfifo(wake, 0o666)
        # O_RDWR: the FIFO always has a writer (us), so select() never reports a false EOF.
        state.wake_fd = os.open(wake, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    @staticmethod
    def _drop_ticket(state: _WaitState) -> None:
        if state.ticket is not None:
            with contextlib.suppress(FileNotFoundError):
                state.ticket.path.with_suffix(".wake").unlink()
            with contextlib.suppress(FileNotFoundError):
                state.ticket.path.unlink()
        if state.wake_fd is not None:
            os.close(state.wake_fd)
        if state.ticket_lock is not None:
            state.ticket_lock.release()
        state.ticket = None
        state.ticket_lock = None
        state.wake_fd = None

    # -- one scheduling decision ----------------------------------------------------------------

    def _infos(self) -> tuple[dict[str, BoardInfo], dict[str, HoldRecord]]:
        health = self.store.all_health(self._order)
        infos = {
            b: BoardInfo(i.id, i.chip, i.features, health[b].health, health[b].failures)
            for b, i in self._boards.items()
        }
        return infos, self.store.holds()

    def _attempt(
        self,
        request: BoardRequest,
        owner: Owner,
        state: _WaitState,
        deadline: float,
        as_person: str | None = None,
    ) -> _Grant | None:
        """One decision under the scheduling lock: take the boards if fairness allows them.

        Replays the queue in arrival order over the boards free right now: each older live
        ticket either takes what it would get, or, if it must wait, keeps every free board it
        could use. This request gets a choice from what is left, or None (and a ticket).
        """
        with self._scheduling_lock(deadline):
            infos, holds = self._infos()
            # Boards a request could get if every lease ended now: not held, not quarantined.
            universe = {b: i for b, i in infos.items() if b not in holds}
            if choose(infos.values(), request, max_failures=self.max_failures) is None:
                # Even with every lease and hold ended, quarantined (or too often BAD) boards
                # leave too few: only a person can change that, so waiting would hide it.
                self._drop_ticket(state)
                raise InfrastructureError(
                    f"cannot reserve {request.describe()}: too few usable boards",
                    where=f"lock dir {self.lock_dir}",
                    hint=self._health_hint(infos, request),
                )
            probes: dict[str, _Flock] = {}
            try:
                for board in self._order:
                    probe = _Flock(self._lock_path(board))
                    if probe.try_acquire():
                        probes[board] = probe
                pool = {b for b in probes if b not in holds}
                mine_held = {b for b in probes if b in holds and holds[b].person == as_person}
                older = 0
                for ticket in self._live_tickets():
                    if state.ticket is not None and ticket.seq >= state.ticket.seq:
                        break
                    mine = [universe[b] for b in ticket.boards if b in universe]
                    if choose(mine, ticket.request, max_failures=self.max_failures) is None:
                        continue  # it waits on a person (a hold): it must not block others
                    competes = any(ticket.request.matches(i) for i in mine if request.matches(i))
                    older += competes
                    got = choose(
                        [infos[b] for b in pool if b in ticket.boards],
                        ticket.request,
                        max_failures=self.max_failures,
                    )
                    if got is not None:
                        pool -= set(got.boards)  # it will take these at its next attempt
                    else:
                        # It waits: every free board it could use is kept for it, so a stream
                        # of younger, smaller requests cannot overtake it forever.
                        pool -= {b for b in pool if b in ticket.boards
                                 and ticket.request.matches(infos[b])}
                state.older = older
                choice = choose(
                    [infos[b] for b in pool | mine_held], request, max_failures=self.max_failures
                )
                if choice is None:
                    if state.ticket is None:
                        self._new_ticket(request, owner, state)
                    return None
                stale = {b: r for b in choice.boards if (r := self._read_owner(b)) is not None}
                lease_id = uuid.uuid4().hex
                since = _utc_iso(time.time())
                for board in choice.boards:
                    self._write_owner(OwnerRecord(board, lease_id, since, owner))
                # Only now: if writing a record failed, `finally` unlocks these boards too.
                kept = {b: probes.pop(b) for b in choice.boards}
                if state.ticket is not None:
                    self._drop_ticket(state)
                    self._bump_generation()  # a younger request may now be first in line
                return _Grant(lease_id, kept, choice.needs_check, stale)
            finally:
                for probe in probes.values():
                    probe.release()

    def _health_hint(self, infos: Mapping[str, BoardInfo], request: BoardRequest) -> str:
        lines = [
            f"{b}: {i.health.value}" for b, i in infos.items()
            if request.matches(i) and i.health in (BoardHealth.QUARANTINED, BoardHealth.BAD)
        ]
        return (
            "boards out of service: " + "; ".join(lines)
            + "; a person restores one with `hilfarm board restore BOARD`"
        )

    # -- public API -------------------------------------------------------------------------------

    def reserve(
        self,
        request: BoardRequest,
        owner: Owner | None = None,
        timeout: float = 300.0,
        *,
        as_person: str | None = None,
    ) -> Lease:
        """Reserve ``request.count`` distinct boards, all or nothing, within ``timeout`` s.

        ``as_person``: boards this person holds manually count as free for this request (the
        person at the bench runs ``hilfarm flash BOARD`` on the board they hold).

        Raises :class:`UsageError` at once if the rack can never satisfy the request,
        :class:`InfrastructureError` if quarantined boards make it impossible until a person
        acts, :class:`ReservationTimeout` (saying who holds what) when the time runs out.
        """
        feasible = can_ever_satisfy(self._boards.values(), request)
        if not feasible:
            raise UsageError(
                feasible.reason,
                where=f"reservation of {request.describe()}",
                hint="ask for fewer boards or other chips/features, or use a rack that has them",
            )
        if timeout < 0:
            raise UsageError(
                f"reservation timeout must be >= 0 seconds, not {timeout}",
                where=f"reservation of {request.describe()}",
                hint="use 0 to try once without waiting",
            )
        owner = owner or Owner.current()
        requested_at = time.time()
        start = time.monotonic()
        deadline = start + timeout
        state = _WaitState()
        try:
            waiting = self._waiting_count()
            if waiting:
                # Others are queued and a release has just woken them: let the head of the queue
                # decide first instead of making it wait for our (futile) first decision.
                time.sleep(self.stagger_step * min(waiting, 8))
            while True:
                generation = self._generation()
                got = self._attempt(request, owner, state, deadline, as_person)
                if got is not None:
                    break
                now = time.monotonic()
                if now >= deadline:
                    self._timeout(request, owner, state, requested_at, now - start)
                if self._generation() != generation:
                    continue  # a release raced with that decision: decide again at once
                # Sleep until a release writes to our FIFO or the periodic recheck is due.
                assert state.wake_fd is not None  # a failed attempt always leaves a ticket
                ready, _, _ = select.select(
                    [state.wake_fd], [], [], min(deadline - now, self.recheck_interval)
                )
                if ready:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(state.wake_fd, 512):
                            pass
                    if state.older:
                        time.sleep(self.stagger_step * min(state.older, 8))
        except BaseException:
            self._drop_ticket(state)
            raise
        return self._grant(request, owner, got, requested_at, time.monotonic() - start)

    def _grant(
        self,
        request: BoardRequest,
        owner: Owner,
        grant: _Grant,
        requested_at: float,
        waited: float,
    ) -> Lease:
        granted_at = time.time()
        lease_id, locks, boards = grant.lease_id, grant.locks, tuple(grant.locks)
        lease = Lease(self, lease_id, boards, grant.needs_check | frozenset(grant.stale), owner,
                      request, granted_at, waited, locks)
        try:
            for board, dead in grant.stale.items():
                # The lock was free, so its holder is gone: it died before this grant.
                if dead.lease_id:
                    self.store.record_release(
                        dead.lease_id, granted_at, LeaseOutcome.HOLDER_DIED.value
                    )
                self.store.set_health(
                    board, BoardHealth.UNKNOWN,
                    check_due_reason(LeaseOutcome.HOLDER_DIED, holder=dead.owner.describe(),
                                     since=dead.since),
                )
                self.store.forget_flash(board)
            self.store.record_reservation(
                lease_id, boards, owner.to_dict(), request.describe(), requested_at, granted_at,
                waited,
            )
        except BaseException:
            # Unlock but keep the owner records: the next reserver then treats these boards as
            # left by a dead holder (UNKNOWN), which is the safe reading of "we do not know".
            for lock in locks.values():
                lock.release()
            self._bump_generation()
            raise
        return lease

    def _timeout(
        self,
        request: BoardRequest,
        owner: Owner,
        state: _WaitState,
        requested_at: float,
        waited: float,
    ) -> None:
        with self._scheduling_lock():
            older = [t for t in self._live_tickets()
                     if state.ticket is not None and t.seq < state.ticket.seq]
            self._drop_ticket(state)
        self._bump_generation()
        lines = []
        for status in self.status():
            if not request.matches(self._boards[status.board]):
                continue
            if status.holder is not None:
                lines.append(
                    f"{status.board}: held by {status.holder.owner.describe()}"
                    f" since {status.holder.since}"
                )
            elif status.hold is not None:
                lines.append(
                    f"{status.board}: held at the bench by {status.hold.person} since "
                    f"{_utc_iso(status.hold.since)} (reason: {status.hold.reason})"
                )
            elif status.health.health is BoardHealth.QUARANTINED:
                lines.append(f"{status.board}: QUARANTINED ({status.health.reason})")
            else:
                lines.append(f"{status.board}: free now ({status.health.health.value})")
        for ticket in older:
            lines.append(
                f"queued ahead (#{ticket.seq}): {ticket.request.describe()} for {ticket.owner}"
            )
        lease_id = uuid.uuid4().hex
        with contextlib.suppress(Exception):  # the report matters more than the record
            self.store.record_reservation(
                lease_id, (), owner.to_dict(), request.describe(), requested_at, None, waited
            )
            self.store.record_release(lease_id, time.time(), LeaseOutcome.TIMEOUT.value)
        raise ReservationTimeout(
            f"could not reserve {request.describe()} within {waited:.1f} s (waited "
            f"{waited:.1f} s for {owner.describe()}):\n    " + "\n    ".join(lines),
            where=f"lock dir {self.lock_dir}",
            hint="raise the reservation timeout, or see who holds boards with `hilfarm status`",
        )

    def _finish(
        self, lease: Lease, per_board: Mapping[str, LeaseOutcome], locks: Mapping[str, _Flock],
        note: str = "",
    ) -> None:
        overall = overall_outcome(per_board)
        recorded = False
        try:
            self.store.record_release(
                lease.id, time.time(), overall.value, {b: o.value for b, o in per_board.items()}
            )
            for board, outcome in per_board.items():
                if outcome in OUTCOMES_NEEDING_CHECK:
                    self.store.set_health(
                        board, BoardHealth.UNKNOWN,
                        check_due_reason(outcome, holder=lease.owner.describe(),
                                         since=_utc_iso(lease.granted_at), note=note),
                    )
                    self.store.forget_flash(board)
            recorded = True
        finally:
            for board, lock in locks.items():
                if recorded:
                    self._clear_owner(board)
                # Without a record the owner file stays: the next holder marks it UNKNOWN.
                lock.release()
            self._bump_generation()

    def hold(self, board: str, reason: str, person: str) -> HoldResult:
        """A person holds ``board`` (survives this process). Reservations skip it until unhold.

        A lease already running on the board is not interrupted; ``in_use_by`` names it.
        """
        self._known(board, "hold")
        if not reason.strip():
            raise UsageError(
                "a manual hold needs a reason", where=f"hold {board}",
                hint='say why, e.g. --reason "probing UART with a scope"',
            )
        # Under the scheduling lock, so no reservation decided before the hold can still grab
        # the board after this returns.
        with self._scheduling_lock():
            record = self.store.add_hold(board, person, reason)
            probe = _Flock(self._lock_path(board))
            busy = not probe.try_acquire()
            probe.release()
            in_use = self._read_owner(board) if busy else None
        return HoldResult(record, in_use)

    def unhold(self, board: str) -> HoldRecord | None:
        self._known(board, "unhold")
        record = self.store.remove_hold(board)
        self._bump_generation()  # waiters may now take it
        return record

    def status(self) -> list[BoardStatus]:
        """Every board: health, live holder, manual hold, dead holder's leftover record."""
        with self._scheduling_lock():
            health = self.store.all_health(self._order)
            holds = self.store.holds()
            result = []
            for board in self._order:
                probe = _Flock(self._lock_path(board))
                busy = not probe.try_acquire()
                probe.release()
                record = self._read_owner(board)
                result.append(
                    BoardStatus(
                        board=board,
                        chip=self._boards[board].chip,
                        health=health[board],
                        holder=record if busy else None,
                        hold=holds.get(board),
                        stale_owner=None if busy else record,
                    )
                )
        return result

    def _known(self, board: str, action: str) -> None:
        if board not in self._boards:
            raise UsageError(
                f"no board named {board!r} in this rack",
                where=f"{action} {board}",
                hint=f"boards: {', '.join(self._order)}",
            )
