"""Over-the-air updates with Secure Boot V2 and anti-rollback on an ESP32-C3.

The board runs a signed factory app (1.0.0, secure_version 1) from a two-OTA build; its eFuses
trust the release key's digest, Secure Boot is on, and the anti-rollback counter is 1. Every
update goes through the app's own `ota <url>` (an HTTP download from `hil_ota_server`), so the
checks are the device's: the image's hash and signature, its secure_version, and the ESP-IDF
rollback state machine at the next boot.

On the virtual rack the eFuses are burned through the control endpoint and a new chip is put
back afterwards (`efuse new_chip`, a simulator-only op), so the board's next user gets a blank
one. On a real rig, keep such boards in a rack of their own: eFuses cannot be unburned.
"""

import re

import pytest
from conftest import OTA_CHIP


@pytest.fixture
def ota_device(request, ota_firmware, hil_farm):
    request.applymarker(pytest.mark.hil(count=1, chip=OTA_CHIP, firmware=str(ota_firmware.base)))
    dev = request.getfixturevalue("hil_device")
    control = hil_farm.control() if hil_farm.rack.is_virtual else None
    if control is not None:
        for burn in ({"key_digest": ota_firmware.key_digest}, {"secure_boot": True},
                     {"anti_rollback": True}, {"secure_version": 1}):
            control.request("efuse", board=dev.id, burn=burn)
    yield dev
    # The update changed otadata and the OTA slots behind the farm's back: make the next
    # flash of this board compare on the device instead of trusting what it last wrote.
    hil_farm.store.forget_flash(dev.id)
    if control is not None:
        control.request("efuse", board=dev.id, new_chip=True)


def running_version(dev):
    return re.search(r"version: (\S+)", dev.command("version")).group(1)


def test_signed_update_confirms(ota_device, ota_firmware, hil_ota_server):
    outcome = ota_device.ota_update(ota_firmware.images["good"], server=hil_ota_server)
    assert outcome.result == "confirmed", outcome.log
    assert outcome.before.app_version == "1.0.0"
    assert outcome.after.app_version == "1.1.0"
    assert outcome.running["partition"] == "ota_0"
    assert outcome.running["ota_state"] == "VALID"
    # It stays after a reset: the slot was confirmed, not just tried.
    info = ota_device.reset()
    assert info.app_version == "1.1.0" and info.partition_label == "ota_0"


def test_failing_self_test_rolls_back(ota_device, ota_firmware, hil_ota_server):
    outcome = ota_device.ota_update(ota_firmware.images["self-test-fails"],
                                    server=hil_ota_server)
    assert outcome.result == "rolled_back", outcome.log
    assert "self-test failed" in outcome.reason
    assert outcome.after.app_version == "1.0.0"
    assert running_version(ota_device) == "1.0.0"


@pytest.mark.parametrize("image, error", [
    ("tampered", "ESP_ERR_OTA_VALIDATE_FAILED"),
    ("rogue", "signed by a key that is not trusted"),
])
def test_tampered_or_foreign_image_is_rejected(ota_device, ota_firmware, hil_ota_server,
                                               image, error):
    outcome = ota_device.ota_update(ota_firmware.images[image], server=hil_ota_server)
    assert outcome.result == "rejected", outcome.log
    assert error in outcome.reason
    assert outcome.running["version"] == "1.0.0"
    assert ota_device.reset().app_version == "1.0.0"


def test_downgrade_below_secure_version_is_refused(ota_device, ota_firmware, hil_ota_server,
                                                   hil_farm):
    # Confirming 2.0.0 (secure_version 2) raises the anti-rollback eFuse to 2 ...
    assert ota_device.ota_update(ota_firmware.images["major"],
                                 server=hil_ota_server).result == "confirmed"
    if hil_farm.rack.is_virtual:
        efuse = hil_farm.control().request("efuse", board=ota_device.id)["efuse"]
        assert efuse["secure_version"] == 2
    # ... after which a correctly signed 1.1.0 (secure_version 1) is refused.
    outcome = ota_device.ota_update(ota_firmware.images["good"], server=hil_ota_server)
    assert outcome.result == "rejected", outcome.log
    assert "ESP_ERR_OTA_SMALL_SEC_VER" in outcome.reason
    assert outcome.running["version"] == "2.0.0"


def test_power_cut_during_update_keeps_old_version(ota_device, ota_firmware, hil_ota_server):
    url = hil_ota_server.publish("big.bin", ota_firmware.images["big"])
    hil_ota_server.slow("big.bin", 150_000)  # ~2.6 s for the whole image
    ota_device.command(f"ota {url}")
    ota_device.expect(r"OTA progress: \d+/\d+ bytes \((?:[2-6]\d)%\)", timeout=10)
    info = ota_device.power_cycle(off_seconds=0.5)  # power cut in the middle of the write
    assert info.app_version == "1.0.0" and info.partition_label == "factory"
    assert running_version(ota_device) == "1.0.0"
    assert hil_ota_server.bytes_served("big.bin") < ota_firmware.images["big"].stat().st_size
