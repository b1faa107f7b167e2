"""Pure board selection: which free boards satisfy a request, and can the rack ever satisfy it.

Given the boards that are free right now (id, chip, features, health) and a request (count, chip,
features), :func:`choose` returns a deterministic choice or None. GOOD boards are preferred over
UNKNOWN and BAD ones; non-GOOD boards may be chosen but are flagged as needing a health check;
QUARANTINED boards and BAD boards at the failure threshold are never chosen. Among equally healthy
boards, those with the fewest features beyond the request go first, so special boards stay free
for the requests that need them. :func:`can_ever_satisfy` rejects a request the rack cannot serve
however long it waits (the plugin skips such tests at once instead of timing out).

This module must not lock, sleep, read files or the store: it is a function of its arguments.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pytest_hilfarm.errors import UsageError
from pytest_hilfarm.store import QUARANTINE_AFTER, BoardHealth


class BoardDescription(Protocol):
    """The static facts allocation needs about a board (a rack file's board record fits)."""

    @property
    def id(self) -> str: ...
    @property
    def chip(self) -> str: ...
    @property
    def features(self) -> Collection[str]: ...


@dataclass(frozen=True)
class BoardInfo:
    """A board as allocation sees it: static facts plus its current health."""

    id: str
    chip: str
    features: frozenset[str] = frozenset()
    health: BoardHealth = BoardHealth.GOOD
    failures: int = 0  # consecutive failed health checks

    def __post_init__(self) -> None:
        # Accept any collection of feature names, keep a frozenset (hashable, order-free).
        object.__setattr__(self, "features", frozenset(self.features))

    @classmethod
    def of(
        cls, board: BoardDescription, health: BoardHealth = BoardHealth.GOOD, failures: int = 0
    ) -> BoardInfo:
        return cls(board.id, board.chip, frozenset(board.features), health, failures)


@dataclass(frozen=True)
class BoardRequest:
    """What a test asks for: ``count`` distinct boards of ``chip`` having all ``features``.

    ``only`` restricts the choice to the named boards (``hilfarm flash BOARD`` reserves exactly
    one board by id). ``chips``, when given, is the set of chips the candidate firmware exists
    for: a request without ``chip`` then takes only boards of those chips (a build for one chip
    must not be handed a board it cannot run on).
    """

    count: int = 1
    chip: str | None = None
    features: frozenset[str] = field(default_factory=frozenset)
    only: frozenset[str] | None = None
    chips: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise UsageError(
                f"a board request needs a count of at least 1, not {self.count!r}",
                where="BoardRequest",
                hint="use count=1 or more (e.g. @pytest.mark.hil(count=2))",
            )
        if isinstance(self.features, str):
            # A bare string would silently become a set of its letters.
            object.__setattr__(self, "features", frozenset({self.features}))
        object.__setattr__(self, "features", frozenset(self.features))
        if self.only is not None:
            only = {self.only} if isinstance(self.only, str) else self.only
            object.__setattr__(self, "only", frozenset(only))
        if self.chips is not None:
            chips = {self.chips} if isinstance(self.chips, str) else self.chips
            object.__setattr__(self, "chips", frozenset(chips))

    def to_json(self) -> dict[str, object]:
        """The request as JSON-ready data (queue tickets of both reservation backends)."""
        return {"count": self.count, "chip": self.chip, "features": sorted(self.features),
                "only": None if self.only is None else sorted(self.only),
                "chips": None if self.chips is None else sorted(self.chips)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BoardRequest:
        """Inverse of :meth:`to_json` (a ticket written before ``chips`` existed reads as None)."""
        chips = data.get("chips")
        return cls(count=int(data["count"]), chip=data["chip"],
                   features=frozenset(data["features"]),
                   only=None if data["only"] is None else frozenset(data["only"]),
                   chips=None if chips is None else frozenset(chips))

    @property
    def chip_words(self) -> str:
        """The chip part of :meth:`describe`: ``esp32``, ``esp32|esp32c3`` or ``any-chip``."""
        if self.chip is not None:
            return self.chip
        if self.chips is not None:
            return "|".join(sorted(self.chips)) or "no-chip"
        return "any-chip"

    def describe(self) -> str:
        """Human words for the request: ``2 x esp32 board(s) with features {mesh-radio}``."""
        text = f"{self.count} x {self.chip_words} board(s)"
        if self.features:
            text += f" with features {{{', '.join(sorted(self.features))}}}"
        if self.only is not None:
            text += f" among {{{', '.join(natural_sorted(self.only))}}}"
        return text

    def matches(self, board: BoardInfo) -> bool:
        """Whether the board has the right chip and features (health aside)."""
        return (
            (self.chip is None or board.chip == self.chip)
            and (self.chips is None or board.chip in self.chips)
            and self.features <= board.features
            and (self.only is None or board.id in self.only)
        )


@dataclass(frozen=True)
class Choice:
    """Boards chosen for a request, in preference order; ``needs_check`` are not GOOD."""

    boards: tuple[str, ...]
    needs_check: frozenset[str]


@dataclass(frozen=True)
class Feasibility:
    """Whether a request can ever be met by a rack; ``reason`` explains a no."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


_HEALTH_RANK = {BoardHealth.GOOD: 0, BoardHealth.UNKNOWN: 1, BoardHealth.BAD: 2}


@functools.lru_cache(maxsize=8192)
def _natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    # "esp32-2" before "esp32-10": people number boards, and a stable human order makes the
    # choice easy to predict from `hilfarm status`. Cached: ranking runs under the rack-wide
    # scheduling lock on every reservation attempt, over the same few board ids.
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part
    )


def natural_sorted(ids: Iterable[str]) -> list[str]:
    return sorted(ids, key=_natural_key)


def usable(board: BoardInfo, *, max_failures: int = QUARANTINE_AFTER) -> bool:
    """Whether allocation may hand this board out at all (health-wise)."""
    if board.health is BoardHealth.QUARANTINED:
        return False
    return not (board.health is BoardHealth.BAD and board.failures >= max_failures)


def rank(
    boards: Iterable[BoardInfo], request: BoardRequest, *, max_failures: int = QUARANTINE_AFTER
) -> list[BoardInfo]:
    """The boards that may serve ``request``, best first (health, surplus features, id)."""
    candidates = [b for b in boards if request.matches(b) and usable(b, max_failures=max_failures)]
    return sorted(
        candidates,
        key=lambda b: (
            _HEALTH_RANK[b.health],
            len(b.features - request.features),
            _natural_key(b.id),
        ),
    )


def choose(
    free: Iterable[BoardInfo], request: BoardRequest, *, max_failures: int = QUARANTINE_AFTER
) -> Choice | None:
    """Pick ``request.count`` distinct boards among ``free``, or None if they do not suffice."""
    ranked = rank(free, request, max_failures=max_failures)
    if len(ranked) < request.count:
        return None
    picked = ranked[: request.count]
    return Choice(
        boards=tuple(b.id for b in picked),
        needs_check=frozenset(b.id for b in picked if b.health is not BoardHealth.GOOD),
    )


def can_ever_satisfy(all_boards: Iterable[BoardInfo], request: BoardRequest) -> Feasibility:
    """Whether the rack, with every board free and healthy, could serve ``request``.

    Health is ignored on purpose: a quarantined board can be restored by a person, so only the
    rack's make-up (chips, features, board count) makes a request impossible.
    """
    boards = list(all_boards)
    if not boards:
        return Feasibility(False, "the rack has no boards")
    if request.only is not None:
        unknown = request.only - {b.id for b in boards}
        if unknown:
            return Feasibility(
                False,
                f"no board named {', '.join(natural_sorted(unknown))} in the rack "
                f"(boards: {', '.join(natural_sorted(b.id for b in boards))})",
            )
    chips = Counter(b.chip for b in boards)
    have = ", ".join(f"{c} x{n}" for c, n in sorted(chips.items()))
    if request.chip is not None and request.chip not in chips:
        return Feasibility(False, f"the rack has no {request.chip} board (it has: {have})")
    if request.chips is not None and not request.chips & set(chips):
        return Feasibility(
            False, f"the rack has no {' or '.join(sorted(request.chips)) or 'such'} board "
            f"(it has: {have})")
    of_chip = [b for b in boards if (request.chip is None or b.chip == request.chip)
               and (request.chips is None or b.chip in request.chips)]
    known = frozenset().union(*(b.features for b in of_chip))
    missing = request.features - known
    if missing:
        where = f"no {request.chip_words} board" if request.chip or request.chips else "no board"
        return Feasibility(
            False,
            f"{where} has feature(s) {{{', '.join(sorted(missing))}}} "
            f"(known features: {{{', '.join(sorted(known)) or 'none'}}})",
        )
    matching = [b for b in boards if request.matches(b)]
    if len(matching) < request.count:
        names = ", ".join(natural_sorted(b.id for b in matching)) or "none"
        return Feasibility(
            False,
            f"asked for {request.describe()}, but the rack has only {len(matching)} such "
            f"board(s): {names}",
        )
    return Feasibility(True)
