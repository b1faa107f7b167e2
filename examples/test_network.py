"""Updates and mesh traffic under bad networks: loss, latency and a 30 s outage.

`hil_network` applies the conditions to the boards' traffic: on the virtual rack through an
impairment proxy in front of the OTA server (`hil_network.proxy(...)`) and on the radio medium;
on a real rig through netem on the device-facing interface (the proxy is then a pass-through).
The firmware's `ota` resumes an interrupted download with an HTTP Range request, so an outage
costs time, not the update.
"""

import re
import time

import pytest
from conftest import OTA_CHIP, wait_for_mesh

OUTAGE_S = 30.0  # the coverage gap, used as is (the test takes about 45 s)


@pytest.fixture
def ota_board(request, ota_firmware, hil_farm):
    request.applymarker(pytest.mark.hil(count=1, chip=OTA_CHIP, firmware=str(ota_firmware.base)))
    dev = request.getfixturevalue("hil_device")
    yield dev
    hil_farm.store.forget_flash(dev.id)  # the update rewrote otadata and a slot


def version(dev):
    return re.search(r"version: (\S+)", dev.command("version")).group(1)


@pytest.mark.hil_network(loss=0.05, delay=500)
def test_ota_under_loss_and_latency_completes_or_keeps_old(ota_board, ota_firmware,
                                                           hil_ota_server, hil_network):
    name = "good.bin"
    hil_ota_server.publish(name, ota_firmware.images["good"])
    proxy = hil_network.proxy(hil_ota_server.address)
    outcome = ota_board.ota_update(proxy.url(f"/{name}"), timeout=180)
    assert outcome.result in ("confirmed", "rejected"), outcome.log
    expected = "1.1.0" if outcome.result == "confirmed" else "1.0.0"
    assert outcome.running["version"] == expected
    assert version(ota_board) == expected
    # On the virtual rack the proxy really delayed the transfer.
    if hil_farm_is_virtual(hil_network):
        assert proxy.stats().chunks > 0
        assert outcome.seconds >= 0.5


@pytest.mark.hil_network  # clean network; the outage comes in the middle of the download
def test_ota_survives_an_outage_in_the_middle(ota_board, ota_firmware, hil_ota_server,
                                              hil_network):
    name = "big.bin"
    size = ota_firmware.images["big"].stat().st_size
    hil_ota_server.publish(name, ota_firmware.images["big"])
    hil_ota_server.slow(name, size / 4.0)  # about 4 s of download
    proxy = hil_network.proxy(hil_ota_server.address)
    ota_board.command(f"ota {proxy.url('/' + name)}")
    ota_board.expect(r"OTA progress: \d+/\d+ bytes \((?:[1-5]\d)%\)", timeout=20)
    hil_network.outage(OUTAGE_S)  # blocks while the link is down
    outcome_line = ota_board.expect(r"hilfarm-demo: OTA (succeeded|failed)", timeout=60)
    assert outcome_line.group(1) == "succeeded", ota_board.console.tail(40)
    log = ota_board.console.text_since(0)
    assert "download interrupted at byte" in log and "(HTTP Range)" in log
    ota_board.wait_boot(timeout=20)
    assert version(ota_board) == "1.3.0"
    ranges = [r.range for r in hil_ota_server.requests_for(name)]
    assert ranges[0] is None and any(r and r.startswith("bytes=") for r in ranges[1:])


@pytest.mark.hil(count=3, chip="esp32", features=["mesh-radio"])
@pytest.mark.hil_network(loss=0.10)
def test_mesh_relays_under_10pct_loss(hil_devices, hil_network):
    n1, n2, n3 = sorted(hil_devices, key=lambda d: d.id)
    wait_for_mesh([n1, n2, n3])
    n3.command("mesh inbox clear")
    sent = 20
    for i in range(sent):
        n1.command(f"mesh send {n3.id} lossy-{i}")
    time.sleep(1.0)
    inbox = n3.command("mesh inbox")
    got = len(re.findall(rf"src={n1.id} dst={n3.id} hops=2 text=lossy-", inbox))
    # Two hops at 10 % loss each deliver about 81 %; at least half must get through.
    assert got >= sent // 2, inbox


def hil_farm_is_virtual(hil_network):
    return hil_network.describe().get("backend") == "virtual"
