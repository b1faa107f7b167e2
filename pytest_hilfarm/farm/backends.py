"""Which store and reserver a farm runs on: the shared farm's PostgreSQL backend by URL.

Job: give every host of a farm one set of locks and one view of health, history, results, holds,
rig hosts and their boards, on an existing engine. :func:`open_backend` is what ``Farm.open``
calls when the rack's ``backend`` (or ``HILFARM_DATABASE_URL``) is a ``postgresql://`` URL.

Must not: import pytest or the virtual rack; talk to hardware; reclaim a lock by its age (only
the server frees a session advisory lock, when its holder's connection dies).

psycopg (v3) is imported lazily by the PostgreSQL modules' connect helpers, so importing this
module without the driver installed fails only when a database is actually used, with a clear
hint. The single-host default (SQLite store, file locks) is opened by ``Farm.open`` itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_hilfarm.errors import ConfigError

if TYPE_CHECKING:
    from pytest_hilfarm.description.rack import RackSpec
    from pytest_hilfarm.reservation.postgresql import PgReserver
    from pytest_hilfarm.store.postgresql import PgFarmStore

__all__ = ["is_database_url", "open_backend"]


def is_database_url(url: str | None) -> bool:
    """True for the URLs this backend serves (``postgresql://`` or ``postgres://``)."""
    return bool(url) and str(url).startswith(("postgresql://", "postgres://"))


def open_backend(url: str, rack: RackSpec | None = None) -> tuple[PgFarmStore, PgReserver]:
    """Open the PostgreSQL store and reserver for ``rack`` (migrating the schema if needed).

    ``rack`` limits allocation to its boards; None means every board a rig host registered.
    """
    if not is_database_url(url):
        raise ConfigError(
            f"not a PostgreSQL URL: {url!r}",
            where=rack.source if rack is not None else "HILFARM_DATABASE_URL",
            hint="use postgresql://USER@HOST:PORT/DBNAME (or leave backend unset for the "
            "single-host default)",
        )
    from pytest_hilfarm.reservation.postgresql import PgReserver
    from pytest_hilfarm.store.postgresql import PgFarmStore

    store = PgFarmStore(url)
    reserver = PgReserver(url, store, boards=None if rack is None else rack.boards)
    return store, reserver
