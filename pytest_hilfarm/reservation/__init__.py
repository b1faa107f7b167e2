"""Exclusive, fair board reservation: one policy (:mod:`.core`, :mod:`.scheduler`), two backends.

The public names live here: ``from pytest_hilfarm.reservation import Reserver, Owner, ...``.
:class:`Reserver` is the single-host backend (:mod:`.filelock`); the PostgreSQL backend is
:class:`~pytest_hilfarm.reservation.postgresql.PgReserver`, imported from its module so that this
package does not need the database driver.

Must not: import a backend's optional dependencies at import time.
"""

from __future__ import annotations

from .core import SAFETY_RECHECK, STAGGER_STEP, HoldEstimates, Lease, ReserverCore
from .filelock import Reserver, _Flock
from .protocol import (
    CI_JOB_VARIABLES,
    BoardStatus,
    HoldResult,
    LeaseProtocol,
    Owner,
    OwnerRecord,
    QueueEntry,
    ReservationBackend,
)
from .scheduler import AGEING_STEP, BACKFILL_BOUND, DEFAULT_HOLD, Policy

__all__ = [
    "AGEING_STEP",
    "BACKFILL_BOUND",
    "CI_JOB_VARIABLES",
    "DEFAULT_HOLD",
    "SAFETY_RECHECK",
    "STAGGER_STEP",
    "BoardStatus",
    "HoldEstimates",
    "HoldResult",
    "Lease",
    "LeaseProtocol",
    "Owner",
    "OwnerRecord",
    "Policy",
    "QueueEntry",
    "ReservationBackend",
    "Reserver",
    "ReserverCore",
    "_Flock",
]
