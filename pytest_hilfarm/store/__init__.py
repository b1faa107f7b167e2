"""The farm store: board health, flash digests, reservation history, test results, manual holds.

``records`` holds what is recorded and the health rules; ``sqlite`` the single-host store (one
SQLite file in WAL mode, the default); ``postgresql`` the shared farm's store (with
``postgresql_schema``, its migrations). Every name callers use is importable from here.
"""

from pytest_hilfarm.store.records import (
    BUSY_TIMEOUT_MS,
    CHECK_DUE,
    FAILING_OUTCOMES,
    OUTCOMES_NEEDING_CHECK,
    PASSING_OUTCOMES,
    QUARANTINE_AFTER,
    SEVERITY,
    BoardHealth,
    BoardLease,
    BoardState,
    FarmStoreProtocol,
    FlashRecord,
    HealthEvent,
    HoldRecord,
    LeaseOutcome,
    LeaseRecord,
    PassRate,
    ReservationRecord,
    TestResult,
    board_outcomes,
    check_due_reason,
    outcome_of,
    overall_outcome,
    parse_outcome,
)
from pytest_hilfarm.store.sqlite import SCHEMA_VERSION, FarmStore

__all__ = [
    "BUSY_TIMEOUT_MS",
    "BoardHealth",
    "BoardLease",
    "BoardState",
    "CHECK_DUE",
    "FAILING_OUTCOMES",
    "FarmStore",
    "FarmStoreProtocol",
    "FlashRecord",
    "HealthEvent",
    "HoldRecord",
    "LeaseOutcome",
    "LeaseRecord",
    "OUTCOMES_NEEDING_CHECK",
    "PASSING_OUTCOMES",
    "PassRate",
    "QUARANTINE_AFTER",
    "ReservationRecord",
    "SCHEMA_VERSION",
    "SEVERITY",
    "TestResult",
    "board_outcomes",
    "check_due_reason",
    "outcome_of",
    "overall_outcome",
    "parse_outcome",
]
