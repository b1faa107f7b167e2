"""One rack parser: the farm's form, the virtual rack's short form and data both go through it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pytest_hilfarm.description.rack import load_rack, parse_rack, rack_from_data
from pytest_hilfarm.description.virtual import load_virtual_rack, parse_virtual_rack
from pytest_hilfarm.errors import ConfigError

ENV = {"HOME": "/home/tester"}
HEAD = "version: 1\nname: test-rig\nboards:\n"


def test_the_farm_loader_checks_the_sim_section(tmp_path: Path) -> None:
    # The farm used to admit any mapping under sim: and leave the daemon to refuse it later.
    path = tmp_path / "rack.yaml"
    path.write_text(HEAD + "  - id: a\n    chip: esp32c3\n    port: virtual\n"
                    "    sim: {revision: v0.x}\n")
    with pytest.raises(ConfigError) as info:
        load_rack(path, environ=ENV)
    assert str(info.value).startswith(f"{path}:7: boards[0].sim.revision: ")
    assert "not a chip revision" in str(info.value)


def test_the_farm_loader_keeps_the_sim_section(tmp_path: Path) -> None:
    rack = parse_rack(HEAD + "  - id: a\n    chip: esp32c3\n    port: virtual\n"
                      "    sim: {mac: '58:cf:79:00:00:0a', key_digests: [" + "01" * 32 + "],"
                      " secure_version: 3}\n", environ=ENV)
    sim = rack.boards[0].sim
    assert sim is not None and sim.mac == bytes.fromhex("58cf7900000a")
    # Written unquoted, the digest is a YAML integer: its leading zero must survive.
    assert sim.security is not None and sim.security.key_digests == (bytes.fromhex("01" * 32),)
    assert sim.security.secure_version == 3 and sim.revision is None


def test_short_form_defaults_and_the_strict_form_refuses_them() -> None:
    text = "boards:\n  - {id: a, chip: ESP32-C3}\n  - {id: b, chip: esp32, port: /dev/ttyUSB0}\n"
    rack = parse_rack(text, "/racks/bench.yaml", environ=ENV, short_form=True)
    assert rack.name == "bench" and rack.version == 1
    assert [(b.id, b.chip, b.port.kind, b.reset, b.power.driver) for b in rack.boards] == [
        ("a", "esp32c3", "virtual", "virtual", "virtual"),
        ("b", "esp32", "path", "classic", "none"),
    ]
    with pytest.raises(ConfigError, match="missing required key 'version'"):
        parse_rack(text, environ=ENV)
    with pytest.raises(ConfigError, match="board 'a' has no port"):
        parse_rack("version: 1\nname: x\n" + text, environ=ENV)


@pytest.mark.parametrize(("text", "needle"), [
    ("version: 2\nboards: [{id: a, chip: esp32}]\n", "unsupported rack file version 2"),
    ("boards: [{id: a, chip: esp32}]\nbords: []\n", "did you mean 'boards'?"),
    ("boards: [{id: a, chip: esp32, port: virtual, reset: classic}]\n",
     "does not apply to a virtual board"),
    ("boards: [{id: a, chip: esp32, port: /dev/ttyUSB0, sim: {rollback: true}}]\n",
     "sim: applies to virtual boards only"),
])
def test_short_form_keeps_every_other_check(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "short.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle) as info:
        load_virtual_rack(path)
    assert str(info.value).startswith(f"{path}:")


def test_data_and_text_give_the_same_rack_and_errors() -> None:
    data = {"name": "r", "boards": [
        {"id": "a", "chip": "esp32", "features": ["z-radio", "a-sensor"],
         "sim": {"rollback": False, "flash_size": "8MB"}},
        {"id": "b", "chip": "esp32s3", "flash": {"size": "16MB"}},
        {"id": "c", "chip": "esp32", "flash": {"size": "keep"}},
    ]}
    from_data = rack_from_data(data, "r.yaml", environ=ENV, short_form=True)
    from_text = parse_rack(yaml.safe_dump(data), "r.yaml", environ=ENV, short_form=True)
    assert [(b.id, b.chip, b.features, b.sim) for b in from_data.boards] == [
        (b.id, b.chip, b.features, b.sim) for b in from_text.boards]
    view = parse_virtual_rack(data, "r.yaml")
    assert [(b.id, b.flash_size >> 20, b.features) for b in view.boards] == [
        ("a", 8, ("a-sensor", "z-radio")), ("b", 16, ()), ("c", 4, ())]
    bad = {"boards": [{"id": "a", "chip": "esp32", "sim": {"mac": "58:cf:79"}}]}
    with pytest.raises(ConfigError) as info:
        rack_from_data(bad, "inline", short_form=True)
    # Data has no lines: the error names the source and the key path alone.
    assert str(info.value).startswith("inline: boards[0].sim.mac: mac '58:cf:79' is not six")


def test_a_mixed_rack_reads_the_same_in_both_forms(tmp_path: Path) -> None:
    path = tmp_path / "mixed.yaml"
    path.write_text(HEAD + "  - {id: real-1, chip: esp32, port: /dev/ttyUSB0}\n"
                    "  - {id: v-1, chip: esp32c3, port: virtual, sim: {revision: 'v0.4'}}\n")
    farm = load_rack(path, environ=ENV)
    view = load_virtual_rack(path)
    assert [b.id for b in farm.boards if b.is_virtual] == [b.id for b in view.boards] == ["v-1"]
    assert view.boards[0].revision == 4 and view.boards[0].position == 0
    assert view.boards[0].where == f"{path}:5: boards[1]"
    assert view.name == farm.name == "test-rig"


def test_a_board_id_must_be_a_plain_name_in_both_forms() -> None:
    for short in (False, True):
        with pytest.raises(ConfigError, match="plain name"):
            parse_rack(HEAD + "  - {id: .hidden, chip: esp32, port: virtual}\n", environ=ENV,
                       short_form=short)


def test_network_profiles_are_read_through_the_rack_loader(tmp_path: Path) -> None:
    from pytest_hilfarm.description.network import load_profiles

    path = tmp_path / "rack.yaml"
    path.write_text("version: 1\nnetwork_profiles:\n  x: {loss: [1%\n")
    with pytest.raises(ConfigError) as info:
        load_profiles(path)
    # The rack loader's YAML error: file, line and column, and what to check.
    assert str(info.value).startswith(f"{path}:4:1: malformed YAML")
    with pytest.raises(ConfigError, match="rack file not found"):
        load_profiles(tmp_path / "missing.yaml")
