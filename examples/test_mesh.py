"""Three ESP32s form a mesh; a message from node 1 reaches node 3 through node 2; it stays up.

The boards of one rack share a radio medium on the virtual rack (positions in rack order, so
node 1 hears only node 2). On a real rig the same test runs over the air.
"""

import re
import time

import pytest

FORMATION_LIMIT_S = 30.0
SOAK_S = 5.0


def joined_nodes(dev):
    reply = dev.command("mesh nodes")
    return int(re.search(r"nodes: (\d+)", reply).group(1))


def wait_for_mesh(devices, limit):
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if all(joined_nodes(d) == len(devices) - 1 for d in devices):
            return time.monotonic() - start
        time.sleep(0.25)
    pytest.fail(f"mesh did not form within {limit} s")


@pytest.mark.hil(count=3, chip="esp32", features=["mesh-radio"])
def test_mesh_forms_and_relays(hil_devices):
    n1, n2, n3 = sorted(hil_devices, key=lambda d: d.id)
    formation = wait_for_mesh([n1, n2, n3], FORMATION_LIMIT_S)
    assert formation < FORMATION_LIMIT_S

    n3.command("mesh inbox clear")
    n1.command(f"mesh send {n3.id} hello-from-1")
    n3.expect(rf"rx id=\d+ src={n1.id} hops=2", timeout=5)
    inbox = n3.command("mesh inbox")
    assert f"src={n1.id}" in inbox and "hops=2" in inbox and "text=hello-from-1" in inbox


@pytest.mark.hil(count=3, chip="esp32", features=["mesh-radio"])
def test_mesh_stays_up_over_soak(hil_devices):
    devices = sorted(hil_devices, key=lambda d: d.id)
    wait_for_mesh(devices, FORMATION_LIMIT_S)
    drops = 0
    samples = 0
    end = time.monotonic() + SOAK_S
    while time.monotonic() < end:
        for dev in devices:
            samples += 1
            if joined_nodes(dev) != len(devices) - 1:
                drops += 1
        time.sleep(0.2)
    assert samples > 0
    assert drops <= samples * 0.05, f"{drops} of {samples} samples saw a broken mesh"
