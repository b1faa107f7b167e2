"""The statements of the PostgreSQL reservation backend, each a whole step in one round trip.

Job: the SQL text :mod:`.postgresql` sends: the farm's state for a decision in one ``SELECT``
(tables returned as JSON arrays), a grant's records in one statement and a release's in one.
Keeping a step in one statement keeps it atomic without a transaction and costs one round trip;
on a 2-core machine shared by dozens of clients and server backends, round trips are what a
reservation waits for.

Must not: execute anything, or hold connections.
"""

from __future__ import annotations

from pytest_hilfarm.store.postgresql import HOSTS_SQL, LIVE_LOCKS_SQL

# The server's clock and when the server last started (a restart drops every session lock).
CLOCKS_SQL = ("SELECT extract(epoch from clock_timestamp())::double precision,"
              " extract(epoch from pg_postmaster_start_time())::double precision")


def _rows(columns: str, source: str) -> str:
    """A subquery's rows as one JSON array (so that one statement can return many tables)."""
    return f"(SELECT coalesce(json_agg(json_build_array({columns})), '[]'::json) FROM {source})"


def farm_sql(locks: bool) -> str:
    """The whole state a decision reads, in one statement: clocks, registered boards, hosts
    with liveness, health, owners, holds, the waiting tickets and (``locks``) hilfarm's
    advisory locks. A direct grant needs no lock list: it try-locks boards without an owner.
    """
    return (
        "SELECT extract(epoch from clock_timestamp())::double precision,"
        " extract(epoch from pg_postmaster_start_time())::double precision, "
        + _rows("b.board, b.host, b.chip, b.features", "boards b") + ", "
        + _rows("h.host, h.online", f"({HOSTS_SQL}) h") + ", "
        + _rows("x.board, x.health, x.failures", "board_health x") + ", "
        + _rows("o.board, o.lease_id, o.owner_text, o.since, o.expected_end", "board_owners o")
        + ", " + _rows("d.board, d.person, d.reason, d.since", "holds d") + ", "
        + (_rows("l.classid, l.objid", f"({LIVE_LOCKS_SQL}) l") if locks else "'[]'::json")
        + ", " + _rows("w.seq, w.request, w.boards, w.owner_text, w.created_at, w.priority,"
                       " w.hold, w.registered_at", "waiters w")
    )


FARM_SQL = farm_sql(locks=True)
FARM_DIRECT_SQL = farm_sql(locks=False)
# A grant in one statement: try the candidate boards' locks in order until ``count`` are taken
# (a function scan yields rows in order and the limit stops it, so a crowd racing for the same
# best boards costs each one round trip, not one per board found taken), then write the
# reservation with its boards and the owner rows. The grant time is the server's clock after
# the locks were taken. Nothing is written if too few were taken, or if a bench hold (other
# than the asker's own) was recorded on a taken board before this statement: the holds are read
# after locking, as hold() records first and looks at the locks after. The boards taken are
# returned either way, in candidate order: on failure the caller unlocks them.
GRANT_SQL = (
    "WITH c AS MATERIALIZED (SELECT t.b FROM unnest(%(keys)s::int[], %(boards)s::text[])"
    "  AS t(k, b) WHERE pg_try_advisory_lock(%(ns)s, t.k) LIMIT %(count)s),"
    " g AS MATERIALIZED (SELECT n.boards, extract(epoch from clock_timestamp())::double precision"
    "  AS at, cardinality(n.boards) = %(count)s AND NOT EXISTS (SELECT 1 FROM holds"
    "  WHERE board = ANY(n.boards) AND board <> ALL(%(mine)s::text[])) AS ok"
    "  FROM (SELECT coalesce(array_agg(c.b), '{}'::text[]) AS boards FROM c) n),"
    " r AS (INSERT INTO reservations (lease_id, owner, request, requested_at, granted_at, wait_s)"
    "  SELECT %(lease)s, %(owner)s, %(request)s, %(requested)s, g.at, g.at - %(requested)s"
    "  FROM g WHERE g.ok),"
    " b AS (INSERT INTO reservation_boards (lease_id, board)"
    "  SELECT %(lease)s, unnest(g.boards) FROM g WHERE g.ok),"
    " o AS (INSERT INTO board_owners (board, lease_id, owner, owner_text, since, expected_end)"
    "  SELECT unnest(g.boards), %(lease)s, %(owner)s, %(owner_text)s, g.at,"
    "  g.at + %(hold)s FROM g WHERE g.ok ON CONFLICT (board) DO UPDATE SET"
    "  lease_id = excluded.lease_id, owner = excluded.owner, owner_text = excluded.owner_text,"
    "  since = excluded.since, expected_end = excluded.expected_end)"
    " SELECT at, ok, boards FROM g"
)
# A release's records in one statement: (records closed, release time). Its board locks are
# session locks: on a connection that still answers they are still held (a lost connection
# fails the statement instead).
RELEASE_SQL = (
    "WITH t AS (SELECT extract(epoch from clock_timestamp())::double precision AS at),"
    " r AS (UPDATE reservations SET released_at = t.at, outcome = %(outcome)s FROM t"
    "  WHERE lease_id = %(lease)s AND released_at IS NULL RETURNING lease_id),"
    " b AS (UPDATE reservation_boards x SET outcome = coalesce(%(per_board)s::jsonb ->> x.board,"
    "  %(outcome)s) FROM r WHERE x.lease_id = r.lease_id),"
    " d AS (DELETE FROM board_owners WHERE lease_id = %(lease)s AND EXISTS (SELECT 1 FROM r))"
    " SELECT (SELECT count(*) FROM r), (SELECT at FROM t)"
)
