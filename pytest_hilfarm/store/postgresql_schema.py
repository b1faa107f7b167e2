"""Versioned schema migrations for the PostgreSQL farm store, and the advisory-lock key spaces.

Job: bring a database to :data:`SCHEMA_VERSION`, automatically and idempotently, when any client,
rig host or CLI opens it. Every opener may race: the whole migration runs in one transaction under
a transaction-level advisory lock, so exactly one opener applies each step and the others see the
result (PostgreSQL DDL is transactional, so a failed step leaves nothing half-done).

Must not: edit a shipped migration (databases in the field already ran it; append a new one);
drop data; run outside a transaction.

Advisory locks use the two-int4 form ``(namespace, key)``, which ``pg_locks`` shows as
``classid = namespace, objid = key, objsubid = 2``. The namespaces below are ASCII tags, so an
administrator reading ``pg_locks`` can tell which lock belongs to hilfarm and what it guards.
"""

from __future__ import annotations

from typing import Any

from pytest_hilfarm.errors import UsageError

# Lock namespaces (first int4 of the advisory lock key). Values are ASCII, all below 2**31.
NS_BOARD = 0x48494C42  # "HILB": one session lock per leased board, held by the lease connection
NS_TICKET = 0x48494C54  # "HILT": a waiting request's liveness (its waiter's session lock)
NS_HOST = 0x48494C48  # "HILH": a rig host's liveness (its heartbeat connection's session lock)
NS_SCHED = 0x48494C53  # "HILS": one scheduling decision (transaction lock, key 0)
NS_MIGRATE = 0x48494C4D  # "HILM": schema migration (transaction lock, key 0)
NS_HEALTH = 0x48494C56  # "HILV": serialises health read-modify-writes per board (xact lock)

# Each entry moves the schema from version i to i+1. Append only.
MIGRATIONS: tuple[str, ...] = (
    # 1: the SQLite store's data (health, flash digests, reservations, holds, results)
    """
    CREATE TABLE board_health (
        board TEXT PRIMARY KEY,
        health TEXT NOT NULL,
        failures INTEGER NOT NULL DEFAULT 0,
        reason TEXT NOT NULL DEFAULT '',
        changed_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE health_events (
        id BIGSERIAL PRIMARY KEY,
        board TEXT NOT NULL,
        old TEXT NOT NULL,
        new TEXT NOT NULL,
        reason TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX health_events_board ON health_events (board, id);
    CREATE TABLE flashes (
        board TEXT NOT NULL,
        "offset" BIGINT NOT NULL,
        digest TEXT NOT NULL,
        algorithm TEXT NOT NULL,
        size BIGINT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (board, "offset")
    );
    CREATE TABLE reservations (
        lease_id TEXT PRIMARY KEY,
        owner JSONB NOT NULL,
        request TEXT NOT NULL,
        requested_at DOUBLE PRECISION NOT NULL,
        granted_at DOUBLE PRECISION,
        released_at DOUBLE PRECISION,
        outcome TEXT,
        wait_s DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX reservations_requested ON reservations (requested_at);
    CREATE TABLE reservation_boards (
        lease_id TEXT NOT NULL REFERENCES reservations (lease_id),
        board TEXT NOT NULL,
        outcome TEXT,
        PRIMARY KEY (lease_id, board)
    );
    CREATE INDEX reservation_boards_board ON reservation_boards (board);
    CREATE TABLE holds (
        board TEXT PRIMARY KEY,
        person TEXT NOT NULL,
        reason TEXT NOT NULL,
        since DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE results (
        id BIGSERIAL PRIMARY KEY,
        board TEXT NOT NULL,
        test_id TEXT NOT NULL,
        outcome TEXT NOT NULL,
        duration DOUBLE PRECISION NOT NULL,
        firmware_sha256 TEXT,
        at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX results_board_at ON results (board, at);
    """,
    # 2: rig hosts, their boards, lock keys, live owners and the wait queue
    """
    CREATE TABLE hosts (
        host TEXT PRIMARY KEY,
        lock_key SERIAL UNIQUE,
        control_url TEXT NOT NULL DEFAULT '',
        pid INTEGER NOT NULL DEFAULT 0,
        started_at DOUBLE PRECISION NOT NULL,
        heartbeat_at DOUBLE PRECISION,
        offline_after DOUBLE PRECISION NOT NULL,
        stopped_at DOUBLE PRECISION
    );
    CREATE TABLE boards (
        board TEXT PRIMARY KEY,
        host TEXT REFERENCES hosts (host),
        chip TEXT NOT NULL,
        features TEXT[] NOT NULL DEFAULT '{}',
        port_url TEXT NOT NULL DEFAULT '',
        registered_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE board_keys (
        board TEXT PRIMARY KEY,
        lock_key SERIAL UNIQUE
    );
    CREATE TABLE board_owners (
        board TEXT PRIMARY KEY,
        lease_id TEXT NOT NULL,
        owner JSONB NOT NULL,
        owner_text TEXT NOT NULL,
        since DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX board_owners_lease ON board_owners (lease_id);
    CREATE TABLE waiters (
        seq BIGSERIAL PRIMARY KEY,
        request JSONB NOT NULL,
        boards TEXT[] NOT NULL,
        owner_text TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    """,
    # 3: the scheduler: expected ends of leases, priorities and expected holds of waiters, the
    # time a waiter last took its ticket lock (to keep its place across a server restart), and
    # a test's past holds by test id
    """
    ALTER TABLE board_owners ADD COLUMN expected_end DOUBLE PRECISION;
    ALTER TABLE waiters ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE waiters ADD COLUMN hold DOUBLE PRECISION;
    ALTER TABLE waiters ADD COLUMN registered_at DOUBLE PRECISION;
    CREATE INDEX reservations_test ON reservations ((owner->>'test_id'), requested_at);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def _statements(script: str) -> list[str]:
    # The scripts hold no semicolons inside strings or bodies, so a plain split is exact.
    return [s.strip() for s in script.split(";") if s.strip()]


def schema_version(conn: Any) -> int:
    """The database's schema version (0 for a fresh database)."""
    row = conn.execute("SELECT to_regclass('hilfarm_schema') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    found = conn.execute("SELECT version FROM hilfarm_schema WHERE id = 1").fetchone()
    return int(found[0]) if found else 0


def migrate(conn: Any, *, where: str = "database") -> int:
    """Apply missing migrations (idempotent, safe under concurrent openers); returns the version.

    ``conn`` is an autocommit psycopg connection; the migration is one transaction of its own.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (NS_MIGRATE,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS hilfarm_schema ("
            " id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
        )
        conn.execute(
            "INSERT INTO hilfarm_schema (id, version) VALUES (1, 0) ON CONFLICT DO NOTHING"
        )
        version = schema_version(conn)
        if version > SCHEMA_VERSION:
            raise UsageError(
                f"the farm database has schema version {version}, newer than this "
                f"pytest-hilfarm understands ({SCHEMA_VERSION})",
                where=where,
                hint="upgrade pytest-hilfarm on this host to the version the rig hosts run",
            )
        for index in range(version, SCHEMA_VERSION):
            for statement in _statements(MIGRATIONS[index]):
                conn.execute(statement)
        conn.execute("UPDATE hilfarm_schema SET version = %s WHERE id = 1", (SCHEMA_VERSION,))
    return SCHEMA_VERSION
