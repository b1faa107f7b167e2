"""Rack files: a versioned YAML description of a rig, checked and turned into frozen records.

This is the one reader of a rack file: the farm, the rig host, discovery and the virtual rack
(through :mod:`pytest_hilfarm.description.virtual`, a projection of the :class:`RackSpec` this
module returns) all read the file here. It checks the top level and the list of boards; one
board entry is :mod:`~pytest_hilfarm.description.rackboard`'s, its ``sim:`` section
:mod:`~pytest_hilfarm.description.simsection`'s. The virtual rack accepts a short form
(``short_form=True``): ``version`` and ``name`` may be left out and a board without a port is a
virtual board, so a test or a benchmark can describe a rack in a few lines.

This module only describes a rack: it never opens a port, touches a lock, resolves a USB serial
number or checks that an image exists (drivers and the farm do that, later and on demand). Every
mistake in a rack file is reported as a :class:`~pytest_hilfarm.errors.ConfigError` that names the
file, the line, the key path (``boards[2].power.hub``), the bad value and what was expected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from pytest_hilfarm.description.rackboard import (
    DEFAULT_BAUD,
    FLASH_FREQS,
    FLASH_MODES,
    FLASH_SIZES,
    POWER_DRIVERS,
    RESETS,
    BaselineSpec,
    BoardSpec,
    FlashSpec,
    NvsSpec,
    PortKind,
    PortSpec,
    PowerSpec,
    check_sequence,
    parse_board,
    parse_nvs,
    port_identity,
    port_key,
)
from pytest_hilfarm.description.simsection import SIM_KEY, BoardSecurity, SimSpec
from pytest_hilfarm.description.yamlnodes import (
    Ctx,
    Location,
    check_keys,
    closest,
    describe,
    fields,
    nodes_of,
    path_value,
    require,
    scalar,
    string,
)
from pytest_hilfarm.errors import ConfigError
from pytest_hilfarm.esp.chips import FARM_CHIPS

# The records and checks of one board live in rackboard and simsection; this module is where
# the rest of the package finds them.
__all__ = [
    "DEFAULT_BAUD", "FLASH_FREQS", "FLASH_MODES", "FLASH_SIZES", "POWER_DRIVERS",
    "RACK_SETTING_KEYS", "RACK_VERSION", "RESETS", "SIM_KEY", "BaselineSpec", "BoardSecurity",
    "BoardSpec", "FlashSpec", "Location", "NvsSpec", "PortKind", "PortSpec", "PowerSpec",
    "RackSetting", "RackSpec", "SimSpec", "builtin_virtual_rack_path", "check_sequence",
    "closest", "lists_boards", "load_rack", "parse_rack", "rack_from_data", "rack_section",
    "registered_board",
]

RACK_VERSION = 1
# Keys a rack file may set in its ``settings:`` section; their values are checked by
# settings.resolve, which names this file and line when one is wrong.
RACK_SETTING_KEYS = ("lock_timeout", "boot_timeout", "infra_retries", "no_flash", "addr2line")

_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
# network_profiles is checked (with file and line) by description.network.load_profiles, from
# the node rack_section gives it, when a test asks for network conditions; here it is admitted.
_TOP_KEYS = ("version", "name", "lock_dir", "state_dir", "backend", "baseline", "settings", "nvs",
             "network_profiles", "boards")


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


def load_rack(path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None,
              short_form: bool = False) -> RackSpec:
    """Read and check a rack file. Relative paths in it are taken from the file's folder.

    ``environ`` (default ``os.environ``) supplies HILFARM_STATE_DIR / XDG_STATE_HOME / HOME for
    the default lock and state directories. ``short_form`` accepts the virtual rack's shorter
    file (no ``version``/``name``; a board without a port is virtual).
    """
    file = Path(path)
    return _parse(_read(file), str(file), file.absolute().parent, environ, file, short_form)


def rack_section(path: str | os.PathLike[str], key: str) -> Node | None:
    """The YAML node of one top-level section of a rack file (None: the file has none).

    For a section another module checks with file and line (``network_profiles:``, read by
    :mod:`pytest_hilfarm.description.network`): the file is read and its YAML parsed here, with
    the loader's errors, but the rest of it is not checked.
    """
    file = Path(path)
    root = _compose(_read(file), str(file))
    if not isinstance(root, MappingNode):
        return None
    for key_node, value_node in root.value:
        if isinstance(key_node, ScalarNode) and key_node.value == key:
            return value_node
    return None


def _read(file: Path) -> str:
    hint = ("give the path of an existing rack file (--hil-rack / HILFARM_RACK / hil_rack), "
            "or leave it unset for the built-in virtual rack")
    try:
        return file.read_text(encoding="utf-8")
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
               environ: Mapping[str, str] | None = None, short_form: bool = False) -> RackSpec:
    """Check rack YAML given as text; ``source_name`` names it in errors.

    Relative paths are taken from ``base_dir`` (default: the current directory).
    """
    return _parse(text, source_name, base_dir if base_dir is not None else Path.cwd(), environ,
                  None, short_form)


def rack_from_data(data: Any, source_name: str = "<rack>", *, base_dir: Path | None = None,
                   environ: Mapping[str, str] | None = None,
                   short_form: bool = False) -> RackSpec:
    """Check a rack given as Python data (what ``yaml.safe_load`` returns for a rack file).

    The same checks as a file's; errors name ``source_name`` without a line (data has none).
    """
    ctx = Ctx(source_name, base_dir if base_dir is not None else Path.cwd(), SafeConstructor())
    return _check(ctx, nodes_of(data), environ, None, short_form)


# --- parsing ---


def _parse(text: str, source: str, base_dir: Path, environ: Mapping[str, str] | None,
           file: Path | None, short_form: bool) -> RackSpec:
    root = _compose(text, source)
    if root is None:
        raise ConfigError("rack file is empty", where=source,
                          hint="start it with 'version: 1', 'name:' and a 'boards:' list "
                               "(see rack-configs/esp32-mesh-rig.example.yaml)")
    return _check(Ctx(source, base_dir, SafeConstructor()), root, environ, file, short_form)


def _compose(text: str, source: str) -> Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = " ".join(part for part in (exc.context, exc.problem) if part)
        raise ConfigError(f"malformed YAML: {problem}", where=where,
                          hint="check the indentation and quoting around that line") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed YAML: {exc}", where=source,
                          hint="check the file is a single YAML document") from None


def _check(ctx: Ctx, root: Node, environ: Mapping[str, str] | None, file: Path | None,
           short_form: bool) -> RackSpec:
    top = fields(ctx, root, "", _TOP_KEYS, "a mapping with version, name and boards")

    # The version comes first: a newer format should be reported as such, not as unknown keys.
    if not short_form or "version" in top:
        require(ctx, root, top, "", ["version"],
                hint=f"add 'version: {RACK_VERSION}' at the top")
        version_node = top["version"][1]
        version_value = scalar(ctx, version_node, "version", f"{RACK_VERSION}")
        if type(version_value) is not int or version_value != RACK_VERSION:
            raise ctx.error(version_node, "version",
                            f"unsupported rack file version {describe(ctx, version_node)}",
                            hint=f"this pytest-hilfarm reads version {RACK_VERSION}; "
                                 "upgrade pytest-hilfarm or rewrite the file for version "
                                 f"{RACK_VERSION}")
    check_keys(ctx, top, "", _TOP_KEYS)
    require(ctx, root, top, "", ["boards"] if short_form else ["name", "boards"],
            hint="see docs/virtual-rack.md" if short_form else None)

    if "name" in top:
        name = string(ctx, top["name"][1], "name",
                      "a rack name of letters, digits, '.', '_', '-'", _ID_RE,
                      hint="the name is used as a directory name, e.g. name: mesh-rig")
    else:
        name = Path(ctx.source).stem  # the short form: a rack is named after its file
    backend = None
    if "backend" in top:
        backend = string(ctx, top["backend"][1], "backend", "a backend URL",
                          hint="e.g. backend: postgresql://farm@db/hilfarm")

    env = os.environ if environ is None else environ
    default_dir = _default_state_dir(name, env)
    state_dir = (path_value(ctx, top["state_dir"][1], "state_dir", "a directory path")
                 if "state_dir" in top else default_dir)
    # Locks live with the state unless the rack says otherwise (e.g. on a local disk when the
    # state is on a share).
    lock_dir = (path_value(ctx, top["lock_dir"][1], "lock_dir", "a directory path")
                if "lock_dir" in top else state_dir)

    baselines: dict[str, BaselineSpec] = {}
    if "baseline" in top:
        node = top["baseline"][1]
        entries = fields(ctx, node, "baseline", FARM_CHIPS,
                          "a mapping of chip to image, e.g. {esp32: images/esp32-base.bin}")
        check_keys(ctx, entries, "baseline", FARM_CHIPS)
        for chip, (_key, value_node) in entries.items():
            baselines[chip] = BaselineSpec(
                path_value(ctx, value_node, f"baseline.{chip}", "an image path or build directory"),
                ctx.loc(value_node))

    settings: dict[str, RackSetting] = {}
    if "settings" in top:
        entries = fields(ctx, top["settings"][1], "settings", RACK_SETTING_KEYS,
                          "a mapping of setting names to values")
        check_keys(ctx, entries, "settings", RACK_SETTING_KEYS)
        for key, (_key, value_node) in entries.items():
            value = scalar(ctx, value_node, f"settings.{key}", "a single value")
            settings[key] = RackSetting(value, ctx.loc(value_node))

    nvs = parse_nvs(ctx, top["nvs"][1], "nvs") if "nvs" in top else None
    # A client of a multi-host farm may own no boards: rig hosts register theirs.
    boards = _parse_boards(ctx, top["boards"][1], allow_empty=backend is not None,
                           virtual_by_default=short_form)
    if nvs is not None and nvs.csv is None:
        raise ctx.error(top["nvs"][1], "nvs", "the rack-wide nvs: needs a csv:",
                        hint="e.g. nvs: {csv: nvs/board.csv, values: {wifi_ssid: lab}}")
    return RackSpec(
        name=name, version=RACK_VERSION, path=file, lock_dir=lock_dir, state_dir=state_dir,
        backend=backend, baselines=MappingProxyType(baselines), boards=boards,
        settings=MappingProxyType(settings), nvs=nvs,
    )


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


def _parse_boards(ctx: Ctx, node: Node, *, allow_empty: bool,
                  virtual_by_default: bool) -> tuple[BoardSpec, ...]:
    """The list of boards, with what no single board can check: ids, ports and MACs unique."""
    if not isinstance(node, SequenceNode):
        raise ctx.error(node, "boards", f"expected a list of boards, got {describe(ctx, node)}",
                        hint="write each board as a list item: '- id: esp32-1'")
    if not node.value and not allow_empty:
        raise ctx.error(node, "boards", "the rack has no boards",
                        hint="add at least one board with id, chip and port")
    boards: list[BoardSpec] = []
    ids: dict[str, tuple[int, BoardSpec]] = {}
    ports: dict[tuple[str, str], BoardSpec] = {}
    macs: dict[bytes, BoardSpec] = {}
    for index, item in enumerate(node.value):
        board = parse_board(ctx, item, f"boards[{index}]", virtual_by_default=virtual_by_default)
        if board.id in ids:
            first_index, first = ids[board.id]
            first_at = (f"line {first.where.line}" if first.where.line
                        else f"boards[{first_index}]")
            raise ctx.error(item, f"boards[{index}].id",
                            f"duplicate board id {board.id!r} (first used on {first_at})",
                            hint="give every board its own id (an id given twice would share "
                                 "one lock, one state and one flash file)")
        ids[board.id] = (index, board)
        mac = board.sim.mac if board.sim is not None else None
        if mac is not None:
            if mac in macs:
                raise ctx.error(item, f"boards[{index}].{SIM_KEY}.mac",
                                f"mac {mac.hex(':')} is also board {macs[mac].id!r}'s",
                                hint="give every board its own MAC")
            macs[mac] = board
        identity = port_identity(board.port)
        if identity is not None:
            if identity in ports:
                other = ports[identity]
                raise ctx.error(item, f"boards[{index}].{port_key(board.port)}",
                                f"board {board.id!r} uses the same port {board.port.value!r} as "
                                f"board {other.id!r} (line {other.where.line})",
                                hint="each board needs its own port; check the cabling and "
                                     "the by-id names")
            ports[identity] = board
        boards.append(board)
    return tuple(boards)

