"""The farm: reserve boards, bring them to a known state, flash them, hand out devices, release.

Usable without pytest: ``Farm.open(rack)`` then ``with farm.session(count=2, firmware=...) as s``.
``core`` holds :class:`Farm` (open, reserve, status), ``prepare`` the health checks, candidate
flash and boot checks, ``session`` the prepared session and its release, ``candidate`` the
candidate firmware resolved once per test. The reservation core and the farm store sit beside
this package (``reservation``, ``store``, ``pg``). The farm never imports the virtual rack's code
(a virtual board is reached through its port URL and the control endpoint) and reaches a board
only through the board wiring (:mod:`pytest_hilfarm.board.wiring`).
"""

from pytest_hilfarm.farm.candidate import Candidate, resolve_candidate
from pytest_hilfarm.farm.core import Farm
from pytest_hilfarm.farm.session import (
    BoardFault,
    HilSession,
    PreparedBoard,
    flash_boards,
    interruption_note,
)

__all__ = [
    "BoardFault",
    "Candidate",
    "Farm",
    "HilSession",
    "PreparedBoard",
    "flash_boards",
    "interruption_note",
    "resolve_candidate",
]
