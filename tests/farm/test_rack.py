"""Rack files: every valid form, and every mistake reported with file, line, key path and hint."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from pytest_hilfarm.description.rack import (
    BaselineSpec,
    FlashSpec,
    Location,
    PortSpec,
    PowerSpec,
    RackSpec,
    builtin_virtual_rack_path,
    load_rack,
    parse_rack,
)
from pytest_hilfarm.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
ENV = {"HOME": "/home/tester"}  # a fixed environment: defaults never depend on the real one

HEAD = """\
version: 1
name: test-rig
"""


def write(tmp_path: Path, text: str, name: str = "rack.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> RackSpec:
    return load_rack(write(tmp_path, text), environ=ENV if environ is None else environ)


def one_board(tmp_path: Path, board: str) -> RackSpec:
    """A rack with one board; ``board`` is the YAML of its mapping (keys at column 0)."""
    body = textwrap.indent(textwrap.dedent(board), "    ").replace("    ", "  - ", 1)
    return load(tmp_path, HEAD + "boards:\n" + body)


def line_of(path: Path, needle: str, nth: int = 1) -> int:
    """The 1-based line of the nth line containing ``needle``."""
    seen = 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            seen += 1
            if seen == nth:
                return number
    raise AssertionError(f"{needle!r} not in {path}")


# --- valid forms ---------------------------------------------------------------------------


def test_minimal_board_gets_the_documented_defaults(tmp_path: Path) -> None:
    rack = one_board(tmp_path, """\
        id: b1
        chip: esp32
        port: /dev/serial/by-id/usb-Silicon_Labs_CP2102N-if00-port0
        """)
    board = rack.board("b1")
    assert board.port == PortSpec("path", "/dev/serial/by-id/usb-Silicon_Labs_CP2102N-if00-port0")
    assert board.reset == "classic"
    assert board.power == PowerSpec("none")
    assert board.flash == FlashSpec(baud=921600, mode="keep", size="keep", freq="keep")
    assert board.features == frozenset()
    assert board.baseline is None
    assert board.interface is None
    assert board.where == Location(str(tmp_path / "rack.yaml"), 4)
    assert rack.name == "test-rig"
    assert rack.version == 1
    assert rack.path == tmp_path / "rack.yaml"
    assert rack.backend is None
    assert dict(rack.baselines) == {}
    assert not rack.is_virtual


@pytest.mark.parametrize(
    ("port_yaml", "kind", "value", "reset"),
    [
        ("port: /dev/ttyUSB0", "path", "/dev/ttyUSB0", "classic"),
        ("port: COM7", "path", "COM7", "classic"),
        ("port: rfc2217://rig-host:4001", "url", "rfc2217://rig-host:4001", "classic"),
        ("port: socket://127.0.0.1:5000", "url", "socket://127.0.0.1:5000", "none"),
        ("port: virtual", "virtual", "virtual", "virtual"),
        ('usb_serial: "0001"', "usb_serial", "0001", "classic"),
        ('usb_serial: "84:F7:03:A1:B2:C3"', "usb_serial", "84:F7:03:A1:B2:C3", "classic"),
        ("usb_path: 1-1.2", "usb_path", "1-1.2", "classic"),
        ("usb_path: 3-2.4.1:1.0", "usb_path", "3-2.4.1:1.0", "classic"),
    ],
)
def test_port_forms_and_their_default_reset(tmp_path: Path, port_yaml: str, kind: str,
                                            value: str, reset: str) -> None:
    board = one_board(tmp_path, f"id: b1\nchip: esp32\n{port_yaml}\n").boards[0]
    assert board.port == PortSpec(kind, value)  # type: ignore[arg-type]
    assert board.reset == reset


@pytest.mark.parametrize(
    ("chip", "port", "reset"),
    [
        ("esp32", "/dev/ttyUSB0", "classic"),
        ("esp32", "/dev/ttyUSB0", "none"),
        ("esp32c3", "/dev/ttyACM0", "usb-jtag"),
        ("esp32", "rfc2217://h:1", "classic"),
        ("esp32", "socket://h:1", "none"),
        ("esp32s2", "virtual", "virtual"),
        ("esp32s2", "virtual", "none"),
    ],
)
def test_explicit_reset(tmp_path: Path, chip: str, port: str, reset: str) -> None:
    board = one_board(tmp_path, f"id: b1\nchip: {chip}\nport: {port}\nreset: {reset}\n").boards[0]
    assert board.reset == reset


@pytest.mark.parametrize(
    ("power_yaml", "expected"),
    [
        ("power: none", PowerSpec("none")),
        ("power: {driver: uhubctl, hub: 1-1, port: 3}",
         PowerSpec("uhubctl", {"hub": "1-1", "port": 3})),
        ('power: {driver: uhubctl, hub: "2", port: 1}',
         PowerSpec("uhubctl", {"hub": "2", "port": 1})),
        ("power: {driver: gpio, chip: gpiochip0, line: 17}",
         PowerSpec("gpio", {"chip": "gpiochip0", "line": 17, "active_low": False})),
        ("power: {driver: gpio, chip: /dev/gpiochip1, line: RELAY1, active_low: yes}",
         PowerSpec("gpio", {"chip": "/dev/gpiochip1", "line": "RELAY1", "active_low": True})),
        # on/off unquoted: YAML 1.1 would make them booleans; keys are taken as written.
        ("power:\n  driver: http\n  on: http://plug/cm?cmnd=Power%20On\n"
         "  off: https://plug/cm?cmnd=Power%20Off\n",
         PowerSpec("http", {"on": "http://plug/cm?cmnd=Power%20On",
                            "off": "https://plug/cm?cmnd=Power%20Off"})),
        ("power:\n  driver: http\n  on: http://p/on\n  off: http://p/off\n"
         "  status: http://p/status\n",
         PowerSpec("http", {"on": "http://p/on", "off": "http://p/off",
                            "status": "http://p/status"})),
    ],
)
def test_power_forms(tmp_path: Path, power_yaml: str, expected: PowerSpec) -> None:
    board = one_board(tmp_path, f"id: b1\nchip: esp32\nport: /dev/ttyUSB0\n{power_yaml}\n")
    assert board.boards[0].power == expected


def test_power_params_are_read_only(tmp_path: Path) -> None:
    power = one_board(tmp_path, "id: b1\nchip: esp32\nport: /dev/ttyUSB0\n"
                                "power: {driver: uhubctl, hub: 1-1, port: 3}\n").boards[0].power
    with pytest.raises(TypeError):
        power.params["port"] = 4  # type: ignore[index]


def test_virtual_board_defaults_to_virtual_power_and_reset(tmp_path: Path) -> None:
    rack = one_board(tmp_path, "id: v1\nchip: esp32c3\nport: virtual\n")
    board = rack.boards[0]
    assert (board.reset, board.power, board.is_virtual) == ("virtual", PowerSpec("virtual"), True)
    assert rack.is_virtual


def test_flash_features_interface(tmp_path: Path) -> None:
    board = one_board(tmp_path, """\
        id: b1
        chip: esp32s2
        port: /dev/ttyUSB0
        flash: {baud: 460800, mode: dio, size: 16MB, freq: 80m}
        features: [mesh-radio, bme280, mesh-radio]
        interface: enx00e04c680001
        """).boards[0]
    assert board.flash == FlashSpec(460800, "dio", "16MB", "80m")
    assert board.features == frozenset({"mesh-radio", "bme280"})
    assert board.interface == "enx00e04c680001"


def test_baselines_per_chip_and_per_board(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + textwrap.dedent("""\
        baseline:
          esp32: images/esp32-base.bin
          esp32c3: /abs/c3/build
        boards:
          - {id: a, chip: esp32, port: /dev/ttyUSB0}
          - {id: b, chip: esp32, port: /dev/ttyUSB1, baseline: ~/own/flasher_args.json}
          - {id: c, chip: esp32s2, port: /dev/ttyUSB2}
        """))
    rack = load_rack(path, environ=ENV)
    assert rack.baselines["esp32"] == BaselineSpec(
        tmp_path / "images/esp32-base.bin", Location(str(path), line_of(path, "esp32-base")))
    assert rack.baselines["esp32c3"].path == Path("/abs/c3/build")
    assert rack.baseline_for("a") == rack.baselines["esp32"]
    own = rack.baseline_for(rack.board("b"))
    assert own is not None
    assert own.path == Path("~/own/flasher_args.json").expanduser()
    assert own.where.line == line_of(path, "id: b")
    assert rack.baseline_for("c") is None


def test_relative_paths_follow_the_rack_files_folder_not_the_cwd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "racks").mkdir()
    write(tmp_path / "racks", HEAD + "lock_dir: locks\nstate_dir: ../state\n"
          "boards: [{id: a, chip: esp32, port: virtual}]\n")
    monkeypatch.chdir(tmp_path)
    rack = load_rack("racks/rack.yaml", environ=ENV)
    assert rack.lock_dir == tmp_path / "racks" / "locks"
    assert rack.state_dir == tmp_path / "racks" / ".." / "state"


def test_home_is_expanded_in_dirs(tmp_path: Path) -> None:
    rack = load(tmp_path, HEAD + "state_dir: ~/farm\n"
                          "boards: [{id: a, chip: esp32, port: virtual}]\n")
    assert rack.state_dir == Path("~/farm").expanduser()
    assert rack.lock_dir == rack.state_dir  # locks live with the state unless told otherwise


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"HILFARM_STATE_DIR": "/srv/hil", "XDG_STATE_HOME": "/x", "HOME": "/h"},
         "/srv/hil/test-rig"),
        ({"HILFARM_STATE_DIR": "", "XDG_STATE_HOME": "/x", "HOME": "/h"},
         "/x/hilfarm/test-rig"),
        ({"XDG_STATE_HOME": "relative/ignored", "HOME": "/h"},
         "/h/.local/state/hilfarm/test-rig"),
        ({"HOME": "/h"}, "/h/.local/state/hilfarm/test-rig"),
    ],
)
def test_default_state_and_lock_dirs(tmp_path: Path, environ: dict[str, str],
                                     expected: str) -> None:
    rack = load(tmp_path, HEAD + "boards: [{id: a, chip: esp32, port: virtual}]\n", environ)
    assert rack.state_dir == Path(expected)
    assert rack.lock_dir == Path(expected)


def test_backend_and_settings_are_stored(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + textwrap.dedent("""\
        backend: postgresql://farm@db/hilfarm
        settings:
          lock_timeout: 600
          no_flash: yes
        boards: [{id: a, chip: esp32, port: virtual}]
        """))
    rack = load_rack(path, environ=ENV)
    assert rack.backend == "postgresql://farm@db/hilfarm"
    assert rack.settings["lock_timeout"].value == 600
    assert rack.settings["lock_timeout"].where == Location(str(path), line_of(path, "lock_timeout"))
    assert rack.settings["no_flash"].value is True


def test_yaml_anchors_and_merge_keys(tmp_path: Path) -> None:
    rack = load(tmp_path, HEAD + textwrap.dedent("""\
        boards:
          - &devkit {id: a, chip: esp32, port: /dev/ttyUSB0, features: [mesh-radio]}
          - <<: *devkit
            id: b
            port: /dev/ttyUSB1
        """))
    assert [(b.id, b.port.value, b.features) for b in rack.boards] == [
        ("a", "/dev/ttyUSB0", frozenset({"mesh-radio"})),
        ("b", "/dev/ttyUSB1", frozenset({"mesh-radio"})),
    ]


def test_parse_rack_from_text() -> None:
    rack = parse_rack(HEAD + "boards: [{id: a, chip: esp32, port: virtual}]\n"
                      "state_dir: st\n", "inline.yaml", base_dir=Path("/base"), environ=ENV)
    assert rack.path is None
    assert rack.state_dir == Path("/base/st")
    assert rack.boards[0].where == Location("inline.yaml", 3)


def test_records_are_frozen_and_hashable(tmp_path: Path) -> None:
    rack = load_rack(REPO / "rack-configs" / "esp32-mesh-rig.example.yaml", environ=ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rack.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        rack.baselines["esp32s2"] = rack.baselines["esp32"]  # type: ignore[index]
    assert len({rack, *rack.boards}) == 1 + len(rack.boards)


def test_board_lookup_says_did_you_mean() -> None:
    rack = load_rack(builtin_virtual_rack_path(), environ=ENV)
    with pytest.raises(ConfigError) as info:
        rack.board("esp32-4")
    assert "no board 'esp32-4' in rack 'virtual'" in str(info.value)
    assert "did you mean 'esp32-3'?" in str(info.value)
    with pytest.raises(ConfigError, match="boards in this rack: esp32-1, esp32-2"):
        rack.board("zzzzzzzz")


# --- the shipped rack files ----------------------------------------------------------------


def test_packaged_virtual_rack_is_identical_to_rack_configs_copy() -> None:
    packaged = builtin_virtual_rack_path()
    assert packaged == REPO / "pytest_hilfarm" / "data" / "virtual.yaml"
    assert packaged.read_bytes() == (REPO / "rack-configs" / "virtual.yaml").read_bytes()


def test_builtin_virtual_rack_contents() -> None:
    rack = load_rack(builtin_virtual_rack_path(), environ=ENV)
    assert rack.name == "virtual"
    assert rack.is_virtual
    assert [(b.id, b.chip) for b in rack.boards] == [
        ("esp32-1", "esp32"), ("esp32-2", "esp32"), ("esp32-3", "esp32"),
        ("esp32s2-1", "esp32s2"), ("esp32c3-1", "esp32c3"),
    ]
    for board in rack.boards:
        assert (board.port.kind, board.reset, board.power.driver) == (
            "virtual", "virtual", "virtual")
        assert board.flash.size == "4MB"
        assert board.features == (frozenset({"mesh-radio"}) if board.chip == "esp32"
                                  else frozenset())
    assert rack.state_dir == Path("/home/tester/.local/state/hilfarm/virtual")


def test_example_rig_loads() -> None:
    rack = load_rack(REPO / "rack-configs" / "esp32-mesh-rig.example.yaml", environ=ENV)
    chips = sorted(board.chip for board in rack.boards)
    assert chips.count("esp32") >= 3 and "esp32s2" in chips and "esp32c3" in chips
    hub_ports = sorted(b.power.params["port"] for b in rack.boards  # type: ignore[type-var]
                       if b.power.driver == "uhubctl")
    assert hub_ports == [1, 2, 3, 4, 5]
    assert {b.power.params["hub"] for b in rack.boards if b.power.driver == "uhubctl"} == {"1-1"}
    assert {b.port.kind for b in rack.boards} >= {"path", "usb_serial"}
    c3 = next(b for b in rack.boards if b.chip == "esp32c3")
    assert c3.reset == "usb-jtag"
    assert any(b.power.driver == "http" for b in rack.boards)
    assert set(rack.baselines) == {"esp32", "esp32s2", "esp32c3"}
    assert not rack.is_virtual


# --- errors --------------------------------------------------------------------------------


def rack_error(tmp_path: Path, text: str) -> tuple[str, Path]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_rack(path, environ=ENV)
    return str(info.value), path


BOARD_OK = "  - {id: a, chip: esp32, port: /dev/ttyUSB0}\n"

# (rack text, needle on the reported line, key path, what the message says, the hint)
ERROR_CASES = [
    pytest.param(HEAD + "bords:\n" + BOARD_OK, "bords", "bords", "unknown key",
                 "did you mean 'boards'?", id="unknown-top-key"),
    pytest.param("version: 2\nname: x\nboards: []\nfuture_key: 1\n", "version: 2", "version",
                 "unsupported rack file version 2", "reads version 1", id="unknown-version"),
    pytest.param('version: "1"\nname: x\n', "version", "version",
                 "unsupported rack file version '1'", "reads version 1", id="version-string"),
    pytest.param("name: x\nboards:\n" + BOARD_OK, "name: x", "top level",
                 "missing required key 'version'", "add 'version: 1'", id="no-version"),
    pytest.param("version: 1\nboards:\n" + BOARD_OK, "version", "top level",
                 "missing required key 'name'", None, id="no-name"),
    pytest.param("version: 1\nname: my rig\nboards:\n" + BOARD_OK, "name:", "name",
                 "expected a rack name", "e.g. name: mesh-rig", id="bad-name"),
    pytest.param(HEAD + "boards: {id: a}\n", "boards:", "boards",
                 "expected a list of boards, got a mapping", "- id: esp32-1",
                 id="boards-not-list"),
    pytest.param(HEAD + "boards: []\n", "boards:", "boards", "the rack has no boards",
                 "add at least one board", id="no-boards"),
    pytest.param(HEAD + "boards:\n  - {chip: esp32, port: /dev/ttyUSB0}\n", "chip: esp32",
                 "boards[0]", "missing required key 'id'", None, id="board-no-id"),
    pytest.param(HEAD + "boards:\n  - {id: a/b, chip: esp32, port: /dev/ttyUSB0}\n", "a/b",
                 "boards[0].id", "expected a board id", "e.g. id: esp32-1", id="bad-id"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32c5\n    port: /dev/ttyUSB0\n",
                 "esp32c5", "boards[0].chip", "expected one of esp32, esp32s2, esp32c3, esp32s3, "
                 "esp32c6, got 'esp32c5'", "did you mean 'esp32c6'?", id="bad-chip"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: [esp32]\n    port: /dev/ttyUSB0\n",
                 "[esp32]", "boards[0].chip", "got a list", None, id="chip-is-list"),
    pytest.param(HEAD + "boards:\n" + BOARD_OK + "  - id: b\n    chip: esp32\n"
                 "    port: /dev/ttyUSB1\n    feature: [bme280]\n", "feature:",
                 "boards[1].feature", "unknown key", "did you mean 'features'?",
                 id="unknown-board-key"),
    pytest.param(HEAD + "boards:\n" + BOARD_OK + "  - {id: a, chip: esp32, port: /dev/ttyUSB1}\n",
                 "ttyUSB1", "boards[1].id", "duplicate board id 'a' (first used on line 4)",
                 "give every board its own id", id="duplicate-id"),
    pytest.param(HEAD + "boards:\n" + BOARD_OK + "  - {id: b, chip: esp32, port: /dev//ttyUSB0}\n",
                 "id: b", "boards[1].port", "same port '/dev//ttyUSB0' as board 'a' (line 4)",
                 "each board needs its own port", id="same-path"),
    pytest.param(HEAD + "boards:\n  - {id: a, chip: esp32, port: 'rfc2217://Rig:4000'}\n"
                 "  - {id: b, chip: esp32, port: 'rfc2217://rig:4000?logging=debug'}\n",
                 "id: b", "boards[1].port", "as board 'a'", None, id="same-url"),
    pytest.param(HEAD + "boards:\n  - {id: a, chip: esp32, usb_serial: 'X1'}\n"
                 "  - {id: b, chip: esp32, usb_serial: 'X1'}\n", "id: b",
                 "boards[1].usb_serial", "same port 'X1'", None, id="same-usb-serial"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n", "id: a", "boards[0]",
                 "board 'a' has no port", "exactly one of port, usb_serial, usb_path",
                 id="no-port"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    port: /dev/ttyUSB0\n"
                 "    usb_path: 1-1.2\n", "usb_path", "boards[0].usb_path",
                 "gives both port and usb_path", "exactly one of", id="two-ports"),
    pytest.param(HEAD + "boards:\n  - {id: a, chip: esp32, port: ttyUSB0}\n", "ttyUSB0",
                 "boards[0].port", "expected a port, got 'ttyUSB0'", "/dev/serial/by-id",
                 id="relative-port"),
    pytest.param(HEAD + "boards:\n  - {id: a, chip: esp32, port: 'rfc2271://h:1'}\n", "rfc2271",
                 "boards[0].port", "unsupported port URL scheme 'rfc2271'",
                 "did you mean rfc2217://?", id="bad-scheme"),
    pytest.param(HEAD + "boards:\n  - {id: a, chip: esp32, port: 'socket://host'}\n", "socket",
                 "boards[0].port", "expected socket://HOST:PORT", "socket://rig-host.local:4000",
                 id="url-no-port"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    usb_serial: 0001\n", "0001",
                 "boards[0].usb_serial", "expected a USB serial number, got 0001 (a number)",
                 'quote it: usb_serial: "0001"', id="unquoted-serial"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    usb_serial: 12:34:56\n",
                 "12:34:56", "boards[0].usb_serial", "(a number)",
                 'quote it: usb_serial: "12:34:56"', id="sexagesimal-serial"),
    pytest.param(HEAD + "boards:\n  - {id: a, chip: esp32, usb_path: usb1/1-2}\n", "usb1",
                 "boards[0].usb_path", "expected a USB physical path like 1-1.2", "udevadm",
                 id="bad-usb-path"),
    pytest.param(HEAD + "boards:\n  - {id: a, chip: esp32, port: /dev/ttyUSB0, reset: clasic}\n",
                 "clasic", "boards[0].reset", "got 'clasic'", "did you mean 'classic'?",
                 id="bad-reset"),
    pytest.param(HEAD + "boards:\n  - {id: a, chip: esp32, port: 'socket://h:1', reset: classic}\n",
                 "socket", "boards[0].reset", "socket:// port cannot carry",
                 "use an rfc2217:// URL", id="socket-classic"),
    pytest.param(HEAD + "boards:\n  - {id: a, chip: esp32, port: virtual, reset: classic}\n",
                 "virtual", "boards[0].reset", "does not apply to a virtual board",
                 "reset: virtual", id="virtual-classic"),
    pytest.param(HEAD + "boards:\n  - {id: a, chip: esp32, port: /dev/ttyUSB0, reset: virtual}\n",
                 "reset", "boards[0].reset", "only works for a board with port: virtual",
                 None, id="physical-virtual-reset"),
    pytest.param(HEAD + "boards:\n  - {id: a, chip: esp32, port: /dev/ttyUSB0, "
                 "reset: usb-jtag}\n", "usb-jtag", "boards[0].reset",
                 "the esp32 has no USB-Serial/JTAG peripheral", "reset: classic",
                 id="usb-jtag-on-esp32"),
    pytest.param(HEAD + "boards:\n  - {id: a, chip: esp32, port: /dev/ttyUSB0, power: off}\n",
                 "power", "boards[0].power", "expected one of none, virtual, got off (a boolean)",
                 None, id="power-bad-word"),
    pytest.param(HEAD + "boards:\n  - {id: a, chip: esp32, port: /dev/ttyUSB0, power: virtual}\n",
                 "power", "boards[0].power", "only works for a board with port: virtual",
                 None, id="physical-virtual-power"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    port: /dev/ttyUSB0\n"
                 "    power: {hub: 1-1, port: 2}\n", "hub", "boards[0].power",
                 "missing required key 'driver'", "driver: uhubctl", id="power-no-driver"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    port: /dev/ttyUSB0\n"
                 "    power: {driver: uhubctrl, hub: 1-1, port: 2}\n", "uhubctrl",
                 "boards[0].power.driver", "got 'uhubctrl'", "did you mean 'uhubctl'?",
                 id="power-bad-driver"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    port: /dev/ttyUSB0\n"
                 "    power:\n      driver: uhubctl\n      hbu: 1-1\n      port: 2\n", "hbu",
                 "boards[0].power.hbu", "unknown key", "did you mean 'hub'?",
                 id="power-unknown-key"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    port: /dev/ttyUSB0\n"
                 "    power:\n      driver: uhubctl\n      port: 2\n", "driver: uhubctl",
                 "boards[0].power", "missing required key 'hub'", None, id="power-no-hub"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    port: /dev/ttyUSB0\n"
                 "    power:\n      driver: uhubctl\n      hub: 1-1\n      port: 0\n", "port: 0",
                 "boards[0].power.port", "expected a hub port number >= 1, got 0 (a number)",
                 "uhubctl numbers hub ports from 1", id="hub-port-zero"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    port: /dev/ttyUSB0\n"
                 "    power:\n      driver: uhubctl\n      hub: 2\n      port: 1\n", "hub: 2",
                 "boards[0].power.hub", "got 2 (a number)", 'quote it: hub: "2"',
                 id="hub-unquoted"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    port: /dev/ttyUSB0\n"
                 "    power:\n      driver: gpio\n      chip: gpiochip0\n      line: 4\n"
                 "      active_low: maybe\n", "maybe", "boards[0].power.active_low",
                 "expected true or false, got 'maybe'", None, id="gpio-active-low"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    port: /dev/ttyUSB0\n"
                 "    power:\n      driver: gpio\n      chip: gpiochip0\n      line: -1\n",
                 "line: -1", "boards[0].power.line", "expected a line number >= 0", "gpioinfo",
                 id="gpio-negative-line"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    port: /dev/ttyUSB0\n"
                 "    power:\n      driver: http\n      on: ftp://plug/on\n      off: http://p/\n",
                 "ftp://", "boards[0].power.on", "expected an http:// or https:// URL",
                 "cmnd=Power", id="http-bad-url"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    port: virtual\n"
                 "    power: {driver: uhubctl, hub: 1-1, port: 1}\n", "uhubctl",
                 "boards[0].power.driver", "cannot switch a virtual board", "power: virtual",
                 id="virtual-with-hub"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    port: /dev/ttyUSB0\n"
                 "    flash: {baud: 921600, speed: 40m}\n", "speed", "boards[0].flash.speed",
                 "unknown key", "allowed keys here: baud, mode, size, freq", id="flash-unknown"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    port: /dev/ttyUSB0\n"
                 "    flash: {baud: fast}\n", "fast", "boards[0].flash.baud",
                 "expected a baud rate from 9600 to 5000000, got 'fast'", "115200",
                 id="flash-baud-text"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    port: /dev/ttyUSB0\n"
                 "    flash: {baud: 300}\n", "300", "boards[0].flash.baud", "got 300 (a number)",
                 None, id="flash-baud-low"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    port: /dev/ttyUSB0\n"
                 "    flash: {size: 3MB}\n", "3MB", "boards[0].flash.size",
                 "expected one of 2MB, 4MB, 8MB, 16MB, detect, keep, got '3MB'", None,
                 id="flash-size"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    port: /dev/ttyUSB0\n"
                 "    flash: {mode: qi0}\n", "qi0", "boards[0].flash.mode", "got 'qi0'",
                 "did you mean 'qio'?", id="flash-mode"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    port: /dev/ttyUSB0\n"
                 "    features: mesh-radio\n", "features", "boards[0].features",
                 "expected a list of feature names, got 'mesh-radio'",
                 "features: [mesh-radio, bme280]", id="features-not-list"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    port: /dev/ttyUSB0\n"
                 "    features: [mesh radio]\n", "features", "boards[0].features[0]",
                 "got 'mesh radio'", None, id="feature-bad-name"),
    pytest.param(HEAD + "baseline:\n  esp23: base.bin\nboards:\n" + BOARD_OK, "esp23",
                 "baseline.esp23", "unknown key", "did you mean 'esp32'?",
                 id="baseline-unknown-chip"),
    pytest.param(HEAD + "baseline: base.bin\nboards:\n" + BOARD_OK, "baseline",
                 "baseline", "expected a mapping of chip to image", None,
                 id="baseline-not-mapping"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    port: /dev/ttyUSB0\n"
                 "    baseline:\n", "baseline", "boards[0].baseline",
                 "got nothing (an empty value)", None, id="board-baseline-empty"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    chip: esp32s2\n"
                 "    port: /dev/ttyUSB0\n", "esp32s2", "boards[0].chip",
                 "duplicate key (first given on line 5)", "keep one of them",
                 id="duplicate-key"),
    pytest.param(HEAD + "settings:\n  lock_timout: 5\nboards:\n" + BOARD_OK, "lock_timout",
                 "settings.lock_timout", "unknown key", "did you mean 'lock_timeout'?",
                 id="settings-unknown"),
    pytest.param(HEAD + "settings:\n  lock_timeout: [5]\nboards:\n" + BOARD_OK, "[5]",
                 "settings.lock_timeout", "expected a single value, got a list", None,
                 id="settings-not-scalar"),
    pytest.param(HEAD + "boards:\n  - id: a\n    chip: esp32\n    port: /dev/ttyUSB0\n"
                 "    interface: a-very-long-interface-name\n", "interface",
                 "boards[0].interface", "expected a network interface name", None,
                 id="interface-too-long"),
    pytest.param(HEAD + "lock_dir: 5\nboards:\n" + BOARD_OK, "lock_dir", "lock_dir",
                 "expected a directory path, got 5 (a number)", 'quote it: lock_dir: "5"',
                 id="lock-dir-number"),
    pytest.param(HEAD + "backend: 5\nboards:\n" + BOARD_OK, "backend", "backend",
                 "expected a backend URL, got 5 (a number)", None, id="backend-number"),
]


@pytest.mark.parametrize(("text", "needle", "keypath", "what", "hint"), ERROR_CASES)
def test_errors_name_file_line_key_and_hint(tmp_path: Path, text: str, needle: str,
                                            keypath: str, what: str, hint: str | None) -> None:
    message, path = rack_error(tmp_path, text)
    assert message.startswith(f"{path}:{line_of(path, needle)}: {keypath}: "), message
    assert what in message
    if hint is not None:
        assert "\n  -> " in message and hint in message.split("\n  -> ", 1)[1], message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    message, path = rack_error(tmp_path, "- version: 1\n")
    assert message.startswith(f"{path}:1: expected a mapping with version, name and boards, "
                              "got a list")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    message, path = rack_error(tmp_path, text)
    assert message.startswith(f"{path}: rack file is empty")
    assert "version: 1" in message


def test_malformed_yaml_reports_line_and_column(tmp_path: Path) -> None:
    message, path = rack_error(tmp_path, HEAD + "boards:\n  - id: a\n   chip: esp32\n")
    assert message.startswith(f"{path}:5:"), message
    assert "malformed YAML" in message and "indentation" in message


def test_malformed_yaml_unclosed_bracket(tmp_path: Path) -> None:
    message, path = rack_error(tmp_path, HEAD + "boards: [{id: a, chip: esp32\n")
    assert message.startswith(f"{path}:4:1: malformed YAML"), message


def test_two_documents_are_refused(tmp_path: Path) -> None:
    message, path = rack_error(tmp_path, HEAD + "---\n" + HEAD)
    assert message.startswith(f"{path}:") and "single document" in message


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_rack(tmp_path / "nope.yaml", environ=ENV)
    assert str(info.value).startswith(f"{tmp_path / 'nope.yaml'}: rack file not found")
    assert "--hil-rack" in str(info.value)
    with pytest.raises(ConfigError, match="is a directory"):
        load_rack(tmp_path, environ=ENV)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "rack.yaml"
    path.write_bytes(b"version: 1\nname: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_rack(path, environ=ENV)


def test_parse_rack_errors_use_the_source_name() -> None:
    with pytest.raises(ConfigError) as info:
        parse_rack(HEAD + "boards:\n  - {id: a, chip: esp33, port: virtual}\n", "inline.yaml",
                   environ=ENV)
    assert str(info.value).startswith("inline.yaml:4: boards[0].chip: ")
