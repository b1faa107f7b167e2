"""Farm end to end on the virtual rack: health checks, flashing, skip paths, faults, status."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from pytest_hilfarm.description.rack import parse_rack
from pytest_hilfarm.drivers import flashing
from pytest_hilfarm.errors import (
    ConsoleTimeout,
    ImageError,
    InfrastructureError,
    PortError,
    UsageError,
)
from pytest_hilfarm.farm import Farm
from pytest_hilfarm.sim.appbuild import write_build_dir
from pytest_hilfarm.sim.model import Faults
from pytest_hilfarm.store import BoardHealth

RACK = """\
version: 1
name: farm-test
boards:
  - {id: esp32-1, chip: esp32, port: virtual, reset: virtual, power: virtual}
  - {id: esp32-2, chip: esp32, port: virtual, reset: virtual, power: virtual}
  - {id: esp32c3-1, chip: esp32c3, port: virtual, reset: virtual, power: virtual}
"""


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("builds")
    out = {
        "base": write_build_dir(root / "base", "esp32", "baseline", "b-1").path,
        "v1": write_build_dir(root / "v1", "esp32", "demo", "1.0.0").path,
        "v2": write_build_dir(root / "v2", "esp32", "demo", "2.0.0").path,
        "c3": write_build_dir(root / "c3", "esp32c3", "demo", "1.0.0").path,
        "crash": write_build_dir(root / "crash", "esp32", "demo", "9.9.9",
                                 faults=Faults(crash_at_boot=True)).path,
    }
    return out


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory, builds: dict[str, Path],
         private_virtual_rack: Path) -> Farm:
    root = tmp_path_factory.mktemp("rack")
    rack_file = root / "rack.yaml"
    rack_file.write_text(RACK.replace(
        "boards:", f"baseline: {{esp32: {builds['base']}}}\nboards:"))
    f = Farm.open(rack_file, log_root=root / "logs")
    yield f
    f.close()


def test_first_use_runs_health_check_then_flashes(farm: Farm, builds: dict[str, Path]) -> None:
    farm.store.set_health("esp32-1", BoardHealth.UNKNOWN, "test")
    with farm.session(1, chip="esp32", firmware=builds["v1"], test_id="first") as s:
        board = s.boards[0]
        assert board.health_checked
        assert farm.store.health(board.device.id).health == BoardHealth.GOOD
        info = board.device.boot_info()
        assert (info.project, info.app_version) == ("demo", "1.0.0")
        assert board.report is not None and board.report.written


def test_unchanged_firmware_is_not_flashed_again(farm: Farm, builds: dict[str, Path]) -> None:
    with farm.session(1, chip="esp32", firmware=builds["v1"]) as s:
        board_id = s.devices[0].id
    other = "esp32-2" if board_id == "esp32-1" else "esp32-1"
    with farm.session(1, chip="esp32", firmware=builds["v1"], exclude=[other]) as s:
        assert s.boards[0].report is None  # nothing sent: store digests + boot log agree
        assert s.devices[0].boot_info().app_version == "1.0.0"


def test_firmware_changed_behind_the_farms_back_is_reflashed(farm: Farm,
                                                             builds: dict[str, Path]) -> None:
    with farm.session(1, chip="esp32", firmware=builds["v1"]) as s:
        dev = s.devices[0]
        board_id = dev.id
        # A test (or a person) flashes other firmware without the farm's bookkeeping.
        dev.console.pause()
        try:
            flashing.flash(dev.port, "esp32", builds["v2"], before="no-reset",
                           after="no-reset", enter_download=dev.reset_driver.reset_to_download)
        finally:
            dev.console.resume()
    other = "esp32-2" if board_id == "esp32-1" else "esp32-1"
    with farm.session(1, chip="esp32", firmware=builds["v1"], exclude=[other]) as s:
        assert s.devices[0].id == board_id
        assert s.boards[0].report is not None  # the boot log gave the stale digests away
        assert s.devices[0].boot_info().app_version == "1.0.0"


def test_wrong_chip_firmware_is_refused_before_writing(farm: Farm,
                                                       builds: dict[str, Path]) -> None:
    with pytest.raises(ImageError, match="esp32c3"):
        farm.start_session(1, chip="esp32", firmware=builds["c3"])
    # The failed preparation released the board: it can be reserved again at once.
    lease = farm.reserve(2, chip="esp32", timeout=5)
    lease.release()


def test_corrupt_app_is_refused_before_anything_is_written(farm: Farm, builds: dict[str, Path],
                                                            tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(builds["v1"], bad)
    app = bad / "demo.bin"
    data = bytearray(app.read_bytes())
    data[0x400] ^= 0xFF  # inside a segment: the checksum and the appended SHA-256 fail
    app.write_bytes(bytes(data))
    before = {b: farm.store.flashed_digest(b, 0x10000) for b in ("esp32-1", "esp32-2")}
    with pytest.raises(ImageError, match=r"demo\.bin.*checksum failed"):
        farm.start_session(1, chip="esp32", firmware=bad, boot_timeout=5)
    assert {b: farm.store.flashed_digest(b, 0x10000) for b in before} == before


def test_firmware_that_crashes_leaves_the_board_for_a_health_check(
        farm: Farm, builds: dict[str, Path]) -> None:
    s = farm.start_session(1, chip="esp32", firmware=builds["crash"], boot_timeout=5)
    board = s.devices[0].id
    try:
        with pytest.raises(ConsoleTimeout, match="Guru Meditation Error"):
            s.devices[0].command("version")
        assert farm.store.health(board).health == BoardHealth.GOOD  # the rig is fine...
    finally:
        s.finish("failed")
    # ...but nobody else may get a board that only boots into a crash: a check comes first.
    state = farm.store.health(board)
    assert state.health == BoardHealth.UNKNOWN
    assert "health check due" in state.reason and "Guru Meditation Error" in state.reason
    others = [b for b in ("esp32-1", "esp32-2") if b != board]
    with farm.session(1, chip="esp32", exclude=others) as again:
        assert again.boards[0].health_checked
        assert again.devices[0].boot_info().project == "baseline"
        assert "version:" in again.devices[0].command("version")


def test_crash_in_app_main_shows_in_the_test(farm: Farm, builds: dict[str, Path]) -> None:
    with farm.session(1, chip="esp32", firmware=builds["crash"]) as s:
        with pytest.raises(ConsoleTimeout, match="Guru Meditation Error"):
            s.devices[0].command("version")
        assert farm.store.health(s.devices[0].id).health == BoardHealth.GOOD


def test_silent_board_is_a_rig_fault_and_marked_unknown(farm: Farm,
                                                         builds: dict[str, Path]) -> None:
    control = farm.control()
    control.unplug("esp32c3-1")
    try:
        with pytest.raises(InfrastructureError) as exc:
            farm.start_session(1, chip="esp32c3", firmware=builds["c3"], boot_timeout=3)
        assert "esp32c3-1" in getattr(exc.value, "board_ids", ())
        assert farm.store.health("esp32c3-1").health != BoardHealth.GOOD
    finally:
        control.plug("esp32c3-1")


def test_unplugged_usb_board_is_not_offered(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    rack = parse_rack(
        "version: 1\nname: usb\nboards:\n"
        "  - {id: a, chip: esp32, usb_serial: 'A1', power: none}\n"
        "  - {id: b, chip: esp32, usb_serial: 'B2', power: none}\n",
        "usb.yaml", environ={"HILFARM_STATE_DIR": str(tmp_path)},
    )
    plugged = {"A1": None, "B2": "/dev/ttyUSB1"}
    monkeypatch.setattr("pytest_hilfarm.farm.core.find_usb",
                        lambda serial=None, path=None: plugged.get(serial or ""))
    with Farm(rack, log_root=tmp_path / "logs") as f:
        with f.reserve(1, timeout=2) as lease:
            assert lease.boards == ("b",)
        with pytest.raises(PortError, match="a is unplugged"):
            f.reserve(2, timeout=2)


def test_unsatisfiable_request_says_why(farm: Farm) -> None:
    assert "esp32s2" in (farm.unsatisfiable(1, chip="esp32s2") or "")
    assert farm.unsatisfiable(2, chip="esp32") is None
    with pytest.raises(UsageError):
        farm.reserve(4, timeout=1)


def test_status_lists_every_board_with_holder(farm: Farm) -> None:
    with farm.reserve(1, chip="esp32c3", timeout=10, reason="status test"):
        rows = {r["board"]: r for r in farm.status()}
        assert set(rows) == {"esp32-1", "esp32-2", "esp32c3-1"}
        assert rows["esp32c3-1"]["holder"] and "status test" in rows["esp32c3-1"]["holder"]
    rows = {r["board"]: r for r in farm.status()}
    assert rows["esp32c3-1"]["holder"] is None


def test_port_lost_during_a_test_marks_the_board_unknown(farm: Farm,
                                                        builds: dict[str, Path]) -> None:
    control = farm.control()
    s = farm.start_session(1, chip="esp32", firmware=builds["v1"])
    board = s.devices[0].id
    try:
        assert not s.port_lost(board)
        control.unplug(board)
        deadline = time.monotonic() + 10
        while not s.port_lost(board):
            assert time.monotonic() < deadline, "the console never noticed the port vanish"
            time.sleep(0.05)
    finally:
        control.plug(board)
        s.finish("failed")  # the test failed, but the rig is to blame
    assert farm.store.health(board).health == BoardHealth.UNKNOWN
    # The next user gets it health-checked first, and then it works again.
    with farm.session(1, chip="esp32", firmware=builds["v1"], exclude=[
            b for b in ("esp32-1", "esp32-2") if b != board]) as again:
        assert again.boards[0].health_checked
        assert farm.store.health(board).health == BoardHealth.GOOD


def test_wrong_chip_refusal_keeps_what_the_store_knows(farm: Farm,
                                                      builds: dict[str, Path]) -> None:
    from pytest_hilfarm.farm import flash_boards

    flash_boards(farm, ["esp32-1"], builds["v1"])
    before = farm.store.flashed_digest("esp32-1", 0x10000)
    assert before is not None
    with pytest.raises(ImageError, match="built for esp32c3 only, not for esp32"):
        flash_boards(farm, ["esp32-1"], builds["c3"])
    assert farm.store.flashed_digest("esp32-1", 0x10000) == before
    status = {r["board"]: r for r in farm.status()}
    assert status["esp32-1"]["firmware"] == before.digest[:12]


def test_image_for_another_chip_revision_is_an_image_error_not_a_rig_fault(
        farm: Farm, builds: dict[str, Path], tmp_path: Path) -> None:
    import hashlib
    import struct

    from pytest_hilfarm.esp.image import parse_image

    build = tmp_path / "rev5"
    shutil.copytree(builds["c3"], build)
    app = build / "demo.bin"
    data = bytearray(app.read_bytes())
    struct.pack_into("<H", data, 15, 500)  # min_chip_rev_full: ESP32-C3 v5.0 does not exist
    end = parse_image(bytes(data), verify=False).length - 32  # where the SHA-256 is appended
    data[end:end + 32] = hashlib.sha256(data[:end]).digest()
    app.write_bytes(bytes(data))
    farm.store.set_health("esp32c3-1", BoardHealth.GOOD, "test")
    farm.store.forget_flash("esp32c3-1")
    with pytest.raises(ImageError) as err:
        farm.start_session(1, chip="esp32c3", firmware=build, boot_timeout=5)
    text = str(err.value)
    assert "requires chip revision in range v5.0 - v1.99 (this chip is revision v0.4)" in text
    assert "nothing was written" in text and "115200" not in text
    assert farm.store.health("esp32c3-1").health == BoardHealth.GOOD
    assert farm.store.flashed_digest("esp32c3-1", 0x10000) is None
