"""The virtual rack's view of a rack file: its virtual boards and each board's ``sim:`` section.

The virtual rack reads the same rack file as the farm, through the same loader
(:mod:`pytest_hilfarm.description.rack`, in its short form: ``port`` defaults to ``virtual``,
``version``/``name`` may be left out, so a test or a bench can describe a rack in a few lines).
This module keeps only what the simulator needs from the checked :class:`RackSpec`: the boards
with ``port: virtual``, each with its id, chip, flash size, features, order and ``sim:`` set-up,
and a digest of them. It neither reads YAML nor checks a value itself; whether a revision fits a
chip's eFuse fields is the simulator's check, made when it builds the board.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_hilfarm.description.rack import (
    BoardSpec,
    RackSpec,
    builtin_virtual_rack_path,
    load_rack,
    rack_from_data,
)
from pytest_hilfarm.description.simsection import (
    DEFAULT_FLASH_SIZE,
    SIM_KEY,
    BoardSecurity,
)
from pytest_hilfarm.errors import ConfigError

__all__ = ["BUILTIN_RACK", "FALLBACK_RACK", "SIM_KEY", "BoardSecurity", "VirtualBoardSpec",
           "VirtualRackSpec", "load_virtual_rack", "parse_virtual_rack", "state_dir",
           "virtual_view"]

BUILTIN_RACK = "builtin:virtual.yaml"

# Used when the packaged data/virtual.yaml is missing (a partial install): the documented
# default rack (3 mesh-capable ESP32, 1 ESP32-S2, 1 ESP32-C3).
FALLBACK_RACK: dict[str, Any] = {
    "name": "virtual",
    "boards": [
        {"id": "esp32-1", "chip": "esp32", "port": "virtual", "features": ["mesh-radio"]},
        {"id": "esp32-2", "chip": "esp32", "port": "virtual", "features": ["mesh-radio"]},
        {"id": "esp32-3", "chip": "esp32", "port": "virtual", "features": ["mesh-radio"]},
        {"id": "esp32s2-1", "chip": "esp32s2", "port": "virtual"},
        {"id": "esp32c3-1", "chip": "esp32c3", "port": "virtual"},
    ],
}


@dataclass(frozen=True)
class VirtualBoardSpec:
    """One virtual board of the rack file (only the keys the simulator needs)."""

    id: str
    chip: str
    flash_size: int
    features: tuple[str, ...] = ()
    position: int = 0
    security: BoardSecurity | None = None
    revision: int | None = None  # major * 100 + minor; None: the chip's current silicon
    mac: bytes | None = None  # None: derived from the board id (chips.mac_for)
    where: str = ""  # "rack.yaml:4: boards[2]", for errors about this board


@dataclass(frozen=True)
class VirtualRackSpec:
    """The virtual boards of a rack file, plus where it came from."""

    name: str
    source: str  # absolute path, or BUILTIN_RACK
    # sha256 of the virtual boards (id, chip, flash size, features, order): a second ``up``
    # reuses a running daemon only for an equal rack, whatever else the file says.
    digest: str
    boards: tuple[VirtualBoardSpec, ...] = field(default_factory=tuple)


def _flash_size(board: BoardSpec) -> int:
    """The simulated flash: ``sim: flash_size``, else ``flash: size`` (``keep``/``detect``: 4MB)."""
    if board.sim is not None and board.sim.flash_size is not None:
        return board.sim.flash_size
    if board.flash.size.endswith("MB"):
        return int(board.flash.size[:-2]) << 20
    return DEFAULT_FLASH_SIZE


def virtual_view(rack: RackSpec, source: str | None = None) -> VirtualRackSpec:
    """The virtual boards of a checked rack, in file order (``source`` names it in errors)."""
    source = source if source is not None else rack.source
    indexed = [(index, board) for index, board in enumerate(rack.boards) if board.is_virtual]
    if not indexed:
        raise ConfigError(
            "the rack has no virtual boards (port: virtual)",
            where=source,
            hint="add boards with 'port: virtual' or pass another rack file",
        )
    boards = tuple(
        VirtualBoardSpec(
            id=board.id,
            chip=board.chip,
            flash_size=_flash_size(board),
            # Sorted: a rack's features are a set, and the digest must not depend on the
            # process's string hashing.
            features=tuple(sorted(board.features)),
            position=position,
            security=board.sim.security if board.sim is not None else None,
            revision=board.sim.revision if board.sim is not None else None,
            mac=board.sim.mac if board.sim is not None else None,
            where=f"{board.where}: boards[{index}]",
        )
        for position, (index, board) in enumerate(indexed)
    )
    # A board's security set-up counts only when given, so racks without it keep their digest.
    canonical = json.dumps([[b.id, b.chip, b.flash_size, list(b.features)]
                            + ([b.security.canonical()] if b.security else [])
                            + ([["revision", b.revision]] if b.revision is not None else [])
                            + ([["mac", b.mac.hex()]] if b.mac is not None else [])
                            for b in boards])
    return VirtualRackSpec(
        name=rack.name,
        source=source,
        digest=hashlib.sha256(canonical.encode()).hexdigest(),
        boards=boards,
    )


def parse_virtual_rack(data: Any, source: str) -> VirtualRackSpec:
    """The virtual boards of a rack given as loaded YAML data (checked by the rack loader)."""
    base_dir = Path(source).parent if Path(source).is_absolute() else None
    return virtual_view(rack_from_data(data, source, base_dir=base_dir, short_form=True))


def load_virtual_rack(path: Path | str | None = None) -> VirtualRackSpec:
    """Load a rack file, or the packaged default virtual rack when ``path`` is None."""
    if path is None:
        builtin = builtin_virtual_rack_path()
        if not builtin.is_file():
            return virtual_view(rack_from_data(FALLBACK_RACK, BUILTIN_RACK, short_form=True))
        return virtual_view(load_rack(builtin, short_form=True), BUILTIN_RACK)
    file = Path(path).expanduser().resolve()
    return virtual_view(load_rack(file, short_form=True))


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Return the virtual rack state directory (the rule in docs/CONTRACTS.md).

    ``HILFARM_SIM_DIR`` if set, else ``$XDG_STATE_HOME/hilfarm/virtual-rack``, else
    ``~/.local/state/hilfarm/virtual-rack``. Empty variables count as unset, as XDG says.
    """
    env = os.environ if environ is None else environ
    explicit = env.get("HILFARM_SIM_DIR", "")
    if explicit:
        return Path(explicit).expanduser()
    xdg = env.get("XDG_STATE_HOME", "")
    if xdg:
        return Path(xdg).expanduser() / "hilfarm" / "virtual-rack"
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "state" / "hilfarm" / "virtual-rack"
