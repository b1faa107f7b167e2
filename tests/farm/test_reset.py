"""Reset drivers: DTR/RTS sequences against a recording serial port, virtual and none."""

from __future__ import annotations

import types

import pytest
from esp_pylib import serial_reset

from pytest_hilfarm.drivers.reset import (
    RESET_DRIVERS,
    ClassicReset,
    CustomReset,
    NoReset,
    ResetDriver,
    UsbJtagReset,
    VirtualReset,
    make_reset,
)
from pytest_hilfarm.errors import ConfigError, UsageError


class RecordingPort:
    """Records control-line writes; pyserial opens with DTR and RTS asserted."""

    def __init__(self) -> None:
        self.dtr = True
        self.rts = True
        self.events: list[tuple[str, bool | float]] = []

    def setDTR(self, value: bool = True) -> None:  # noqa: N802
        self.dtr = value
        self.events.append(("DTR", value))

    def setRTS(self, value: bool = True) -> None:  # noqa: N802
        self.rts = value
        self.events.append(("RTS", value))


def en_io0(dtr: bool, rts: bool) -> tuple[bool, bool]:
    """The DevKit auto-reset circuit: EN = !(RTS && !DTR), IO0 = !(DTR && !RTS)."""
    return (not (rts and not dtr), not (dtr and not rts))


@pytest.fixture(autouse=True)
def recorded_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool | float]]:
    """The sequences come from esp_pylib.serial_reset: record its waits in the port's events."""
    current: list[list[tuple[str, bool | float]]] = [[]]
    fake_time = types.SimpleNamespace(sleep=lambda s: current[0].append(("sleep", s)))
    monkeypatch.setattr(serial_reset, "time", fake_time)
    return current  # type: ignore[return-value]


def run(driver_cls, method: str, recorded_sleeps=None, **kw):
    port = RecordingPort()
    if recorded_sleeps is not None:
        recorded_sleeps[0] = port.events
    driver = driver_cls(lambda: port, **kw)
    getattr(driver, method)()
    return port, port.events


def test_classic_download_sequence_matches_esptool(recorded_sleeps) -> None:
    _, events = run(ClassicReset, "reset_to_download", recorded_sleeps)
    assert events == [
        ("DTR", False), ("RTS", True), ("DTR", False),  # IO0 high, EN low (+DTR rewrite)
        ("sleep", 0.1),
        ("DTR", True), ("RTS", False), ("DTR", True),  # IO0 low, EN high: samples IO0 low
        ("sleep", 0.05),
        ("DTR", False),  # release IO0
    ]


def test_classic_download_enters_download_mode_in_circuit_model(recorded_sleeps) -> None:
    port = RecordingPort()
    recorded_sleeps[0] = port.events
    dtr, rts = port.dtr, port.rts
    ClassicReset(lambda: port).reset_to_download()
    # Replay through the circuit. The chip samples IO0 when EN's RC delay expires, i.e. at the
    # first wait after EN rose; the (1,1) transient between two line writes does not count.
    en_prev, rose, sampled = en_io0(dtr, rts)[0], False, None
    for name, value in port.events:
        if name == "sleep":
            if rose and sampled is None:
                sampled = en_io0(dtr, rts)[1]
            continue
        if name == "DTR":
            dtr = bool(value)
        else:
            rts = bool(value)
        en = en_io0(dtr, rts)[0]
        rose = rose or (en and not en_prev)
        en_prev = en
    assert sampled is False  # IO0 low when EN came up: download mode
    assert en_io0(dtr, rts) == (True, True)  # lines released at the end


def test_classic_app_reset_releases_dtr_first(recorded_sleeps) -> None:
    port, events = run(ClassicReset, "reset_to_app", recorded_sleeps)
    assert events == [
        ("DTR", False),
        ("RTS", True), ("DTR", False),
        ("sleep", 0.1),
        ("RTS", False), ("DTR", False),
    ]
    assert en_io0(port.dtr, port.rts) == (True, True)


def test_usb_jtag_sequence_matches_esptool(recorded_sleeps) -> None:
    # esp_pylib's usb_jtag_bootloader_reset (esptool's USBJTAGSerialReset).
    _, events = run(UsbJtagReset, "reset_to_download", recorded_sleeps)
    assert events == [
        ("RTS", False), ("DTR", True), ("DTR", False),
        ("sleep", 0.1),
        ("DTR", True), ("RTS", False), ("DTR", True),
        ("sleep", 0.1),
        ("RTS", True), ("DTR", True), ("DTR", False), ("RTS", True), ("DTR", False),
        ("sleep", 0.1),
        ("DTR", False), ("RTS", False), ("DTR", False),
    ]


def test_custom_sequences_from_the_rack_file(recorded_sleeps) -> None:
    port, events = run(CustomReset, "reset_to_download", recorded_sleeps,
                       download="D0|R1|W0.1|D1|R0|W0.05|D0", app="R1|W0.2|R0")
    assert events == [("DTR", False), ("RTS", True), ("DTR", False), ("sleep", 0.1),
                      ("DTR", True), ("RTS", False), ("DTR", True), ("sleep", 0.05),
                      ("DTR", False)]
    events.clear()
    CustomReset(lambda: port, download="D0", app="R1|W0.2|R0").reset_to_app()
    assert events == [("RTS", True), ("DTR", False), ("sleep", 0.2), ("RTS", False),
                      ("DTR", False)]
    assert CustomReset(lambda: port, download="D0|R1").esptool_before == "custom:D0|R1"


def test_esptool_before_per_driver() -> None:
    port = RecordingPort()
    assert ClassicReset(lambda: port).esptool_before == "default-reset"
    assert UsbJtagReset(lambda: port).esptool_before == "usb-reset"
    assert VirtualReset(object(), "b").esptool_before == "no-reset"  # type: ignore[arg-type]
    assert NoReset().esptool_before == "no-reset"


def test_virtual_reset_uses_control() -> None:
    calls: list[tuple[str, str]] = []

    class Control:
        def reset(self, board: str, boot: str = "flash") -> None:
            calls.append((board, boot))

    driver = VirtualReset(Control(), "esp32c3-1")
    driver.reset_to_download()
    driver.reset_to_app()
    assert calls == [("esp32c3-1", "download"), ("esp32c3-1", "flash")]


def test_no_reset_refuses() -> None:
    with pytest.raises(UsageError) as info:
        NoReset("esp32-3").reset_to_app()
    assert "esp32-3" in str(info.value) and "reset: none" in str(info.value)


def test_registry_and_factory() -> None:
    assert set(RESET_DRIVERS) == {"classic", "usb-jtag", "custom", "virtual", "none"}
    port = RecordingPort()
    driver = make_reset("classic", {"port": port, "hold_delay": 0})
    assert isinstance(driver, ResetDriver)
    driver.reset_to_app()
    assert port.events[0] == ("DTR", False)
    driver = make_reset("usb-jtag", {"port": lambda: port, "settle_delay": 0, "hold_delay": 0})
    driver.reset_to_app()
    assert isinstance(make_reset("none", {"board": "x"}), NoReset)
    with pytest.raises(ConfigError, match="unknown reset driver 'dtr'"):
        make_reset("dtr", {})
    with pytest.raises(ConfigError, match="missing parameter.*port"):
        make_reset("classic", {})
