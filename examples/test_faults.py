"""A firmware that crashes at boot is a failed test (with the panic in the log), not a rig error.

``test_crashing_firmware_fails`` is expected to fail: it shows what a crash looks like in a
report. The board it used stays usable: the next test gets a healthy board back.
"""

import pytest


@pytest.mark.xfail(strict=True, reason="demonstrates: a crash at boot is reported as a failure")
def test_crashing_firmware_fails(request, crashing_firmware):
    request.applymarker(pytest.mark.hil(count=1, chip="esp32", firmware=str(crashing_firmware)))
    dev = request.getfixturevalue("hil_device")
    assert "version:" in dev.command("version")


@pytest.mark.hil(count=1, chip="esp32")
def test_board_usable_after_crash(hil_device):
    assert "version:" in hil_device.command("version")


@pytest.mark.hil(count=1, chip="esp32")
def test_crash_command_panics_and_reboots(hil_device):
    hil_device.write("crash\n")
    hil_device.expect(r"Guru Meditation Error", timeout=5)
    hil_device.expect(r"Rebooting\.\.\.", timeout=5)
    hil_device.wait_boot()
    assert "version:" in hil_device.command("version")
