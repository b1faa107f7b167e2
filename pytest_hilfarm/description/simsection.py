"""A virtual board's ``sim:`` section in a rack file: its eFuses, bootloader option and chip.

::

    sim: {secure_boot: bool, key_digests: [64 hex digits, ...], secure_version: int,
          anti_rollback: bool, signed_apps: bool, rollback: bool,
          revision: "v0.4", mac: "58:cf:79:00:00:01", flash_size: 8MB}

revision / mac / flash_size describe the chip and module (what esptool reads from eFuses and the
flash id); without them a board is current silicon with a MAC derived from its id and the flash
size of ``flash: {size: ...}`` (else 4MB). This module only reads and checks the section for the
rack loader (:mod:`pytest_hilfarm.description.rack`); whether a revision fits a chip's eFuse
fields is the simulator's check, made when it builds the board.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from yaml.nodes import Node, ScalarNode, SequenceNode

from pytest_hilfarm.description.yamlnodes import Ctx, closest, describe, fields, scalar
from pytest_hilfarm.esp.chips import parse_revision

SIM_KEY = "sim"
VIRTUAL_FLASH_MB = (2, 4, 8, 16)  # what the JEDEC table of the virtual flash chip offers
DEFAULT_FLASH_SIZE = 4 << 20
_SECURITY_FIELDS = ("secure_boot", "key_digests", "secure_version", "anti_rollback",
                    "signed_apps", "rollback")
_CHIP_FIELDS = ("revision", "mac", "flash_size")
SIM_FIELDS = _SECURITY_FIELDS + _CHIP_FIELDS
_FLAGS = ("secure_boot", "anti_rollback", "signed_apps", "rollback")
_DIGEST_HINT = "get one with `hilfarm ota digest KEY`"


@dataclass(frozen=True)
class BoardSecurity:
    """A board's ``sim:`` security keys: eFuses to burn at start, and the bootloader's options.

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
class SimSpec:
    """A virtual board's whole ``sim:`` section, checked (``None``: not given)."""

    security: BoardSecurity | None = None
    revision: int | None = None  # major * 100 + minor; None: the chip's current silicon
    mac: bytes | None = None  # None: derived from the board id
    flash_size: int | None = None  # bytes; None: the board's flash.size (else 4MB)


def parse_sim(ctx: Ctx, node: Node, path: str) -> SimSpec:
    """Check a board's ``sim:`` mapping (``path`` is its key path, ``boards[N].sim``)."""
    entries = fields(ctx, node, path, SIM_FIELDS,
                     'a mapping, e.g. sim: {revision: "v0.4", secure_boot: true, '
                     'key_digests: [...]}')
    unknown = sorted(set(entries) - set(SIM_FIELDS))
    if unknown:
        guess = closest(unknown[0], SIM_FIELDS)
        hint = f"did you mean {guess!r}? " if guess else ""
        raise ctx.error(entries[unknown[0]][0], path, f"unknown key(s) {', '.join(unknown)}",
                        hint=f"{hint}use {', '.join(SIM_FIELDS)} (docs/virtual-rack.md)")
    # A key with an empty value counts as not given (the security set-up, though, exists as
    # soon as one of its keys is written, as before).
    given = {key: value for key, (_k, value) in entries.items() if not _empty(ctx, value)}
    flash_size = None
    if "flash_size" in given:
        flash_size = flash_bytes(ctx, given["flash_size"], f"{path}.flash_size")
    security = (_security(ctx, given, path)
                if any(key in entries for key in _SECURITY_FIELDS) else None)
    return SimSpec(security=security,
                   revision=_revision(ctx, given.get("revision"), f"{path}.revision"),
                   mac=_mac(ctx, given.get("mac"), f"{path}.mac"), flash_size=flash_size)


def _empty(ctx: Ctx, node: Node) -> bool:
    return isinstance(node, ScalarNode) and ctx.constructor.construct_object(node) is None


def flash_bytes(ctx: Ctx, node: Node, path: str) -> int:
    """A flash size the virtual flash chip offers (2MB, 4MB, 8MB, 16MB; MB may be left out)."""
    value = scalar(ctx, node, path, "a flash size like 4MB")
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*(MB|M|MiB)?\s*", str(value), re.IGNORECASE)
        if not m:
            raise ctx.error(node, path, f"flash size {value!r} is not understood",
                            hint="write it as 2MB, 4MB, 8MB or 16MB")
        size = int(m.group(1)) << 20 if m.group(2) or int(m.group(1)) <= 16 else int(m.group(1))
    if size < (1 << 20) or size >> 20 not in VIRTUAL_FLASH_MB or size & ((1 << 20) - 1):
        raise ctx.error(node, path, f"flash size {value!r} is not offered by the virtual flash "
                        "chip", hint="use 2MB, 4MB, 8MB or 16MB")
    return size


def _revision(ctx: Ctx, node: Node | None, path: str) -> int | None:
    if node is None:
        return None
    value = scalar(ctx, node, path, 'a chip revision like "v0.4"')
    try:
        return parse_revision(value)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ctx.error(node, path, str(exc),
                        hint='write it as vMAJOR.MINOR, e.g. revision: "v0.4"') from None


def _hex_bytes(text: str, *separators: str) -> bytes:
    for sep in separators:
        text = text.replace(sep, "")
    try:
        return bytes.fromhex(text.strip().lower())
    except ValueError:
        return b""


def _mac(ctx: Ctx, node: Node | None, path: str) -> bytes | None:
    if node is None:
        return None
    value = scalar(ctx, node, path, 'a MAC address like "58:cf:79:00:00:01"')
    mac = _hex_bytes(str(value), ":", "-")
    if len(mac) != 6:
        raise ctx.error(node, path, f"mac {value!r} is not six hex bytes",
                        hint='e.g. mac: "58:cf:79:00:00:01" (quote it: YAML reads some '
                             'colon-separated numbers as base-60 integers)')
    if mac[0] & 1:
        raise ctx.error(node, path, f"mac {value!r} is a multicast address; a chip's base MAC "
                        "is unicast", hint="clear bit 0 of the first byte")
    return mac


def _security(ctx: Ctx, given: dict[str, Node], path: str) -> BoardSecurity:
    flags: dict[str, bool | None] = {}
    for key in _FLAGS:
        value = scalar(ctx, given[key], f"{path}.{key}", "true or false") \
            if key in given else None
        if value is not None and not isinstance(value, bool):
            raise ctx.error(given[key], path, f"{key} must be true or false, not {value!r}")
        flags[key] = value
    version: int | None = None
    if "secure_version" in given:
        value = scalar(ctx, given["secure_version"], f"{path}.secure_version", "a number")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ctx.error(given["secure_version"], path,
                            f"secure_version must be a whole number >= 0, not {value!r}")
        version = value
    digests = _digests(ctx, given.get("key_digests"), path)
    if flags["secure_boot"] and not digests:
        raise ctx.error(given["secure_boot"], path, "secure_boot: true needs at least one key "
                        "digest (nothing would boot)", hint="add key_digests: [HEX]")
    return BoardSecurity(secure_boot=flags["secure_boot"], key_digests=digests,
                         secure_version=version, anti_rollback=flags["anti_rollback"],
                         signed_apps=flags["signed_apps"], rollback=flags["rollback"])


def _digests(ctx: Ctx, node: Node | None, path: str) -> tuple[bytes, ...]:
    if node is None:
        return ()
    if not isinstance(node, SequenceNode):
        raise ctx.error(node, path, "key_digests must be a list of 64-hex-digit key digests, "
                        f"got {describe(ctx, node)}", hint=_DIGEST_HINT)
    digests: list[bytes] = []
    for item in node.value:
        # The text as written: an all-digit digest would otherwise lose its leading zeros.
        text = item.value if isinstance(item, ScalarNode) else ""
        digest = _hex_bytes(str(text), ":", " ")
        if len(digest) != 32:
            raise ctx.error(item, path, f"key digest {text!r} is not 64 hex digits",
                            hint=_DIGEST_HINT)
        digests.append(digest)
    return tuple(digests)
