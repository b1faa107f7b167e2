"""The reservation seams and records every backend shares: who asks, who holds, what a lease is.

Job: the frozen records (:class:`Owner`, :class:`OwnerRecord`, :class:`BoardStatus`,
:class:`HoldResult`, :class:`QueueEntry`) and the protocols (:class:`LeaseProtocol`,
:class:`ReservationBackend`) that the farm programs against. Both backends (file locks, PostgreSQL)
import them from here, never from each other.

Must not: lock, read files or the store, or know any backend.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from pytest_hilfarm.reservation.allocate import BoardRequest
from pytest_hilfarm.store import BoardState, HoldRecord, LeaseOutcome

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

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Owner:
        """Inverse of :meth:`to_dict`; unknown keys (other record fields) are ignored."""
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in fields})  # type: ignore[arg-type]

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


# The owner record of a board nobody can read (torn or foreign): someone held it, who is unknown.
UNREADABLE = Owner(0, "?", "?", reason="unreadable owner record")


@dataclass(frozen=True)
class OwnerRecord:
    """Who holds a board, since when, under which lease, and until when that is expected."""

    board: str
    lease_id: str
    since: str  # ISO 8601, UTC
    owner: Owner
    expected_end: float | None = None  # epoch seconds; None: not known (an older writer)
    # The lease's history record, so that a successor can write it if the holder dies before
    # its release records it (the file backend records a lease once, at release). None / empty:
    # written by an older version, which recorded the grant in the store itself.
    granted_at: float | None = None  # epoch seconds, exact (``since`` is rounded for people)
    requested_at: float | None = None
    request: str = ""  # BoardRequest.describe()
    boards: tuple[str, ...] = ()  # every board of the lease

    def to_json(self) -> str:
        return json.dumps(
            {"board": self.board, "lease_id": self.lease_id, "since": self.since,
             "expected_end": self.expected_end, "granted_at": self.granted_at,
             "requested_at": self.requested_at, "request": self.request,
             "boards": list(self.boards), **self.owner.to_dict()},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> OwnerRecord:
        data = json.loads(text)
        end, granted, requested = (data.get(k) for k in ("expected_end", "granted_at",
                                                          "requested_at"))
        return cls(str(data["board"]), str(data["lease_id"]), str(data["since"]),
                   Owner.from_dict(data), None if end is None else float(end),
                   None if granted is None else float(granted),
                   None if requested is None else float(requested),
                   str(data.get("request", "")), tuple(str(b) for b in data.get("boards", ())))


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


@dataclass(frozen=True)
class QueueEntry:
    """One waiting request as ``hilfarm status`` / ``who`` show it."""

    position: int  # 1 = served first
    seq: int  # arrival number
    request: str  # BoardRequest.describe()
    owner: str  # Owner.describe()
    priority: int  # as asked
    effective_priority: int  # with ageing
    since: float  # epoch seconds it asked
    expected_start: float | None  # epoch seconds; None: it waits on a person or a host


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
    """Exclusive, fair reservation of boards: file locks on one host, or PostgreSQL."""

    def reserve(
        self,
        request: BoardRequest,
        owner: Owner | None = None,
        timeout: float = 300.0,
        *,
        as_person: str | None = None,
        priority: int = 0,
    ) -> LeaseProtocol: ...
    def hold(self, board: str, reason: str, person: str) -> HoldResult: ...
    def unhold(self, board: str) -> HoldRecord | None: ...
    def status(self) -> list[BoardStatus]: ...
    def queue(self) -> list[QueueEntry]: ...
