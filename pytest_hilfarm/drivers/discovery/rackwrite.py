"""Write discovered boards into a rack file, or merge them into one a person already wrote.

The file is edited as a round-trip YAML document (ruamel.yaml), so every comment, key order,
quoting style and board id a person wrote survives; new boards are appended with a comment that
says where they were found. Boards are identified by USB serial number or physical USB path,
never by ``/dev/ttyUSBn`` (which changes on every re-enumeration). The result is checked with
the rack loader before the file is replaced (atomically), so a merge never leaves a rack file
that does not load.

Must not: rename or remove a board, overwrite a value a person set (a disagreement is reported,
not "fixed"), open ports or switch power.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pytest_hilfarm.description.rack import RackSpec, parse_rack
from pytest_hilfarm.drivers.discovery.udev import Adapter, ProbeResult, match_rack
from pytest_hilfarm.errors import ConfigError, UsageError
from pytest_hilfarm.esp.chips import FARM_CHIPS

# A chip a probe could not tell: the rack needs one of FARM_CHIPS, so a guess is written with a
# comment that says so. The USB-Serial/JTAG (303a:1001) is built into the ESP32-C3 alone among
# the chips racks support (ESP32-C3 TRM, "USB Serial/JTAG Controller"), so that guess is sound.
_GUESS_COMMENT = ("not probed: the chip is a guess; check it or run "
                  "`hilfarm discover --probe --write`")
_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")
# The first key nested under a top-level key: its indent is the file's mapping indent.
_NESTED_KEY = re.compile(r"^[A-Za-z_][^:\n#]*:[ \t]*(?:#.*)?\n(?:[ \t]*(?:#.*)?\n)*( +)[A-Za-z_]",
                         re.MULTILINE)

UpdateAction = Literal["added", "power-added", "unchanged", "conflict", "skipped"]


@dataclass(frozen=True)
class DiscoveredBoard:
    """An adapter found on the rig, with what probing and power mapping learned about it."""

    adapter: Adapter
    probe: ProbeResult | None = None
    power: tuple[str, int] | None = None  # uhubctl (hub location, port)


@dataclass(frozen=True)
class BoardUpdate:
    """What the write did for one adapter."""

    board_id: str | None
    action: UpdateAction
    detail: str
    adapter: Adapter | None = None


@dataclass(frozen=True)
class WriteReport:
    path: Path
    created: bool
    changed: bool
    updates: tuple[BoardUpdate, ...]


def _yaml(text: str | None) -> Any:
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    # Long /dev/serial/by-id paths must stay on one line: a folded scalar is legal YAML but
    # reads like a different value to a person grepping for it.
    yaml.width = 4096
    # The layout of rack-configs/*.example.yaml ("  - id: ..." under "boards:"), unless the
    # file already has block lists laid out another way: then theirs, so a merge re-indents
    # nothing a person wrote.
    mapping, sequence, offset = 2, 4, 2
    if text:
        from ruamel.yaml.util import load_yaml_guess_indent

        _data, guessed, guessed_offset = load_yaml_guess_indent(text)
        if guessed is not None and guessed_offset is not None:
            sequence, offset = guessed, guessed_offset
            mapping = sequence - offset if offset else sequence
        elif (nested := _NESTED_KEY.search(text)) is not None:
            mapping = len(nested.group(1))
            sequence, offset = mapping + 2, mapping
    yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
    return yaml


def _flow(mapping: Mapping[str, object]) -> Any:
    from ruamel.yaml.comments import CommentedMap

    node = CommentedMap(mapping)
    node.fa.set_flow_style()
    return node


def _quoted(text: str) -> Any:
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    return DoubleQuotedScalarString(text)


def _hub_value(hub: str) -> Any:
    # A root hub is named by its bus number ("1"): unquoted, YAML would read the number 1 and
    # the rack loader would refuse it.
    return _quoted(hub) if hub.isdigit() else hub


def power_mapping(hub: str, port: int) -> Any:
    """The ``power:`` value for a uhubctl port, as a one-line flow mapping."""
    return _flow({"driver": "uhubctl", "hub": _hub_value(hub), "port": port})


def choose_identity(adapter: Adapter, adapters: Sequence[Adapter],
                    taken_serials: Iterable[str] = ()) -> tuple[str, str]:
    """The rack key and value that identify ``adapter`` for good: ``usb_serial`` or ``usb_path``.

    The serial number is preferred (it follows the board to another hub port) when it is unique:
    clones share serials ("0001") or have none, and the ports of an FT2232 share one, so those
    are identified by their physical path (with the interface for a multi-port chip).
    """
    same_device = [a for a in adapters if a.usb_path == adapter.usb_path]
    if len(same_device) > 1:
        return "usb_path", adapter.port_path
    serial = adapter.usb_serial
    if serial:
        sharing = [a for a in adapters if a.usb_serial == serial]
        if len(sharing) == 1 and serial not in set(taken_serials):
            return "usb_serial", serial
    return "usb_path", adapter.usb_path


def new_board_id(prefix: str, taken: Iterable[str]) -> str:
    """The first free id ``prefix-N`` (N from 1), e.g. ``esp32-4``."""
    used = set(taken)
    number = 1
    while f"{prefix}-{number}" in used:
        number += 1
    return f"{prefix}-{number}"


def _chip_for(found: DiscoveredBoard) -> tuple[str | None, bool]:
    """(chip for the rack, guessed?); chip None: the probe found a chip racks cannot hold."""
    if found.probe is not None:
        return found.probe.chip, False
    return ("esp32c3" if found.adapter.kind == "usb-serial-jtag" else "esp32"), True


def _origin_comment(found: DiscoveredBoard, when: str) -> str:
    adapter = found.adapter
    text = (f"added by hilfarm discover {when}: {adapter.product or adapter.kind} "
            f"[{adapter.vid_pid}] at USB {adapter.port_path}, seen as {adapter.device_node}")
    if found.probe is not None:
        text += f"\n{found.probe.description or found.probe.chip_name}, MAC {found.probe.mac}"
    return text


def merge_boards(text: str | None, found: Sequence[DiscoveredBoard], *, source: str,
                 base_dir: Path, name: str | None = None,
                 now: datetime | None = None) -> tuple[str, tuple[BoardUpdate, ...]]:
    """Merge ``found`` into rack YAML ``text`` (None: a new rack) and return the new text.

    The returned text is checked with the rack loader. ``source`` names the file in errors.
    """
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.error import YAMLError

    yaml = _yaml(text)
    when = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%d")
    try:
        data = yaml.load(text) if text and text.strip() else None
    except YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", where=source,
                          hint="fix the file (or move it away) and run discover again") from exc
    if data is None:
        data = CommentedMap()
        data["version"] = 1
        data["name"] = name or "rig"
        data.yaml_set_start_comment(
            f"Rack file written by `hilfarm discover --write` on {when}.\n"
            "Edit it freely: later runs keep your comments, keys and board ids and only add\n"
            "boards they have not seen (by USB serial number or USB path) and missing power:.")
    if not isinstance(data, CommentedMap):
        raise ConfigError("a rack file must be a mapping (version, name, boards)",
                          where=source, hint="see rack-configs/esp32-mesh-rig.example.yaml")
    boards = data.get("boards")
    if boards is None:
        boards = data["boards"] = CommentedSeq()
    if not isinstance(boards, CommentedSeq):
        raise ConfigError("boards: expected a list of boards", where=source,
                          hint="write each board as a list item: '- id: esp32-1'")

    existing: RackSpec | None = None
    if len(boards):
        # Match against the person's boards only if the file is sound: merging into a file
        # that does not load would hide its error under ours.
        existing = parse_rack(text or "", source, base_dir=base_dir)
    adapters = [f.adapter for f in found]
    matches = match_rack(adapters, existing)
    taken_ids = {str(b.get("id")) for b in boards if isinstance(b, Mapping)}
    taken_serials = {b.port.value for b in existing.boards
                     if b.port.kind == "usb_serial"} if existing else set()
    by_id = {str(b.get("id")): b for b in boards if isinstance(b, Mapping)}

    updates: list[BoardUpdate] = []
    for item in found:
        adapter = item.adapter
        hits = matches.get(adapter, ())
        if len(hits) > 1:
            ids = ", ".join(h.board_id for h in hits)
            updates.append(BoardUpdate(None, "conflict", f"{adapter.describe()} is boards {ids} "
                                       "at once; left as it is (keep one of them)", adapter))
            continue
        if hits:
            updates.append(_update_existing(by_id[hits[0].board_id], hits[0].board_id, item,
                                            existing))
            continue
        chip, guessed = _chip_for(item)
        if chip is None:
            assert item.probe is not None
            updates.append(BoardUpdate(None, "skipped", f"{adapter.describe()}: chip "
                                       f"{item.probe.chip_name} is not one racks support "
                                       f"({', '.join(FARM_CHIPS)}); not added", adapter))
            continue
        board_id = new_board_id("unknown" if guessed else chip, taken_ids)
        taken_ids.add(board_id)
        key, value = choose_identity(adapter, adapters, taken_serials)
        if key == "usb_serial":
            taken_serials.add(value)
        board = CommentedMap()
        board["id"] = board_id
        board["chip"] = chip
        if guessed:
            board.yaml_add_eol_comment(_GUESS_COMMENT, "chip")
        board[key] = _quoted(value) if key == "usb_serial" else value
        if adapter.kind == "usb-serial-jtag" and chip == "esp32c3":
            # No bridge chip, so no DTR/RTS auto-reset circuit: esptool resets it through the
            # USB-Serial/JTAG peripheral, and the rack says so.
            board["reset"] = "usb-jtag"
        if item.power is not None:
            board["power"] = power_mapping(*item.power)
        boards.append(board)
        indent = _item_indent(yaml)
        boards.yaml_set_comment_before_after_key(len(boards) - 1,
                                                 before=_origin_comment(item, when),
                                                 indent=indent)
        by_id[board_id] = board
        updates.append(BoardUpdate(board_id, "added", f"{adapter.describe()} as {key} "
                                   f"{value}", adapter))

    out = io.StringIO()
    yaml.dump(data, out)
    new_text = out.getvalue()
    try:
        parse_rack(new_text, source, base_dir=base_dir)
    except ConfigError as exc:  # pragma: no cover - a bug here, not in the user's file
        raise ConfigError(f"the merged rack would not load ({exc.what}); nothing written",
                          where=source, hint="report this as a hilfarm bug, with the file") \
            from exc
    return new_text, tuple(updates)


def _item_indent(yaml: Any) -> int:
    # Comments before a list item line up with its dash.
    offset = getattr(yaml, "sequence_dash_offset", 2)
    return int(offset or 0)


def _update_existing(board: Any, board_id: str, item: DiscoveredBoard,
                     rack: RackSpec | None) -> BoardUpdate:
    adapter = item.adapter
    notes: list[str] = []
    spec = rack.board(board_id) if rack is not None else None
    if item.probe is not None and spec is not None and item.probe.chip not in (None, spec.chip):
        notes.append(f"the rack says chip {spec.chip}, the probe found {item.probe.chip_name}; "
                     "left as written: check the board")
    if item.power is not None:
        hub, port = item.power
        if "power" not in board:
            board["power"] = power_mapping(hub, port)
            text = f"power: uhubctl hub {hub} port {port} (measured)"
            return BoardUpdate(board_id, "power-added", "; ".join([text, *notes]), adapter)
        if spec is not None and (spec.power.driver != "uhubctl"
                                 or str(spec.power.params.get("hub")) != hub
                                 or spec.power.params.get("port") != port):
            notes.append(f"switching uhubctl hub {hub} port {port} cut this board's power, but "
                         f"the rack says power {spec.power.driver} "
                         f"{dict(spec.power.params) or ''}; left as written: check the cabling")
    if notes:
        return BoardUpdate(board_id, "conflict", "; ".join(notes), adapter)
    return BoardUpdate(board_id, "unchanged", f"already in the rack ({adapter.describe()})",
                       adapter)


def write_rack(path: str | os.PathLike[str], found: Sequence[DiscoveredBoard], *,
               name: str | None = None, now: datetime | None = None) -> WriteReport:
    """Create ``path`` with the discovered boards, or merge them into it; report what changed.

    The file is replaced atomically (a temporary file renamed over it), keeping its mode.
    """
    file = Path(path)
    try:
        text: str | None = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the rack file: {exc}", where=str(file),
                          hint="check the path and its permissions") from exc
    if not found and text is None:
        raise UsageError("no USB serial adapters found, so there is nothing to write",
                         where=str(file), hint="plug the boards in (and power their hub), "
                         "then check `hilfarm discover` lists them")
    rack_name = name or _NAME_BAD.sub("-", file.stem.removesuffix(".rack")).strip("-.") or "rig"
    new_text, updates = merge_boards(text, found, source=str(file),
                                     base_dir=file.absolute().parent, name=rack_name, now=now)
    changed = new_text != text
    if changed:
        _replace(file, new_text)
    return WriteReport(file, text is None, changed, updates)


def _replace(file: Path, text: str) -> None:
    directory = file.absolute().parent
    try:
        mode = file.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise ConfigError(f"cannot write next to the rack file: {exc.strerror}",
                          where=str(file), hint="check the folder exists and is writable") \
            from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

