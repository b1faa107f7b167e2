"""The virtual rack's view of a rack file: its virtual boards and each board's ``sim:`` section.

The virtual rack reads the same rack file as the farm, but only the boards with ``port:
virtual`` and only what it simulates (id, chip, flash size, features, order, and the ``sim:``
mapping: eFuses to burn, the bootloader's rollback option, chip revision, MAC, flash size). It
accepts a shorter file than the farm's loader (:mod:`pytest_hilfarm.description.rack`): ``port``
defaults to ``virtual``, and ``version``/``name`` may be left out, so a test or a bench can
describe a rack in a few lines. This module only reads and checks; whether a revision fits a
chip's eFuse fields is the simulator's check, made when it builds the board.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pytest_hilfarm.errors import ConfigError
from pytest_hilfarm.esp.chips import FARM_CHIPS, parse_revision

BUILTIN_RACK = "builtin:virtual.yaml"
FLASH_SIZES = {2, 4, 8, 16}  # MB; what the JEDEC table of the virtual flash chip offers
# A board id names its flash file, so it must be a plain file name.
_BOARD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

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

# The board key that carries a virtual board's own set-up in the rack file (one key, so the
# farm's strict rack schema needs to accept only this one):
#   sim: {secure_boot: bool, key_digests: [64 hex digits, ...], secure_version: int,
#         anti_rollback: bool, signed_apps: bool, rollback: bool,
#         revision: "v0.4", mac: "58:cf:79:00:00:01", flash_size: 8MB}
# revision / mac / flash_size describe the chip and module (what esptool reads from eFuses and
# the flash id); without them a board is current silicon with a MAC derived from its id and
# the flash size of `flash: {size: ...}` (else 4MB).
SIM_KEY = "sim"
_SECURITY_FIELDS = ("secure_boot", "key_digests", "secure_version", "anti_rollback",
                    "signed_apps", "rollback")
_CHIP_FIELDS = ("revision", "mac", "flash_size")
_SIM_FIELDS = _SECURITY_FIELDS + _CHIP_FIELDS


@dataclass(frozen=True)
class BoardSecurity:
    """A board's ``sim:`` mapping: eFuses to burn at start, and the bootloader's options.

    ``None`` = not given. eFuse values are *burned* onto the board's stored eFuses when the
    daemon starts (bits only go up: a lower value in the file does not lower a burned one);
    ``rollback`` (``CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE``) replaces the stored option.
    """

    secure_boot: bool | None = None
    key_digests: tuple[bytes, ...] = ()
    secure_version: int | None = None
    anti_rollback: bool | None = None
    signed_apps: bool | None = None
    rollback: bool | None = None

    def canonical(self) -> list[Any]:
        return [self.secure_boot, [d.hex() for d in self.key_digests], self.secure_version,
                self.anti_rollback, self.signed_apps, self.rollback]


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
    where: str = ""  # "rack.yaml: boards[2]", for errors about this board


@dataclass(frozen=True)
class VirtualRackSpec:
    """The virtual boards of a rack file, plus where it came from."""

    name: str
    source: str  # absolute path, or BUILTIN_RACK
    # sha256 of the virtual boards (id, chip, flash size, features, order): a second ``up``
    # reuses a running daemon only for an equal rack, whatever else the file says.
    digest: str
    boards: tuple[VirtualBoardSpec, ...] = field(default_factory=tuple)


def _parse_size(value: Any, where: str) -> int:
    if value is None:
        return 4 << 20
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*(MB|M|MiB)?\s*", str(value), re.IGNORECASE)
        if not m:
            raise ConfigError(
                f"flash size {value!r} is not understood",
                where=where,
                hint="write it as 2MB, 4MB, 8MB or 16MB",
            )
        size = int(m.group(1)) << 20 if m.group(2) or int(m.group(1)) <= 16 else int(m.group(1))
    if size >> 20 not in FLASH_SIZES or size & ((1 << 20) - 1):
        raise ConfigError(
            f"flash size {value!r} is not offered by the virtual flash chip",
            where=where,
            hint="use 2MB, 4MB, 8MB or 16MB",
        )
    return size


def _check_sim_mapping(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"'{SIM_KEY}:' must be a mapping", where=f"{where}: {SIM_KEY}",
                          hint=f"keys: {', '.join(_SIM_FIELDS)} (docs/virtual-rack.md)")
    unknown = sorted(set(map(str, raw)) - set(_SIM_FIELDS))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)}", where=f"{where}: {SIM_KEY}",
                          hint=f"use {', '.join(_SIM_FIELDS)}")
    return raw


def _parse_revision(raw: dict[str, Any], where: str) -> int | None:
    value = raw.get("revision")
    if value is None:
        return None
    try:
        return parse_revision(value)
    except ValueError as exc:
        raise ConfigError(str(exc), where=f"{where}: {SIM_KEY}.revision",
                          hint='write it as vMAJOR.MINOR, e.g. revision: "v0.4"') from None


def _parse_mac(raw: dict[str, Any], where: str) -> bytes | None:
    value = raw.get("mac")
    if value is None:
        return None
    where = f"{where}: {SIM_KEY}.mac"
    text = str(value).strip().lower().replace(":", "").replace("-", "")
    try:
        mac = bytes.fromhex(text)
    except ValueError:
        mac = b""
    if len(mac) != 6:
        raise ConfigError(f"mac {value!r} is not six hex bytes", where=where,
                          hint='e.g. mac: "58:cf:79:00:00:01" (quote it: YAML reads some '
                               'colon-separated numbers as base-60 integers)')
    if mac[0] & 1:
        raise ConfigError(f"mac {value!r} is a multicast address; a chip's base MAC is unicast",
                          where=where, hint="clear bit 0 of the first byte")
    return mac


def _parse_security(raw: Any, where: str) -> BoardSecurity | None:
    raw = {k: v for k, v in _check_sim_mapping(raw, where).items() if k in _SECURITY_FIELDS}
    if not raw:
        return None
    where = f"{where}: {SIM_KEY}"
    flags: dict[str, bool | None] = {}
    for key in ("secure_boot", "anti_rollback", "signed_apps", "rollback"):
        value = raw.get(key)
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, not {value!r}", where=where)
        flags[key] = value
    version = raw.get("secure_version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)
                                or version < 0):
        raise ConfigError(f"secure_version must be a whole number >= 0, not {version!r}",
                          where=where)
    digests_raw = raw.get("key_digests") or []
    if not isinstance(digests_raw, list):
        raise ConfigError("key_digests must be a list of 64-hex-digit key digests", where=where,
                          hint="get one with `hilfarm ota digest KEY`")
    digests: list[bytes] = []
    for item in digests_raw:
        text = str(item).replace(":", "").replace(" ", "").lower()
        try:
            digest = bytes.fromhex(text)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ConfigError(f"key digest {item!r} is not 64 hex digits", where=where,
                              hint="get one with `hilfarm ota digest KEY`")
        digests.append(digest)
    if flags["secure_boot"] and not digests:
        raise ConfigError("secure_boot: true needs at least one key digest (nothing would "
                          "boot)", where=where, hint="add key_digests: [HEX]")
    return BoardSecurity(secure_boot=flags["secure_boot"], key_digests=tuple(digests),
                         secure_version=version, anti_rollback=flags["anti_rollback"],
                         signed_apps=flags["signed_apps"], rollback=flags["rollback"])


def parse_virtual_rack(data: Any, source: str) -> VirtualRackSpec:
    """Read the virtual boards out of a loaded rack YAML document (other keys are ignored)."""
    if not isinstance(data, dict) or not isinstance(data.get("boards"), list):
        raise ConfigError(
            "a rack file needs a 'boards:' list", where=source, hint="see docs/virtual-rack.md"
        )
    boards: list[VirtualBoardSpec] = []
    seen: set[str] = set()
    for index, raw in enumerate(data["boards"]):
        where = f"{source}: boards[{index}]"
        if not isinstance(raw, dict):
            raise ConfigError("a board entry must be a mapping", where=where)
        port = raw.get("port", "virtual")
        if port != "virtual":
            continue  # a physical board of a mixed rack: not ours to simulate
        board_id = raw.get("id")
        if not isinstance(board_id, str) or not _BOARD_ID.fullmatch(board_id):
            raise ConfigError(
                f"board id {board_id!r} is missing or not a plain name",
                where=where,
                hint="use letters, digits, '.', '_' and '-' (it names the board's flash file)",
            )
        if board_id in seen:
            raise ConfigError(f"board id {board_id!r} appears twice", where=where)
        seen.add(board_id)
        chip = str(raw.get("chip", "")).lower().replace("-", "")
        if chip not in FARM_CHIPS:
            raise ConfigError(
                f"chip {raw.get('chip')!r} cannot be simulated",
                where=where,
                hint=f"use one of {', '.join(FARM_CHIPS)}",
            )
        flash = raw.get("flash") or {}
        sim = _check_sim_mapping(raw.get(SIM_KEY), where)
        size_value = flash.get("size") if isinstance(flash, dict) else flash
        size_where = where
        if sim.get("flash_size") is not None:
            size_value, size_where = sim["flash_size"], f"{where}: {SIM_KEY}.flash_size"
        features = raw.get("features") or []
        mac = _parse_mac(sim, where)
        if mac is not None:
            other = next((b.id for b in boards if b.mac == mac), None)
            if other is not None:
                raise ConfigError(f"mac {mac.hex(':')} is also board {other!r}'s",
                                  where=f"{where}: {SIM_KEY}.mac",
                                  hint="give every board its own MAC")
        boards.append(
            VirtualBoardSpec(
                id=board_id,
                chip=chip,
                flash_size=_parse_size(size_value, size_where),
                features=tuple(str(f) for f in features),
                position=len(boards),
                security=_parse_security(sim, where),
                revision=_parse_revision(sim, where),
                mac=mac,
                where=where,
            )
        )
    if not boards:
        raise ConfigError(
            "the rack has no virtual boards (port: virtual)",
            where=source,
            hint="add boards with 'port: virtual' or pass another rack file",
        )
    # A board's security set-up counts only when given, so racks without it keep their digest.
    canonical = json.dumps([[b.id, b.chip, b.flash_size, list(b.features)]
                            + ([b.security.canonical()] if b.security else [])
                            + ([["revision", b.revision]] if b.revision is not None else [])
                            + ([["mac", b.mac.hex()]] if b.mac is not None else [])
                            for b in boards])
    return VirtualRackSpec(
        name=str(data.get("name") or Path(source).stem),
        source=source,
        digest=hashlib.sha256(canonical.encode()).hexdigest(),
        boards=tuple(boards),
    )


def load_virtual_rack(path: Path | str | None = None) -> VirtualRackSpec:
    """Load a rack file, or the packaged default virtual rack when ``path`` is None."""
    if path is None:
        try:
            text = resources.files("pytest_hilfarm").joinpath("data/virtual.yaml").read_text()
        except (FileNotFoundError, OSError):
            text = yaml.safe_dump(FALLBACK_RACK, sort_keys=False)
        return parse_virtual_rack(yaml.safe_load(text), BUILTIN_RACK)
    file = Path(path).expanduser().resolve()
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the rack file: {exc.strerror}",
            where=str(file),
            hint="check the path, or omit it to use the built-in virtual rack",
        ) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", where=str(file)) from exc
    return parse_virtual_rack(data, str(file))


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
