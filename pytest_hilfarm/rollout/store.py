"""SQLite store of rollouts and their audit log (WAL, versioned schema, short transactions).

Every state change is one ``BEGIN IMMEDIATE`` transaction that checks the row's revision,
appends the audit entry and updates the row; a crash before ``COMMIT`` leaves both untouched, a
crash after leaves both written, so re-running a step is always safe. ``UNIQUE(rollout_id, rev)``
on the audit makes a transition recordable only once even if two controllers race. This module
knows nothing about gates or plans: it stores what the controller decided.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pytest_hilfarm.errors import ConfigError, UsageError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    plan_name TEXT NOT NULL,
    plan_digest TEXT NOT NULL,
    plan_text TEXT NOT NULL,
    plan_source TEXT NOT NULL,
    manifest TEXT NOT NULL,
    candidate TEXT NOT NULL,
    previous TEXT,
    state TEXT NOT NULL,
    ring_index INTEGER NOT NULL,
    deployed_index INTEGER NOT NULL,
    ring_started_at REAL,
    soak_until REAL,
    extensions INTEGER NOT NULL DEFAULT 0,
    staging_since REAL,
    baseline_drain REAL,
    paused_from TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    rev INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    rev INTEGER NOT NULL,
    at REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    ring TEXT,
    event TEXT NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    numbers TEXT NOT NULL,
    UNIQUE (rollout_id, rev)
);
"""


@dataclass(frozen=True)
class RolloutRow:
    id: str
    plan_name: str
    plan_digest: str
    plan_text: str
    plan_source: str
    manifest: str
    candidate: str
    previous: str | None
    state: str
    ring_index: int
    deployed_index: int  # last ring that received the candidate; -1 before the first deploy
    ring_started_at: float | None
    soak_until: float | None
    extensions: int
    staging_since: float | None
    baseline_drain: float | None
    paused_from: str | None
    created_at: float
    updated_at: float
    rev: int


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    rollout_id: str
    rev: int
    at: float
    from_state: str | None
    to_state: str
    ring: str | None
    event: str
    actor: str
    reason: str
    numbers: dict[str, Any]


_ROW_FIELDS = tuple(f.name for f in fields(RolloutRow))
# Columns a transition may change; identity and plan snapshot are written once, at creation.
MUTABLE = frozenset({"state", "ring_index", "deployed_index", "ring_started_at", "soak_until",
                     "extensions", "staging_since", "baseline_drain", "paused_from"})


def default_db_path() -> Path:
    """``HILFARM_ROLLOUT_DB``, else ``$XDG_STATE_HOME/hilfarm/rollouts.sqlite``."""
    env = os.environ.get("HILFARM_ROLLOUT_DB")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "hilfarm" / "rollouts.sqlite"


class Store:
    """One connection; use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: we issue BEGIN ourselves so each transaction is explicit.
            self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open rollout store: {exc}", where=self.path,
                              hint="pass --db with a writable path") from exc
        self._db.row_factory = sqlite3.Row
        if self.path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so the revision we read cannot change under us.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    def _migrate(self) -> None:
        with self._tx() as db:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row["value"]) > SCHEMA_VERSION:
                raise ConfigError(
                    f"rollout store schema {row['value']} is newer than this hilfarm "
                    f"({SCHEMA_VERSION})", where=self.path, hint="upgrade pytest-hilfarm")

    def get(self, rollout_id: str) -> RolloutRow:
        row = self._db.execute("SELECT * FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
        if row is None:
            known = [r["id"] for r in self._db.execute(
                "SELECT id FROM rollouts ORDER BY created_at DESC LIMIT 5")]
            raise UsageError(f"no rollout {rollout_id!r}", where=self.path,
                             hint=f"known: {', '.join(known)}" if known else
                             "start one with `hilfarm rollout start --plan PLAN`")
        return RolloutRow(**{k: row[k] for k in _ROW_FIELDS})

    def find(self, rollout_id: str) -> RolloutRow | None:
        try:
            return self.get(rollout_id)
        except UsageError:
            return None

    def all(self) -> list[RolloutRow]:
        rows = self._db.execute("SELECT * FROM rollouts ORDER BY created_at, id").fetchall()
        return [RolloutRow(**{k: r[k] for k in _ROW_FIELDS}) for r in rows]

    def create(self, row: RolloutRow, event: str, actor: str, reason: str,
               numbers: dict[str, Any]) -> bool:
        """Insert a rollout and its first audit entry; False if the id already exists."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM rollouts WHERE id=?", (row.id,)).fetchone():
                return False
            cols = ",".join(_ROW_FIELDS)
            db.execute(f"INSERT INTO rollouts ({cols}) VALUES ({','.join('?' * len(_ROW_FIELDS))})",
                       tuple(getattr(row, k) for k in _ROW_FIELDS))
            self._audit(db, row.id, row.rev, row.created_at, None, row.state,
                        numbers.get("ring"), event, actor, reason, numbers)
        return True

    def apply(self, rollout_id: str, expected_rev: int, at: float, changes: dict[str, Any],
              event: str, actor: str, reason: str, numbers: dict[str, Any],
              ring: str | None) -> bool:
        """Compare-and-swap one transition; False when the rollout moved on meanwhile."""
        bad = set(changes) - MUTABLE
        if bad:
            raise ValueError(f"not mutable: {sorted(bad)}")
        with self._tx() as db:
            cur = db.execute("SELECT state, rev FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
            if cur is None or cur["rev"] != expected_rev:
                return False
            to_state = changes.get("state", cur["state"])
            self._audit(db, rollout_id, expected_rev + 1, at, cur["state"], to_state, ring, event,
                        actor, reason, numbers)
            sets = ", ".join(f"{k}=?" for k in changes)
            db.execute(f"UPDATE rollouts SET {sets}{', ' if sets else ''}updated_at=?, rev=? "
                       "WHERE id=? AND rev=?",
                       (*changes.values(), at, expected_rev + 1, rollout_id, expected_rev))
        return True

    def _audit(self, db: sqlite3.Connection, rollout_id: str, rev: int, at: float,
               from_state: str | None, to_state: str, ring: str | None, event: str, actor: str,
               reason: str, numbers: dict[str, Any]) -> None:
        db.execute("INSERT INTO audit (rollout_id, rev, at, from_state, to_state, ring, event, "
                   "actor, reason, numbers) VALUES (?,?,?,?,?,?,?,?,?,?)",
                   (rollout_id, rev, at, from_state, to_state, ring, event, actor, reason,
                    json.dumps(numbers, sort_keys=True, default=str)))

    def audit(self, rollout_id: str) -> list[AuditEntry]:
        rows = self._db.execute("SELECT * FROM audit WHERE rollout_id=? ORDER BY seq",
                                (rollout_id,)).fetchall()
        return [AuditEntry(r["seq"], r["rollout_id"], r["rev"], r["at"], r["from_state"],
                           r["to_state"], r["ring"], r["event"], r["actor"], r["reason"],
                           json.loads(r["numbers"])) for r in rows]

    def integrity_ok(self) -> bool:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def now_utc() -> float:
    return time.time()
