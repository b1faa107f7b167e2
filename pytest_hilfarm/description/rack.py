"""Rack files: a versioned YAML description of a rig, checked and turned into frozen records.

This module only describes a rack: it never opens a port, touches a lock, resolves a USB serial
number or checks that an image exists (drivers and the farm do that, later and on demand). Every
mistake in a rack file is reported as a :class:`~pytest_hilfarm.errors.ConfigError` that names the
file, the line, the key path (``boards[2].power.hub``), the bad value and what was expected.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from pytest_hilfarm.errors import ConfigError
from pytest_hilfarm.esp.chips import CHIPS as CHIP_TABLE
from pytest_hilfarm.esp.chips import FARM_CHIPS

RACK_VERSION = 1
RESETS = ("classic", "usb-jtag", "virtual", "none")
POWER_DRIVERS = ("uhubctl", "gpio", "http", "virtual", "none")
FLASH_MODES = ("qio", "qout", "dio", "dout", "keep")
FLASH_SIZES = ("2MB", "4MB", "8MB", "16MB", "detect", "keep")
# The SPI flash clocks that ESP32, ESP32-S2 and ESP32-C3 all accept (esptool --flash_freq).
FLASH_FREQS = ("80m", "40m", "26m", "20m", "keep")
DEFAULT_BAUD = 921600
# Keys a rack file may set in its ``settings:`` section; their values are checked by
# settings.resolve, which names this file and line when one is wrong.
RACK_SETTING_KEYS = ("lock_timeout", "boot_timeout", "infra_retries", "no_flash", "addr2line")

PortKind = Literal["path", "url", "usb_serial", "usb_path", "virtual"]

_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
# A USB physical path as the kernel names it: bus-port[.port...], e.g. 1-1.2 (optionally with
# the :config.interface suffix, e.g. 1-1.2:1.0).
_USB_PATH_RE = re.compile(r"\d+-\d+(\.\d+)*(:\d+\.\d+)?")
# Linux limits interface names to 15 bytes (IFNAMSIZ - 1) without '/' or whitespace.
# uhubctl hub locations: a root hub is its bus number ("2"), other hubs a bus-port path.
_HUB_RE = re.compile(r"\d+(-\d+(\.\d+)*)?")
_IFACE_RE = re.compile(r"[A-Za-z0-9._:@-]{1,15}")
_COM_RE = re.compile(r"COM\d+", re.IGNORECASE)
_URL_SCHEMES = ("rfc2217", "socket")

# network_profiles is read (and checked, with file and line) by description.network.load_profiles
# when a test asks for network conditions; the rack loader only admits the key.
_TOP_KEYS = ("version", "name", "lock_dir", "state_dir", "backend", "baseline", "settings", "nvs",
             "network_profiles", "boards")
# sim: the virtual board's eFuse / secure boot settings and its chip revision, MAC and flash
# size, read and checked by description.virtual (the virtual rack's view, docs/virtual-rack.md);
# the farm's loader only checks it is a mapping on a virtual board.
_BOARD_KEYS = ("id", "chip", "port", "usb_serial", "usb_path", "reset", "power", "flash",
               "features", "baseline", "interface", "sim", "nvs")
_PORT_KEYS = ("port", "usb_serial", "usb_path")
_FLASH_KEYS = ("baud", "mode", "size", "freq")
_POWER_KEYS = {
    "uhubctl": (("hub", "port"), ()),
    "gpio": (("chip", "line"), ("active_low",)),
    "http": (("on", "off"), ("status",)),
}


def closest(word: str, choices: Iterable[str]) -> str | None:
    """Return the choice most like ``word`` (for "did you mean"), or None if none is close."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


@dataclass(frozen=True)
class Location:
    """A place in a rack file (line numbers start at 1, as editors show them)."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class PortSpec:
    """Where a board's serial port is; resolving it to a device is the drivers' job.

    ``kind`` is ``path`` (/dev/serial/by-id/...), ``url`` (``rfc2217://host:port`` or
    ``socket://host:port``), ``usb_serial`` / ``usb_path`` (looked up through pyudev) or
    ``virtual`` (the virtual rack board of the same id; its URL comes from the daemon).
    """

    kind: PortKind
    value: str


@dataclass(frozen=True)
class PowerSpec:
    """How a board's power is switched: a driver name and its checked parameters.

    ``params`` is read-only. It is left out of the hash (a mapping proxy cannot be hashed);
    equality still compares it.
    """

    driver: str
    params: Mapping[str, object] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )


@dataclass(frozen=True)
class FlashSpec:
    """How esptool talks to a board's flash (``keep`` leaves the image header as built)."""

    baud: int = DEFAULT_BAUD
    mode: str = "keep"
    size: str = "keep"
    freq: str = "keep"


@dataclass(frozen=True)
class BaselineSpec:
    """A known-good image (file, ESP-IDF build dir or flasher_args.json) for health checks."""

    path: Path
    where: Location


@dataclass(frozen=True)
class NvsSpec:
    """Per-board NVS data: a CSV template for Espressif's NVS partition generator, the
    partition it fills, and values for its placeholders ({board_id}, {mac}, {chip}, ...).
    """

    csv: Path | None
    partition: str | None
    values: Mapping[str, str] = field(hash=False)
    where: Location

    def over(self, base: NvsSpec | None) -> NvsSpec:
        """A board's spec (this one) on top of the rack-wide ``base``."""
        if base is None:
            return self
        return NvsSpec(self.csv or base.csv, self.partition or base.partition,
                       MappingProxyType({**base.values, **self.values}), self.where)


@dataclass(frozen=True)
class BoardSpec:
    """One board of a rack, as the rack file describes it."""

    id: str
    chip: str
    port: PortSpec
    reset: str
    power: PowerSpec
    flash: FlashSpec
    features: frozenset[str]
    baseline: BaselineSpec | None
    where: Location
    # Kept for the later network-conditions feature; nothing uses it yet.
    interface: str | None = None
    nvs: NvsSpec | None = None  # this board's own NVS data (over the rack-wide one)
    # reset: custom: esptool-syntax DTR/RTS sequences (download, app; app None = hard reset)
    reset_sequences: tuple[str, str | None] | None = None

    @property
    def is_virtual(self) -> bool:
        return self.port.kind == "virtual"


@dataclass(frozen=True)
class RackSetting:
    """A raw value from a rack file's ``settings:`` section and where it was written."""

    value: object
    where: Location


@dataclass(frozen=True)
class RackSpec:
    """A whole rack: its boards, baselines, and where its locks and state live.

    ``path`` is None when the rack was parsed from text that has no file.
    """

    name: str
    version: int
    path: Path | None
    lock_dir: Path
    state_dir: Path
    backend: str | None
    baselines: Mapping[str, BaselineSpec] = field(hash=False)
    boards: tuple[BoardSpec, ...]
    settings: Mapping[str, RackSetting] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    nvs: NvsSpec | None = None  # NVS data for every board (a board's own nvs: goes over it)

    def nvs_for(self, board: BoardSpec) -> NvsSpec | None:
        """The NVS data to write on ``board`` (None: none), with a CSV to fill."""
        spec = board.nvs.over(self.nvs) if board.nvs is not None else self.nvs
        return spec if spec is not None and spec.csv is not None else None

    @property
    def is_virtual(self) -> bool:
        """True when every board is a virtual rack board."""
        return all(board.is_virtual for board in self.boards)

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else "<rack>"

    def board(self, board_id: str) -> BoardSpec:
        """The board with this id; a ConfigError with a "did you mean" if there is none."""
        for board in self.boards:
            if board.id == board_id:
                return board
        ids = [board.id for board in self.boards]
        guess = closest(board_id, ids)
        hint = f"did you mean {guess!r}?" if guess else f"boards in this rack: {', '.join(ids)}"
        raise ConfigError(f"no board {board_id!r} in rack {self.name!r}", where=self.source,
                          hint=hint)

    def baseline_for(self, board: BoardSpec | str) -> BaselineSpec | None:
        """The board's own baseline if it has one, else its chip's, else None."""
        spec = self.board(board) if isinstance(board, str) else board
        if spec.baseline is not None:
            return spec.baseline
        return self.baselines.get(spec.chip)


def builtin_virtual_rack_path() -> Path:
    """The packaged copy of ``rack-configs/virtual.yaml`` (the default rack)."""
    return Path(__file__).resolve().parent.parent / "data" / "virtual.yaml"


def load_rack(path: str | os.PathLike[str], *,
              environ: Mapping[str, str] | None = None) -> RackSpec:
    """Read and check a rack file. Relative paths in it are taken from the file's folder.

    ``environ`` (default ``os.environ``) supplies HILFARM_STATE_DIR / XDG_STATE_HOME / HOME for
    the default lock and state directories.
    """
    file = Path(path)
    hint = ("give the path of an existing rack file (--hil-rack / HILFARM_RACK / hil_rack), "
            "or leave it unset for the built-in virtual rack")
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("rack file not found", where=str(file), hint=hint) from None
    except IsADirectoryError:
        raise ConfigError("rack file is a directory, not a file", where=str(file),
                          hint=hint) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"rack file is not UTF-8 text ({exc.reason} at byte {exc.start})",
                          where=str(file), hint="save it as UTF-8 YAML") from None
    except OSError as exc:
        raise ConfigError(f"cannot read rack file: {exc.strerror}", where=str(file),
                          hint="check the path and its permissions") from None
    return _parse(text, str(file), file.absolute().parent, environ, file)


def registered_board(record: Any) -> BoardSpec:
    """A rack-style BoardSpec for a board a rig host registered (a ``RegisteredBoard``).

    Its port is the board's ``rfc2217://`` URL (consoles; attach first unless the rig host runs
    with ``--open-serial``); power and reset say ``none`` because they go through the rig host's
    control API, which the board wiring (``RemoteWiring``) reaches for boards whose ``host`` is
    set.
    """
    return BoardSpec(
        id=record.board, chip=record.chip, port=PortSpec("url", record.port_url),
        reset="none", power=PowerSpec("none"), flash=FlashSpec(),
        features=frozenset(record.features), baseline=None,
        where=Location(f"farm database (rig host {record.host})", 0),
    )


def lists_boards(path: Path) -> bool:
    """Whether a rack file (checked or not) lists any board: a skeleton without boards is not.

    A file that cannot be read as YAML counts as listing boards, so the loader's error stands.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return True
    return not isinstance(data, dict) or bool(data.get("boards"))


def parse_rack(text: str, source_name: str = "<rack>", *, base_dir: Path | None = None,
               environ: Mapping[str, str] | None = None) -> RackSpec:
    """Check rack YAML given as text; ``source_name`` names it in errors.

    Relative paths are taken from ``base_dir`` (default: the current directory).
    """
    return _parse(text, source_name, base_dir if base_dir is not None else Path.cwd(), environ,
                  None)


# --- parsing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ctx:
    source: str
    base_dir: Path
    constructor: SafeConstructor

    def loc(self, node: Node) -> Location:
        return Location(self.source, node.start_mark.line + 1)

    def error(self, node: Node, path: str, what: str, hint: str | None = None) -> ConfigError:
        text = f"{path}: {what}" if path else what
        return ConfigError(text, where=str(self.loc(node)), hint=hint)


def _describe(ctx: _Ctx, node: Node) -> str:
    """How a bad value reads in an error: the value and, when it is no string, its type."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    value = ctx.constructor.construct_object(node, deep=True)
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, bool):
        return f"{node.value} (a boolean)"
    if isinstance(value, (int, float)):
        return f"{node.value} (a number)"
    if isinstance(value, str):
        return repr(value)
    return f"{node.value!r} (a {type(value).__name__})"


def _fields(ctx: _Ctx, node: Node, path: str, allowed: Collection[str],
            what: str) -> dict[str, tuple[ScalarNode, Node]]:
    """The entries of a mapping node by key, refusing non-mappings and duplicate keys."""
    if not isinstance(node, MappingNode):
        raise ctx.error(node, path, f"expected {what}, got {_describe(ctx, node)}")
    own = {id(key_node) for key_node, _value in node.value}
    # Resolve YAML merge keys (<<: *anchor) the way yaml.safe_load would: merged entries come
    # first and the mapping's own keys override them. A copy, because flattening rewrites the
    # node and an aliased node may be read again.
    flat = MappingNode(node.tag, list(node.value), node.start_mark, node.end_mark)
    ctx.constructor.flatten_mapping(flat)
    entries: dict[str, tuple[ScalarNode, Node]] = {}
    merged: set[str] = set()
    for key_node, value_node in flat.value:
        if not isinstance(key_node, ScalarNode):
            raise ctx.error(key_node, path or "top level",
                            f"keys must be names, got {_describe(ctx, key_node)}",
                            hint=f"allowed keys: {', '.join(allowed)}")
        # Keys are taken as written: YAML 1.1 would read the http power keys `on`/`off` as
        # booleans, and nobody means a number or a boolean as a key here.
        key = str(key_node.value)
        keypath = f"{path}.{key}" if path else key
        if id(key_node) not in own:
            merged.add(key)
        elif key in merged:
            merged.discard(key)
        elif key in entries:
            first = ctx.loc(entries[key][0]).line
            raise ctx.error(key_node, keypath, f"duplicate key (first given on line {first})",
                            hint="keep one of them")
        entries[key] = (key_node, value_node)
    return entries


def _check_keys(ctx: _Ctx, entries: Mapping[str, tuple[ScalarNode, Node]], path: str,
                allowed: Collection[str]) -> None:
    for key, (key_node, _value) in entries.items():
        if key not in allowed:
            guess = closest(key, allowed)
            hint = (f"did you mean {guess!r}?" if guess
                    else f"allowed keys here: {', '.join(allowed)}")
            keypath = f"{path}.{key}" if path else key
            raise ctx.error(key_node, keypath, "unknown key", hint=hint)


def _require(ctx: _Ctx, node: Node, entries: Mapping[str, object], path: str,
             keys: Iterable[str], hint: str | None = None) -> None:
    for key in keys:
        if key not in entries:
            raise ctx.error(node, path or "top level", f"missing required key {key!r}",
                            hint=hint)


def _scalar(ctx: _Ctx, node: Node, path: str, expected: str) -> object:
    if not isinstance(node, ScalarNode):
        raise ctx.error(node, path, f"expected {expected}, got {_describe(ctx, node)}")
    return ctx.constructor.construct_object(node, deep=True)


def _string(ctx: _Ctx, node: Node, path: str, expected: str,
            pattern: re.Pattern[str] | None = None, hint: str | None = None) -> str:
    value = _scalar(ctx, node, path, expected)
    key = path.rsplit(".", 1)[-1]
    if not isinstance(value, str):
        # YAML reads 0001 as 1 and 12:34:56 as a base-60 number; quoting keeps the text.
        quote = hint if value is None else f'quote it: {key}: "{node.value}"'
        raise ctx.error(node, path, f"expected {expected}, got {_describe(ctx, node)}",
                        hint=quote)
    if not value.strip() or (pattern is not None and not pattern.fullmatch(value)):
        raise ctx.error(node, path, f"expected {expected}, got {value!r}", hint=hint)
    return value


def _choice(ctx: _Ctx, node: Node, path: str, choices: Collection[str]) -> str:
    expected = "one of " + ", ".join(choices)
    value = _scalar(ctx, node, path, expected)
    if isinstance(value, str) and value in choices:
        return value
    guess = closest(str(value), choices) if value is not None else None
    hint = f"did you mean {guess!r}?" if guess else f"use {expected}"
    raise ctx.error(node, path, f"expected {expected}, got {_describe(ctx, node)}", hint=hint)


def _integer(ctx: _Ctx, node: Node, path: str, expected: str, low: int, high: int | None = None,
             hint: str | None = None) -> int:
    value = _scalar(ctx, node, path, expected)
    # bool is an int subclass in Python: `yes` must not pass as 1.
    if isinstance(value, int) and not isinstance(value, bool) and value >= low \
            and (high is None or value <= high):
        return value
    raise ctx.error(node, path, f"expected {expected}, got {_describe(ctx, node)}", hint=hint)


def _boolean(ctx: _Ctx, node: Node, path: str) -> bool:
    value = _scalar(ctx, node, path, "true or false")
    if isinstance(value, bool):
        return value
    raise ctx.error(node, path, f"expected true or false, got {_describe(ctx, node)}")


def _path(ctx: _Ctx, node: Node, path: str, expected: str) -> Path:
    text = _string(ctx, node, path, expected, hint="give a path, e.g. ./images/baseline.bin")
    result = Path(text).expanduser()
    return result if result.is_absolute() else ctx.base_dir / result


def _parse(text: str, source: str, base_dir: Path, environ: Mapping[str, str] | None,
           file: Path | None) -> RackSpec:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = " ".join(part for part in (exc.context, exc.problem) if part)
        raise ConfigError(f"malformed YAML: {problem}", where=where,
                          hint="check the indentation and quoting around that line") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed YAML: {exc}", where=source,
                          hint="check the file is a single YAML document") from None
    if root is None:
        raise ConfigError("rack file is empty", where=source,
                          hint="start it with 'version: 1', 'name:' and a 'boards:' list "
                               "(see rack-configs/esp32-mesh-rig.example.yaml)")
    ctx = _Ctx(source, base_dir, SafeConstructor())
    top = _fields(ctx, root, "", _TOP_KEYS, "a mapping with version, name and boards")

    # The version comes first: a newer format should be reported as such, not as unknown keys.
    _require(ctx, root, top, "", ["version"], hint=f"add 'version: {RACK_VERSION}' at the top")
    version_node = top["version"][1]
    version_value = _scalar(ctx, version_node, "version", f"{RACK_VERSION}")
    if type(version_value) is not int or version_value != RACK_VERSION:
        raise ctx.error(version_node, "version",
                        f"unsupported rack file version {_describe(ctx, version_node)}",
                        hint=f"this pytest-hilfarm reads version {RACK_VERSION}; "
                             "upgrade pytest-hilfarm or rewrite the file for version "
                             f"{RACK_VERSION}")
    _check_keys(ctx, top, "", _TOP_KEYS)
    _require(ctx, root, top, "", ["name", "boards"])

    name = _string(ctx, top["name"][1], "name", "a rack name of letters, digits, '.', '_', '-'",
                   _ID_RE, hint="the name is used as a directory name, e.g. name: mesh-rig")
    backend = None
    if "backend" in top:
        backend = _string(ctx, top["backend"][1], "backend", "a backend URL",
                          hint="e.g. backend: postgresql://farm@db/hilfarm")

    env = os.environ if environ is None else environ
    default_dir = _default_state_dir(name, env)
    state_dir = (_path(ctx, top["state_dir"][1], "state_dir", "a directory path")
                 if "state_dir" in top else default_dir)
    # Locks live with the state unless the rack says otherwise (e.g. on a local disk when the
    # state is on a share).
    lock_dir = (_path(ctx, top["lock_dir"][1], "lock_dir", "a directory path")
                if "lock_dir" in top else state_dir)

    baselines: dict[str, BaselineSpec] = {}
    if "baseline" in top:
        node = top["baseline"][1]
        entries = _fields(ctx, node, "baseline", FARM_CHIPS,
                          "a mapping of chip to image, e.g. {esp32: images/esp32-base.bin}")
        _check_keys(ctx, entries, "baseline", FARM_CHIPS)
        for chip, (_key, value_node) in entries.items():
            baselines[chip] = BaselineSpec(
                _path(ctx, value_node, f"baseline.{chip}", "an image path or build directory"),
                ctx.loc(value_node))

    settings: dict[str, RackSetting] = {}
    if "settings" in top:
        entries = _fields(ctx, top["settings"][1], "settings", RACK_SETTING_KEYS,
                          "a mapping of setting names to values")
        _check_keys(ctx, entries, "settings", RACK_SETTING_KEYS)
        for key, (_key, value_node) in entries.items():
            value = _scalar(ctx, value_node, f"settings.{key}", "a single value")
            settings[key] = RackSetting(value, ctx.loc(value_node))

    nvs = _parse_nvs(ctx, top["nvs"][1], "nvs") if "nvs" in top else None
    # A client of a multi-host farm may own no boards: rig hosts register theirs.
    boards = _parse_boards(ctx, top["boards"][1], allow_empty=backend is not None)
    if nvs is not None and nvs.csv is None:
        raise ctx.error(top["nvs"][1], "nvs", "the rack-wide nvs: needs a csv:",
                        hint="e.g. nvs: {csv: nvs/board.csv, values: {wifi_ssid: lab}}")
    return RackSpec(
        name=name, version=RACK_VERSION, path=file, lock_dir=lock_dir, state_dir=state_dir,
        backend=backend, baselines=MappingProxyType(baselines), boards=boards,
        settings=MappingProxyType(settings), nvs=nvs,
    )


_NVS_KEYS = ("csv", "partition", "values")


def _parse_nvs(ctx: _Ctx, node: Node, path: str) -> NvsSpec:
    entries = _fields(ctx, node, path, _NVS_KEYS,
                      "a mapping with csv, partition and values, e.g. {csv: nvs/board.csv}")
    _check_keys(ctx, entries, path, _NVS_KEYS)
    csv = (_path(ctx, entries["csv"][1], f"{path}.csv", "a CSV file path")
           if "csv" in entries else None)
    partition = (_string(ctx, entries["partition"][1], f"{path}.partition",
                         "a partition label, e.g. nvs") if "partition" in entries else None)
    values: dict[str, str] = {}
    if "values" in entries:
        value_entries = _fields(ctx, entries["values"][1], f"{path}.values", (),
                                "a mapping of placeholder names to values")
        for key, (_k, value_node) in value_entries.items():
            value = _scalar(ctx, value_node, f"{path}.values.{key}", "a single value")
            values[key] = str(value)
    return NvsSpec(csv, partition, MappingProxyType(values), ctx.loc(node))


def _default_state_dir(name: str, environ: Mapping[str, str]) -> Path:
    explicit = environ.get("HILFARM_STATE_DIR", "")
    if explicit:
        return Path(explicit).expanduser().absolute() / name
    xdg = environ.get("XDG_STATE_HOME", "")
    # The XDG base-dir spec says relative values are invalid and must be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "hilfarm" / name
    home = environ.get("HOME", "") or os.path.expanduser("~")
    return Path(home) / ".local" / "state" / "hilfarm" / name


def _parse_boards(ctx: _Ctx, node: Node, *, allow_empty: bool = False
                  ) -> tuple[BoardSpec, ...]:
    if not isinstance(node, SequenceNode):
        raise ctx.error(node, "boards", f"expected a list of boards, got {_describe(ctx, node)}",
                        hint="write each board as a list item: '- id: esp32-1'")
    if not node.value and not allow_empty:
        raise ctx.error(node, "boards", "the rack has no boards",
                        hint="add at least one board with id, chip and port")
    boards: list[BoardSpec] = []
    ids: dict[str, BoardSpec] = {}
    ports: dict[tuple[str, str], BoardSpec] = {}
    for index, item in enumerate(node.value):
        board = _parse_board(ctx, item, f"boards[{index}]")
        if board.id in ids:
            first = ids[board.id]
            raise ctx.error(item, f"boards[{index}].id",
                            f"duplicate board id {board.id!r} (first used on line "
                            f"{first.where.line})", hint="give every board its own id")
        ids[board.id] = board
        identity = _port_identity(board.port)
        if identity is not None:
            if identity in ports:
                other = ports[identity]
                raise ctx.error(item, f"boards[{index}].{_port_key(board.port)}",
                                f"board {board.id!r} uses the same port {board.port.value!r} as "
                                f"board {other.id!r} (line {other.where.line})",
                                hint="each board needs its own port; check the cabling and "
                                     "the by-id names")
            ports[identity] = board
        boards.append(board)
    return tuple(boards)


def _port_key(port: PortSpec) -> str:
    return port.kind if port.kind in ("usb_serial", "usb_path") else "port"


def _port_identity(port: PortSpec) -> tuple[str, str] | None:
    """What makes two ports the same port (virtual boards are told apart by their id)."""
    if port.kind == "virtual":
        return None
    if port.kind == "path":
        return ("path", os.path.normpath(port.value))
    if port.kind == "url":
        parts = urlsplit(port.value)
        return ("url", f"{parts.scheme}://{(parts.hostname or '').lower()}:{parts.port}")
    return (port.kind, port.value)


def _parse_board(ctx: _Ctx, node: Node, path: str) -> BoardSpec:
    entries = _fields(ctx, node, path, _BOARD_KEYS, "a board mapping with id, chip and port")
    _check_keys(ctx, entries, path, _BOARD_KEYS)
    _require(ctx, node, entries, path, ["id", "chip"])
    board_id = _string(ctx, entries["id"][1], f"{path}.id",
                       "a board id of letters, digits, '.', '_', '-'", _ID_RE,
                       hint="e.g. id: esp32-1")
    chip = _choice(ctx, entries["chip"][1], f"{path}.chip", FARM_CHIPS)

    given = [key for key in _PORT_KEYS if key in entries]
    if not given:
        raise ctx.error(node, path, f"board {board_id!r} has no port",
                        hint="give exactly one of port, usb_serial, usb_path")
    if len(given) > 1:
        raise ctx.error(entries[given[1]][0], f"{path}.{given[1]}",
                        f"board {board_id!r} gives both {given[0]} and {given[1]}",
                        hint="give exactly one of port, usb_serial, usb_path")
    port = _parse_port(ctx, given[0], entries[given[0]][1], f"{path}.{given[0]}")

    sequences: tuple[str, str | None] | None = None
    if "reset" in entries:
        reset_node = entries["reset"][1]
        if isinstance(reset_node, MappingNode):
            reset, sequences = "custom", _parse_reset_sequences(ctx, reset_node, f"{path}.reset")
        else:
            reset = _choice(ctx, reset_node, f"{path}.reset", RESETS)
        _check_reset(ctx, reset_node, f"{path}.reset", reset, port, chip)
    else:
        reset = _default_reset(port)

    if "power" in entries:
        power = _parse_power(ctx, entries["power"][1], f"{path}.power", port)
    else:
        power = PowerSpec("virtual" if port.kind == "virtual" else "none")

    flash = FlashSpec()
    if "flash" in entries:
        flash = _parse_flash(ctx, entries["flash"][1], f"{path}.flash")

    features: frozenset[str] = frozenset()
    if "features" in entries:
        features = _parse_features(ctx, entries["features"][1], f"{path}.features")

    baseline = None
    if "baseline" in entries:
        value_node = entries["baseline"][1]
        baseline = BaselineSpec(_path(ctx, value_node, f"{path}.baseline",
                                      "an image path or build directory"), ctx.loc(value_node))

    interface = None
    if "interface" in entries:
        interface = _string(ctx, entries["interface"][1], f"{path}.interface",
                            "a network interface name (up to 15 characters)", _IFACE_RE,
                            hint="e.g. interface: enx00e04c680001")

    if "sim" in entries:
        sim_node = entries["sim"][1]
        if not isinstance(sim_node, MappingNode):
            raise ctx.error(sim_node, f"{path}.sim",
                            f"expected a mapping, got {_describe(ctx, sim_node)}",
                            hint='e.g. sim: {revision: "v0.4", secure_boot: true, '
                                 'key_digests: [...]}')
        if port.kind != "virtual":
            raise ctx.error(sim_node, f"{path}.sim", "sim: applies to virtual boards only",
                            hint="remove it, or use port: virtual")

    nvs = _parse_nvs(ctx, entries["nvs"][1], f"{path}.nvs") if "nvs" in entries else None
    return BoardSpec(id=board_id, chip=chip, port=port, reset=reset, power=power, flash=flash,
                     features=features, baseline=baseline, where=ctx.loc(node),
                     interface=interface, nvs=nvs, reset_sequences=sequences)


def _parse_port(ctx: _Ctx, key: str, node: Node, path: str) -> PortSpec:
    if key == "usb_serial":
        value = _string(ctx, node, path, "a USB serial number", hint='e.g. usb_serial: "0001"')
        return PortSpec("usb_serial", value)
    if key == "usb_path":
        value = _string(ctx, node, path, "a USB physical path like 1-1.2", _USB_PATH_RE,
                        hint="find it with 'udevadm info /dev/ttyUSB0 | grep DEVPATH' "
                             "(the bus-port part, e.g. 1-1.2)")
        return PortSpec("usb_path", value)
    port_hint = ("use a device path (/dev/serial/by-id/...), rfc2217://HOST:PORT, "
                 "socket://HOST:PORT or the word virtual")
    value = _string(ctx, node, path, "a port", hint=port_hint)
    if value == "virtual":
        return PortSpec("virtual", value)
    if "://" in value:
        parts = urlsplit(value)
        if parts.scheme not in _URL_SCHEMES:
            guess = closest(parts.scheme, _URL_SCHEMES)
            hint = f"did you mean {guess}://?" if guess else port_hint
            raise ctx.error(node, path, f"unsupported port URL scheme {parts.scheme!r} in "
                            f"{value!r}", hint=hint)
        try:
            port_number = parts.port
        except ValueError:
            port_number = None
        if not parts.hostname or port_number is None or not 0 < port_number < 65536:
            raise ctx.error(node, path, f"expected {parts.scheme}://HOST:PORT, got {value!r}",
                            hint=f"e.g. {parts.scheme}://rig-host.local:4000")
        return PortSpec("url", value)
    if value.startswith("/") or _COM_RE.fullmatch(value):
        return PortSpec("path", value)
    raise ctx.error(node, path, f"expected a port, got {value!r}", hint=port_hint)


def _default_reset(port: PortSpec) -> str:
    if port.kind == "virtual":
        return "virtual"
    if port.kind == "url" and port.value.startswith("socket://"):
        # A raw TCP socket carries no modem lines, so DTR/RTS reset is impossible.
        return "none"
    return "classic"


_SEQUENCE_KEYS = ("download", "app")


def check_sequence(sequence: str) -> str | None:
    """Why ``sequence`` is not a valid reset sequence (esptool's syntax), or None."""
    from esp_pylib.serial_reset import parse_custom_reset_sequence

    try:
        steps = parse_custom_reset_sequence(sequence)
    except ValueError as exc:
        return str(exc)
    return None if steps else "the sequence is empty"


def _parse_reset_sequences(ctx: _Ctx, node: Node, path: str) -> tuple[str, str | None]:
    """``reset: {download: SEQ, app: SEQ}`` in esptool's custom reset-sequence syntax."""
    entries = _fields(ctx, node, path, _SEQUENCE_KEYS,
                      'a reset name, or DTR/RTS sequences {download: "D0|R1|W0.1|D1|R0|W0.05|D0"'
                      ', app: "..."}')
    _check_keys(ctx, entries, path, _SEQUENCE_KEYS)
    _require(ctx, node, entries, path, ["download"])
    sequences: dict[str, str] = {}
    for key, (_k, value_node) in entries.items():
        text = _string(ctx, value_node, f"{path}.{key}", "a reset sequence",
                       hint='esptool\'s syntax: D<0|1>, R<0|1>, U<dtr>,<rts>, W<seconds>, joined '
                            'by |, e.g. "D0|R1|W0.1|D1|R0|W0.05|D0"')
        problem = check_sequence(text)
        if problem is not None:
            raise ctx.error(value_node, f"{path}.{key}", problem,
                            hint='esptool\'s syntax: D<0|1>, R<0|1>, U<dtr>,<rts>, W<seconds>, '
                                 'joined by |, e.g. "D0|R1|W0.1|D1|R0|W0.05|D0"')
        sequences[key] = text
    return sequences["download"], sequences.get("app")


def _check_reset(ctx: _Ctx, node: Node, path: str, reset: str, port: PortSpec,
                 chip: str) -> None:
    if reset in ("classic", "usb-jtag", "custom") and port.kind == "url" \
            and port.value.startswith("socket://"):
        raise ctx.error(node, path, f"reset {reset!r} needs DTR/RTS, which a socket:// port "
                        "cannot carry", hint="use an rfc2217:// URL (it carries DTR/RTS) or "
                        "reset: none")
    if reset in ("classic", "usb-jtag", "custom") and port.kind == "virtual":
        raise ctx.error(node, path, f"reset {reset!r} does not apply to a virtual board",
                        hint="use reset: virtual (or leave reset out)")
    if reset == "virtual" and port.kind != "virtual":
        raise ctx.error(node, path, "reset 'virtual' only works for a board with port: virtual",
                        hint="use classic, usb-jtag or none for a physical board")
    if reset == "usb-jtag" and not CHIP_TABLE[chip].usb_serial_jtag:
        # ESP32/ESP32-S2 have no USB-Serial/JTAG peripheral (esptool's target classes say which
        # chips do): they need a USB-UART bridge.
        raise ctx.error(node, path, f"the {chip} has no USB-Serial/JTAG peripheral",
                        hint="use reset: classic (DTR/RTS through the USB-UART bridge)")


def _parse_power(ctx: _Ctx, node: Node, path: str, port: PortSpec) -> PowerSpec:
    if isinstance(node, ScalarNode):
        simple = ("none", "virtual")
        driver = _choice(ctx, node, path, simple)
        if driver == "virtual" and port.kind != "virtual":
            raise ctx.error(node, path, "power 'virtual' only works for a board with "
                            "port: virtual", hint="use none, or a uhubctl/gpio/http mapping")
        return PowerSpec(driver)
    entries = _fields(ctx, node, path, ("driver",),
                      "none, virtual, or a mapping with driver: uhubctl|gpio|http")
    _require(ctx, node, entries, path, ["driver"],
             hint="e.g. power: {driver: uhubctl, hub: 1-1, port: 2}")
    driver = _choice(ctx, entries["driver"][1], f"{path}.driver", tuple(_POWER_KEYS))
    required, optional = _POWER_KEYS[driver]
    _check_keys(ctx, entries, path, ("driver", *required, *optional))
    _require(ctx, node, entries, path, required)
    if port.kind == "virtual":
        raise ctx.error(entries["driver"][1], f"{path}.driver",
                        f"power driver {driver!r} cannot switch a virtual board",
                        hint="use power: virtual (or leave power out)")
    params: dict[str, object] = {}
    if driver == "uhubctl":
        params["hub"] = _string(ctx, entries["hub"][1], f"{path}.hub",
                                "a hub location like 1-1", _HUB_RE,
                                hint="run 'uhubctl' to list hubs and their locations")
        params["port"] = _integer(ctx, entries["port"][1], f"{path}.port",
                                  "a hub port number >= 1", 1,
                                  hint="uhubctl numbers hub ports from 1")
    elif driver == "gpio":
        params["chip"] = _string(ctx, entries["chip"][1], f"{path}.chip",
                                 "a GPIO chip like gpiochip0", hint="list them with 'gpiodetect'")
        line_node = entries["line"][1]
        line_value = _scalar(ctx, line_node, f"{path}.line", "a line number or name")
        if isinstance(line_value, str) and line_value.strip():
            params["line"] = line_value
        else:
            params["line"] = _integer(ctx, line_node, f"{path}.line",
                                      "a line number >= 0 or a line name", 0,
                                      hint="list lines with 'gpioinfo'")
        params["active_low"] = (_boolean(ctx, entries["active_low"][1], f"{path}.active_low")
                                if "active_low" in entries else False)
    else:
        for key in ("on", "off", "status"):
            if key in entries:
                params[key] = _http_url(ctx, entries[key][1], f"{path}.{key}")
    return PowerSpec(driver, MappingProxyType(params))


def _http_url(ctx: _Ctx, node: Node, path: str) -> str:
    example = "e.g. http://plug-3.local/cm?cmnd=Power%20On"
    value = _string(ctx, node, path, "an http:// or https:// URL", hint=example)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ctx.error(node, path, f"expected an http:// or https:// URL, got {value!r}",
                        hint=example)
    return value


def _parse_flash(ctx: _Ctx, node: Node, path: str) -> FlashSpec:
    entries = _fields(ctx, node, path, _FLASH_KEYS, "a mapping with baud, mode, size, freq")
    _check_keys(ctx, entries, path, _FLASH_KEYS)
    baud = DEFAULT_BAUD
    if "baud" in entries:
        baud = _integer(ctx, entries["baud"][1], f"{path}.baud",
                        "a baud rate from 9600 to 5000000", 9600, 5_000_000,
                        hint="typical: 115200, 460800, 921600")
    mode = _choice(ctx, entries["mode"][1], f"{path}.mode", FLASH_MODES) \
        if "mode" in entries else "keep"
    size = _choice(ctx, entries["size"][1], f"{path}.size", FLASH_SIZES) \
        if "size" in entries else "keep"
    freq = _choice(ctx, entries["freq"][1], f"{path}.freq", FLASH_FREQS) \
        if "freq" in entries else "keep"
    return FlashSpec(baud=baud, mode=mode, size=size, freq=freq)


def _parse_features(ctx: _Ctx, node: Node, path: str) -> frozenset[str]:
    if not isinstance(node, SequenceNode):
        raise ctx.error(node, path, f"expected a list of feature names, got "
                        f"{_describe(ctx, node)}", hint="e.g. features: [mesh-radio, bme280]")
    return frozenset(
        _string(ctx, item, f"{path}[{index}]",
                "a feature name of letters, digits, '.', '_', '-'", _ID_RE,
                hint="e.g. features: [mesh-radio, bme280]")
        for index, item in enumerate(node.value)
    )
