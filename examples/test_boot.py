"""Every board of the rack boots the candidate firmware, and it is the firmware we flashed."""

import pytest


@pytest.mark.hil(count=1)
def test_boots_candidate(hil_device, candidate):
    info = hil_device.boot_info()
    assert info.project == candidate["project"]
    assert info.app_version == candidate["version"]
    reply = hil_device.command("version")
    assert f"version: {candidate['version']}" in reply


@pytest.mark.hil(count=1)
def test_console_answers_status(hil_device):
    reply = hil_device.command("status")
    assert "uptime_s:" in reply
    assert "heap_free:" in reply


@pytest.mark.hil(count=1)
def test_reset_reboots_same_firmware(hil_device, candidate):
    info = hil_device.reset()
    assert info is not None and info.app_version == candidate["version"]
