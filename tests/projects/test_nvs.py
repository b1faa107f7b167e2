"""Per-board NVS partitions from a CSV template (Espressif's generator), read back."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import board_of, open_device, read_flash

from pytest_hilfarm.drivers.flashing import FlashPlan, builds, check_plan
from pytest_hilfarm.errors import ImageError
from pytest_hilfarm.projects import nvs
from pytest_hilfarm.sim import appbuild

CSV = """\
# per-board identity
key,type,encoding,value
identity,namespace,,
device_id,data,string,{board_id}
mac,data,string,{mac}
serial,data,u32,{serial}
offset,data,i16,-1200
ca,file,binary,ca.der
wifi,namespace,,
ssid,data,string,lab-{{2.4GHz}}
"""


@pytest.fixture()
def csv_file(tmp_path: Path) -> Path:
    (tmp_path / "ca.der").write_bytes(bytes(range(256)) * 3)  # spans blob entries
    path = tmp_path / "identity.csv"
    path.write_text(CSV)
    return path


@pytest.fixture()
def plan(tmp_path: Path) -> FlashPlan:
    return FlashPlan.from_build_dir(
        appbuild.write_build_dir(tmp_path / "build", "esp32", "demo", "1.0", layout="two_ota").path)


def test_each_board_gets_its_own_partition(csv_file: Path, plan: FlashPlan) -> None:
    one = nvs.board_region(csv_file, plan, board_id="esp32-1", mac="24:0A:C4:00:00:01",
                           values={"serial": 1001})
    two = nvs.board_region(csv_file, plan, board_id="esp32-2", mac="24:0A:C4:00:00:02",
                           values={"serial": 1002})
    # The two-OTA table puts nvs at 0x9000, 0x4000 bytes.
    assert (one.offset, one.size, one.limit, one.role) == (0x9000, 0x4000, 0x4000, "nvs")
    assert one.data != two.data
    back = nvs.read_nvs(one.data)
    assert back["identity"] == {"device_id": "esp32-1", "mac": "24:0a:c4:00:00:01",
                                "serial": 1001, "offset": -1200,
                                "ca": (csv_file.parent / "ca.der").read_bytes()}
    assert back["wifi"] == {"ssid": "lab-{2.4GHz}"}
    assert nvs.read_nvs(two.data)["identity"]["serial"] == 1002
    full = nvs.with_region(plan, one)
    assert [r.offset for r in full.regions] == [0x1000, 0x8000, 0x9000, 0xD000, 0x10000]
    check_plan(full, "esp32")


def test_placeholders_partitions_and_bad_rows_are_named(csv_file: Path, plan: FlashPlan,
                                                        tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"placeholder \{serial\} has no value"):
        nvs.board_region(csv_file, plan, board_id="esp32-1", mac="24:0a:c4:00:00:01")
    with pytest.raises(ImageError, match=r"no partition 'config' \(the table has nvs, otadata"):
        nvs.board_region(csv_file, plan, board_id="b", mac="00:00:00:00:00:00",
                         values={"serial": 1}, partition="config")
    with pytest.raises(ImageError, match="is not an NVS data partition"):
        nvs.board_region(csv_file, plan, board_id="b", mac="00:00:00:00:00:00",
                         values={"serial": 1}, partition="otadata")
    bad = tmp_path / "bad.csv"
    bad.write_text("key,type,encoding,value\nns,namespace,,\nthis_key_is_too_long,data,u8,1\n")
    with pytest.raises(ImageError, match=r"row 3.*longer than 15"):
        nvs.board_region(bad, plan, board_id="b")
    bad.write_text("key,type,encoding,value\nns,namespace,,\nn,data,u8,300\n")
    with pytest.raises(ImageError, match=r"row 3.*cannot store 'n' \(data, u8\)"):
        nvs.board_region(bad, plan, board_id="b")
    big = tmp_path / "big.csv"
    big.write_text("key,type,encoding,value\nns,namespace,,\n" + "".join(
        f"k{i},data,string,{'x' * 1000}\n" for i in range(20)))
    with pytest.raises(ImageError, match="make the nvs partition bigger"):
        nvs.board_region(big, plan, board_id="b")


def test_corruption_is_caught_when_reading_back(csv_file: Path, plan: FlashPlan) -> None:
    region = nvs.board_region(csv_file, plan, board_id="x", mac="00:00:00:00:00:00",
                              values={"serial": 7})
    data = bytearray(region.data)
    at = data.find(b"device_id")
    data[at + 17] ^= 0xFF  # inside the entry (its string length), covered by its CRC
    with pytest.raises(ImageError, match="bad CRC"):
        nvs.read_nvs(bytes(data))


def test_nvs_replaces_the_erased_area_of_a_merged_image(csv_file: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = appbuild.write_build_dir(tmp_path / "m", "esp32", "demo", "1.0", layout="two_ota")
    subprocess.run([sys.executable, "-m", "esptool", "--chip", "esp32", "merge-bin", "-o",
                    "merged.bin", "0x1000", "bootloader/bootloader.bin", "0x8000",
                    "partition_table/partition-table.bin", "0x10000", "demo.bin"],
                   cwd=out.path, check=True, capture_output=True)
    merged = builds.plan_for(out.path / "merged.bin")
    region = nvs.board_region(csv_file, merged, board_id="m", values={"serial": 3},
                              mac="00:00:00:00:00:03")
    plan = nvs.with_region(merged, region)
    assert [r for r in plan.regions if r.offset == 0x9000] == [region]
    starts = [r.offset for r in plan.regions]
    assert starts == sorted(starts) and 0xD000 in starts  # the rest of the merged file stays


def test_nvs_on_a_virtual_board(rack, csv_file: Path, plan: FlashPlan, tmp_path: Path) -> None:
    board = board_of(rack, "esp32")
    region = nvs.board_region(csv_file, plan, board_id=board["id"], mac=board["mac"],
                              values={"serial": 4242})
    device = open_device(rack, board, tmp_path / "dut.log")
    try:
        device.flash(nvs.with_region(plan, region))
        assert device.boot_info().project == "demo"  # the app still boots next to it
    finally:
        device.console.close()
    back = nvs.read_nvs(read_flash(rack, board, region.offset, region.size, tmp_path / "n.bin"))
    assert back["identity"]["device_id"] == board["id"]
    assert back["identity"]["mac"] == board["mac"].lower()
    assert back["identity"]["serial"] == 4242
