import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_hilfarm.esp.chips import FARM_CHIPS as CHIPS
from pytest_hilfarm.esp.image import SignatureBlock, parse_image
from pytest_hilfarm.esp.otadata import OtaSelectEntry, OtaState
from pytest_hilfarm.esp.partitions import Partition, PartitionTable
from pytest_hilfarm.sim.appbuild import build_app, build_bootloader, build_flash_layout
from pytest_hilfarm.sim.boot import (
    BootEfuse,
    boot,
    mark_invalid,
    mark_valid,
    read_running_state,
    set_boot_partition,
)
from pytest_hilfarm.sim.model import AppInfo, Faults

OTADATA = 0xD000
SLOT = {"factory": 0x10000, "ota_0": 0x110000, "ota_1": 0x210000}


class FakeFlash:
    """bytearray-backed NOR flash: writes AND, erases 4 KiB sectors, counts operations."""

    def __init__(self, size=4 * 1024 * 1024):
        self.buf = bytearray(b"\xff" * size)
        self.erases = []

    @property
    def size(self):
        return len(self.buf)

    def read(self, addr, n):
        return bytes(self.buf[addr : addr + n])

    def write(self, addr, data):
        for i, b in enumerate(data):
            self.buf[addr + i] &= b

    def erase(self, addr, n):
        assert addr % 4096 == 0 and n % 4096 == 0, (hex(addr), n)
        self.erases.append((addr, n))
        self.buf[addr : addr + n] = b"\xff" * n

    def program(self, addr, data):
        """Erase-then-write, as a flasher does."""
        start = addr // 4096 * 4096
        end = (addr + len(data) + 4095) // 4096 * 4096
        self.erase(start, end - start)
        self.write(addr, data)

    def otadata(self):
        return (OtaSelectEntry.decode(self.read(OTADATA, 32)),
                OtaSelectEntry.decode(self.read(OTADATA + 0x1000, 32)))


def flashed(chip="esp32", layout="two-ota", app=None, **kw):
    f = FakeFlash()
    app = app if app is not None else build_app(chip, "factory_app", "1.0", **kw)
    for off, data in build_flash_layout(chip, app, layout):
        f.program(off, data)
    return f


def put(f, chip, slot, version, **kw):
    f.program(SLOT[slot], build_app(chip, "demo", version, **kw))


def ok(outcome):
    assert outcome.app is not None, outcome.log
    assert not outcome.boot_loop and not outcome.halted and outcome.error is None
    return outcome.app


def failed(outcome, *texts):
    assert outcome.app is None, outcome.log
    assert outcome.boot_loop or outcome.halted
    assert outcome.error
    for text in texts:
        assert text in outcome.log, (text, outcome.log)
    return outcome


@pytest.mark.parametrize("chip", CHIPS)
def test_factory_boot_log(chip):
    f = flashed(chip, "factory", faults=Faults(slow_boot=3.0))
    out = boot(chip, f)
    app = ok(out)
    assert (app.project, app.version, app.chip, app.partition_label) == \
        ("factory_app", "1.0", chip, "factory")
    assert app.partition_offset == 0x10000 and app.ota_state is None
    assert app.faults == Faults(slow_boot=3.0)
    assert app.image_sha256 == parse_image(f.read(0x10000, 0x100000)[:66128]).sha256_hex
    log = out.log
    assert log.endswith("\r\n") and "\n" not in log.replace("\r\n", "")
    assert "(SPI_FAST_FLASH_BOOT)" in log.splitlines()[2 if chip == "esp32" else 2]
    for text in ["boot: ESP-IDF v5.3.1 2nd stage bootloader", "boot: Partition Table:",
                 " 0 nvs              WiFi data        01 02 00009000 00006000",
                 "boot: Loaded app from partition at offset 0x10000",
                 "app_init: Application information:", "app_init: Project name:     factory_app",
                 "app_init: App version:      1.0", "app_init: ESP-IDF:          v5.3.1",
                 "cpu_start: Pro cpu start user code"]:
        assert text in log, text
    assert f"boot.{chip}: SPI Flash Size : 4MB" in log


def test_rom_banner_reset_reasons():
    f = flashed("esp32c3", "factory")
    assert "rst:0x3 (RTC_SW_SYS_RST),boot:0xc (SPI_FAST_FLASH_BOOT)" in \
        boot("esp32c3", f, reset_reason="sw").log
    assert boot("esp32", flashed("esp32", "factory")).log.startswith(
        "ets Jun  8 2016 00:22:57\r\n\r\nrst:0x1 (POWERON_RESET),boot:0x13 (SPI_FAST_FLASH_BOOT)")


# --- the rollback state machine as a table ---------------------------------------------------
# Each step: (action, expected booted partition, expected ota_state, expected otadata states)
ROLLBACK_TABLE = [
    ("boot", "factory", None, ("UNDEFINED", "UNDEFINED")),
    ("ota_0", "ota_0", "PENDING_VERIFY", ("PENDING_VERIFY", "UNDEFINED")),  # NEW -> PENDING
    ("mark_valid+boot", "ota_0", "VALID", ("VALID", "UNDEFINED")),
    ("boot", "ota_0", "VALID", ("VALID", "UNDEFINED")),  # VALID stays
    ("ota_1", "ota_1", "PENDING_VERIFY", ("VALID", "PENDING_VERIFY")),
    ("boot", "ota_0", "VALID", ("VALID", "ABORTED")),  # reset before confirm -> rollback
    ("boot", "ota_0", "VALID", ("VALID", "ABORTED")),  # ABORTED is skipped from now on
    ("ota_1", "ota_1", "PENDING_VERIFY", ("VALID", "PENDING_VERIFY")),
    ("mark_invalid+boot", "ota_0", "VALID", ("VALID", "INVALID")),  # INVALID skipped
    ("ota_1", "ota_1", "PENDING_VERIFY", ("VALID", "PENDING_VERIFY")),
    ("mark_valid+boot", "ota_1", "VALID", ("VALID", "VALID")),  # higher seq wins
    ("invalidate_both+boot", "factory", None, ("INVALID", "INVALID")),  # both invalid -> factory
]


def test_rollback_state_machine_table():
    chip = "esp32"
    f = flashed(chip)
    put(f, chip, "ota_0", "2.0")
    put(f, chip, "ota_1", "3.0")
    last: AppInfo | None = None
    for step, (action, part, state, otadata) in enumerate(ROLLBACK_TABLE):
        if action in ("ota_0", "ota_1"):
            assert set_boot_partition(f, action) == "ESP_OK"
        elif action == "mark_valid+boot":
            assert last is not None and mark_valid(f, last) == "ESP_OK"
        elif action == "mark_invalid+boot":
            assert last is not None and mark_invalid(f, last) == "ESP_OK"
        elif action == "invalidate_both+boot":
            e0, e1 = f.otadata()
            for i, e in enumerate((e0, e1)):
                f.erase(OTADATA + i * 0x1000, 0x1000)
                f.write(OTADATA + i * 0x1000, e.with_state(OtaState.INVALID).encode())
        app = ok(boot(chip, f))
        assert (app.partition_label, app.ota_state) == (part, state), (step, action)
        assert tuple(e.state_name for e in f.otadata()) == otadata, (step, action)
        assert read_running_state(f, app) == state
        last = app


def test_new_image_gets_exactly_one_attempt():
    f = flashed()
    put(f, "esp32", "ota_1", "2.0")
    set_boot_partition(f, "ota_1")
    assert f.otadata()[0].state == OtaState.NEW
    assert ok(boot("esp32", f)).partition_label == "ota_1"
    assert ok(boot("esp32", f)).partition_label == "factory"
    assert f.otadata()[0].state == OtaState.ABORTED


def test_without_rollback_option_states_are_unused():
    f = flashed()
    put(f, "esp32", "ota_0", "2.0")
    set_boot_partition(f, "ota_0", rollback_enabled=False)
    for _ in range(3):
        app = ok(boot("esp32", f, rollback_enabled=False))
        assert (app.partition_label, app.ota_state) == ("ota_0", "UNDEFINED")


def test_otadata_writes_erase_only_their_own_sector():
    f = flashed()
    put(f, "esp32", "ota_1", "2.0")
    set_boot_partition(f, "ota_1")
    f.erases.clear()
    boot("esp32", f)  # NEW -> PENDING_VERIFY rewrite of copy 0
    assert f.erases == [(OTADATA, 0x1000)]
    f.erases.clear()
    boot("esp32", f)  # PENDING_VERIFY -> ABORTED
    assert f.erases == [(OTADATA, 0x1000)]


def test_anti_rollback_skips_lower_secure_version():
    chip = "esp32c3"
    f = flashed(chip)
    put(f, chip, "ota_0", "2.0", secure_version=2)
    put(f, chip, "ota_1", "1.5", secure_version=1)
    set_boot_partition(f, "ota_0")
    efuse = BootEfuse(anti_rollback=True, secure_version=2)
    app = ok(boot(chip, f, efuse=efuse))
    assert mark_valid(f, app) == "ESP_OK"
    set_boot_partition(f, "ota_1")  # a downgrade that the eFuse forbids
    out = boot(chip, f, efuse=efuse)
    app = ok(out)
    assert (app.partition_label, app.secure_version) == ("ota_0", 2)
    assert "Secure version (from eFuse) = 2" in out.log
    # Without the eFuse value the downgrade would have booted.
    set_boot_partition(f, "ota_1")
    assert ok(boot(chip, f, efuse=BootEfuse(anti_rollback=True))).partition_label == "ota_1"


def test_no_factory_initial_otadata_boots_ota0_and_sets_seq():
    chip = "esp32"
    f = FakeFlash()
    table = PartitionTable((
        Partition("nvs", 1, 2, 0x9000, 0x4000), Partition("otadata", 1, 0, 0xD000, 0x2000),
        Partition("ota_0", 0, 0x10, 0x10000, 0x100000),
        Partition("ota_1", 0, 0x11, 0x110000, 0x100000)))
    f.program(0x1000, build_bootloader(chip))
    f.program(0x8000, table.encode())
    f.program(0x10000, build_app(chip, "p", "1"))
    out = boot(chip, f)
    app = ok(out)
    assert app.partition_label == "ota_0" and app.ota_state == "VALID"
    assert "boot: No factory image, trying OTA 0" in out.log
    assert "boot: Set actual ota_seq=1 in otadata[0]" in out.log
    assert f.otadata()[0] == OtaSelectEntry.make(1, OtaState.VALID)


def test_selected_slot_broken_falls_back_downwards():
    f = flashed()
    put(f, "esp32", "ota_0", "2.0")
    put(f, "esp32", "ota_1", "3.0")
    set_boot_partition(f, "ota_1")
    f.buf[SLOT["ota_1"]] = 0x00  # magic gone
    out = boot("esp32", f)
    assert ok(out).partition_label == "ota_0"
    assert "esp_image: image at 0x210000 has invalid magic byte (nothing flashed here?)" in out.log
    assert "boot: OTA app partition slot 1 is not bootable" in out.log


def test_faults_reach_boot_outcome():
    f = flashed()
    faults = Faults(crash_at_boot=True, drop_mesh=0.5)
    put(f, "esp32", "ota_0", "2.0", faults=faults)
    set_boot_partition(f, "ota_0")
    assert ok(boot("esp32", f)).faults == faults


# --- broken chains -------------------------------------------------------------------------

@pytest.mark.parametrize("chip", CHIPS)
def test_erased_flash(chip):
    out = failed(boot(chip, FakeFlash()), "invalid header: 0xffffffff")
    assert out.boot_loop and out.error == "invalid header: 0xffffffff"


def test_bootloader_for_wrong_chip():
    f = flashed("esp32", "factory")
    f.program(0x1000, build_bootloader("esp32c3"))
    out = failed(boot("esp32", f), "invalid header: 0x")
    assert out.boot_loop
    # An ESP32 layout on a C3: the C3 ROM reads offset 0x0, which is erased.
    failed(boot("esp32c3", flashed("esp32", "factory")), "invalid header: 0xffffffff")


def test_bootloader_checksum():
    f = flashed("esp32", "factory")
    img = parse_image(build_bootloader("esp32"))
    f.buf[0x1000 + img.segments[1].data_offset] ^= 0xFF
    failed(boot("esp32", f), "csum err:")


def test_corrupt_partition_table_md5():
    f = flashed("esp32", "two-ota")
    f.buf[0x8000 + 32 + 8] ^= 0x10  # otadata size
    out = failed(boot("esp32", f), "E (", "flash_parts: Incorrect MD5 checksum",
                 "boot: Failed to verify partition table")
    assert out.boot_loop  # bootloader_reset() in IDF's bootloader_start.c


def test_partition_table_missing():
    f = flashed("esp32", "factory")
    f.erase(0x8000, 0x1000)
    # An erased table verifies as an empty table in ESP-IDF; nothing is bootable then.
    out = failed(boot("esp32", f), "boot: End of partition table",
                 "boot: No bootable app partitions in the partition table")
    assert "Failed to verify" not in out.log


@pytest.mark.parametrize("chip,other,expected,found", [("esp32", "esp32c3", 0, 5),
                                                        ("esp32c3", "esp32s2", 5, 2)])
def test_app_for_wrong_chip(chip, other, expected, found):
    f = flashed(chip, "factory")
    f.program(0x10000, build_app(other, "p", "1"))
    failed(boot(chip, f), f"boot_comm: mismatch chip ID, expected {expected}, found {found}",
           "boot: Factory app partition is not bootable",
           "E (", "boot: No bootable app partitions in the partition table")


def test_bad_checksum():
    f = flashed("esp32s2", "factory")
    img = parse_image(f.read(0x10000, 0x20000))
    f.buf[0x10000 + img.segments[-1].data_offset + 8] ^= 0x5A
    failed(boot("esp32s2", f), "esp_image: Checksum failed. Calculated 0x",
           "boot: No bootable app partitions in the partition table")


def test_bad_sha256():
    f = flashed("esp32c3", "factory")
    img = parse_image(f.read(0x10000, 0x20000))
    f.buf[0x10000 + img.length - 1] ^= 0x01
    failed(boot("esp32c3", f), "esp_image: Image hash failed - image is corrupt")


def test_empty_slots():
    f = flashed("esp32", "two-ota")
    f.erase(0x10000, 0x100000)
    out = failed(boot("esp32", f),
                 "esp_image: image at 0x10000 has invalid magic byte (nothing flashed here?)",
                 "boot: Factory app partition is not bootable",
                 "esp_image: image at 0x110000 has invalid magic byte",
                 "boot: OTA app partition slot 1 is not bootable",
                 "boot: No bootable app partitions in the partition table")
    assert out.error == "boot: No bootable app partitions in the partition table"


def test_image_larger_than_partition():
    f = flashed("esp32", "factory")
    app = bytearray(build_app("esp32", "p", "1"))
    f.program(0x10000, bytes(app))
    # claim the last segment is 2 MB long
    img = parse_image(bytes(app))
    seg = img.segments[-1]
    f.buf[0x10000 + seg.header_offset + 4 : 0x10000 + seg.header_offset + 8] = \
        (2 << 20).to_bytes(4, "little")
    failed(boot("esp32", f), "doesn't fit in partition length 1048576")


def test_secure_boot_rejects_unsigned_app():
    f = flashed("esp32c3", "factory")
    out = failed(boot("esp32c3", f, efuse=BootEfuse(secure_boot_enabled=True,
                                                     key_digests=(b"\x00" * 32,))),
                 "esp_image: Secure boot signature verification failed")
    assert "image valid, signature bad" in out.log


def test_secure_boot_accepts_matching_signature_block(tmp_path):
    espsecure = pytest.importorskip("espsecure")
    import contextlib
    import io

    key, unsigned, signed = tmp_path / "k.pem", tmp_path / "a.bin", tmp_path / "s.bin"
    unsigned.write_bytes(build_app("esp32c3", "signed", "1"))
    with contextlib.redirect_stdout(io.StringIO()):
        espsecure.generate_signing_key(version="2", scheme="ecdsa256", keyfile=str(key))
        with key.open("rb") as k, unsigned.open("rb") as d:
            espsecure.sign_data(version="2", keyfile=[k], output=str(signed),
                                append_signatures=False, hsm=False, hsm_config=None,
                                pub_key=[], signature=[], datafile=d, skip_padding=False)
    data = signed.read_bytes()
    f = flashed("esp32c3", "factory", app=data)
    sector = parse_image(data).signature_sector
    assert sector is not None and sector.blocks[0].key_digest is not None
    digest = sector.blocks[0].key_digest
    seen: list[bytes] = []

    def verifier(block: SignatureBlock, image_digest: bytes) -> bool:
        seen.append(image_digest)
        return True

    app = ok(boot("esp32c3", f, efuse=BootEfuse(secure_boot_enabled=True, key_digests=(digest,)),
                  signature_verifier=verifier))
    assert app.project == "signed"
    assert seen == [hashlib.sha256(data[:0x11000]).digest()]
    failed(boot("esp32c3", f, efuse=BootEfuse(secure_boot_enabled=True,
                                               key_digests=(b"\x01" * 32,))),
           "Secure boot signature verification failed")


def test_mark_calls_on_factory_and_without_fallback():
    f = flashed()
    app = ok(boot("esp32", f))
    assert mark_valid(f, app) == "ESP_FAIL"  # "Running firmware is factory"
    f2 = flashed()
    f2.erase(0x10000, 0x100000)  # no factory image to fall back to
    put(f2, "esp32", "ota_0", "2.0")
    set_boot_partition(f2, "ota_0")
    app = ok(boot("esp32", f2))
    assert mark_invalid(f2, app) == "ESP_ERR_OTA_ROLLBACK_FAILED"
    assert f2.otadata()[0].state == OtaState.PENDING_VERIFY
    assert mark_valid(flashed("esp32", "factory"), app) == "ESP_ERR_NOT_FOUND"


_BASE: dict[str, bytes] = {}


def base_image(chip):
    if chip not in _BASE:
        f = flashed(chip)
        put(f, chip, "ota_0", "2.0")
        set_boot_partition(f, "ota_0")
        _BASE[chip] = bytes(f.buf[:0x320000])
    return _BASE[chip]


HOT_SPOTS = [(0x0, 0x100), (0x1000, 0x600), (0x8000, 0xE0), (0xD000, 0x20), (0xE000, 0x20),
             (0x10000, 0x400), (0x20000, 0x40), (0x110000, 0x400)]


@settings(max_examples=60, deadline=None)
@given(chip=st.sampled_from(CHIPS), data=st.data())
def test_corrupted_flash_never_boots_silently(chip, data):
    f = FakeFlash()
    f.buf[: 0x320000] = base_image(chip)
    for _ in range(data.draw(st.integers(1, 4))):
        start, span = data.draw(st.sampled_from(HOT_SPOTS))
        at = start + data.draw(st.integers(0, span - 1))
        f.buf[at] ^= data.draw(st.integers(1, 255))
    out = boot(chip, f, efuse=BootEfuse(anti_rollback=data.draw(st.booleans())))
    assert out.log.startswith(("ets ", "ESP-ROM:"))
    if out.app is None:
        assert out.boot_loop and out.error and out.error in out.log
    else:
        assert "boot: Loaded app from partition at offset" in out.log
        assert out.app.partition_label in ("factory", "ota_0", "ota_1")


def test_an_unchanged_image_is_parsed_once_and_any_flash_write_makes_boot_read_it_again(tmp_path):
    """The boot chain keeps a parsed image while the flash's generation is unchanged; every
    write or erase, wherever it lands, makes the next boot read and check the image again."""
    from pytest_hilfarm.sim.boot import parse_flash_image
    from pytest_hilfarm.sim.flash import FlashMemory

    with FlashMemory(tmp_path / "board.flash", 4 * 1024 * 1024) as f:
        layout = build_flash_layout("esp32", build_app("esp32", "factory_app", "1.0"), "factory")
        for off, data in layout:
            f.erase(off // 4096 * 4096, (len(data) + off % 4096 + 4095) // 4096 * 4096)
            f.write(off, data)
        ok(boot("esp32", f))
        first = parse_flash_image(f, offset=0x10000, limit=0x100000, chip="esp32")
        assert parse_flash_image(f, offset=0x10000, limit=0x100000, chip="esp32") is first
        img = parse_image(f.read(0x10000, 0x20000))
        seg = img.segments[-1]
        at = next(0x10000 + seg.data_offset + i for i in range(seg.length)
                  if f.read(0x10000 + seg.data_offset + i, 1)[0])
        old = f.read(at, 1)[0]
        f.write(at, bytes([old & (old - 1)]))  # NOR programming can only clear a bit
        assert f.read(at, 1)[0] != old
        failed(boot("esp32", f), "esp_image: Checksum failed. Calculated 0x")
        assert parse_flash_image(f, offset=0x10000, limit=0x100000, chip="esp32") is not first
        app_off, app = next((o, d) for o, d in layout if o == 0x10000)
        f.erase(app_off, (len(app) + 4095) // 4096 * 4096)
        f.write(app_off, app)
        ok(boot("esp32", f))
