"""The same boot test across the three chips of the family."""

import pytest


@pytest.mark.parametrize("chip", ["esp32", "esp32s2", "esp32c3"])
def test_boot_on_each_chip(request, chip, candidate):
    request.applymarker(pytest.mark.hil(count=1, chip=chip))
    dev = request.getfixturevalue("hil_device")
    assert dev.chip == chip
    info = dev.boot_info()
    assert (info.project, info.app_version) == (candidate["project"], candidate["version"])
    assert f"chip: {chip}" in dev.command("version")
