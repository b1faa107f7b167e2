"""Where the PostgreSQL reservation backend used to live; it is now
:mod:`pytest_hilfarm.reservation.postgresql`. This module only re-exports its public names.
"""

from __future__ import annotations

from pytest_hilfarm.reservation.postgresql import (
    CHANNEL,
    RESTART_GRACE,
    SAFETY_RECHECK,
    PgLease,
    PgReserver,
    RemoteBoardStatus,
)

__all__ = ["CHANNEL", "RESTART_GRACE", "SAFETY_RECHECK", "PgLease", "PgReserver",
           "RemoteBoardStatus"]
