"""Real builds (Debian's RISC-V GCC + esptool elf2image) through the virtual C3's boot chain.

The images are not made by the virtual rack's builder: the board must boot them as far as the
bootloader and ESP-IDF's start-up go, say plainly that it cannot run the app, and run nothing
else; image checks, otadata, rollback and Secure Boot V2 must work on them as on demo builds.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import time
from pathlib import Path

import pytest
from realbuild import RealBuild, build
from test_boot import OTADATA, SLOT, FakeFlash

from pytest_hilfarm.esp.otadata import OtaState, initial_otadata
from pytest_hilfarm.esp.partitions import layout
from pytest_hilfarm.ota.signing import verify_block
from pytest_hilfarm.sim import boot as boot_chain
from pytest_hilfarm.sim.board import VirtualBoard
from pytest_hilfarm.sim.boot import BootEfuse, boot
from pytest_hilfarm.sim.flash import FlashMemory

CHIP = "esp32c3"


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> RealBuild:
    return build(tmp_path_factory.mktemp("riscv"))


@pytest.fixture(scope="module")
def real_v2(tmp_path_factory: pytest.TempPathFactory) -> RealBuild:
    return build(tmp_path_factory.mktemp("riscv2"), version="2.0.0")


def real_flash(real: RealBuild, table: str = "factory", app_offset: int = 0x10000) -> FakeFlash:
    f = FakeFlash()
    f.program(0x0, real.bootloader_bin.read_bytes())
    parts = layout(table, "4MB")
    f.program(0x8000, parts.encode())
    if parts.otadata is not None:
        f.program(OTADATA, initial_otadata())
    f.program(app_offset, real.app_bin.read_bytes())
    return f


def test_real_build_boots_to_app_main_with_its_own_identity(real: RealBuild) -> None:
    out = boot(CHIP, real_flash(real))
    assert out.app is not None and not out.boot_loop, out.log
    assert out.app.demo is False  # no demo-app marker: there is no model of this app
    log = out.log
    assert "I (312) hilfarm-demo" not in log
    assert "Project name:     riscv_null_store\r\n" in log
    assert "App version:      1.4.2\r\n" in log
    assert f"ESP-IDF:          bare-metal gcc {real.gcc_version}" in log
    # app_init prints the first 8 hex digits of esp_app_desc_t.app_elf_sha256, which esptool
    # elf2image patched in from the ELF file.
    assert f"ELF file SHA256:  {real.elf_sha256[:8]}...\r\n" in log
    assert out.app.elf_sha256 == real.elf_sha256
    assert "Min chip rev:     v0.3\r\n" in log and "Chip rev:         v0.4\r\n" in log
    assert log.rstrip().endswith("main_task: Calling app_main()")


def test_bootloader_without_descriptor_is_not_given_an_invented_version(real: RealBuild) -> None:
    log = boot(CHIP, real_flash(real)).log
    assert re.search(r"boot: 2nd stage bootloader \(its ESP-IDF version is not recorded",
                     log), log
    # The compile time is the literal the binary holds, as ESP-IDF's banner prints it.
    assert f"boot: compile time {real.compile_time}\r\n" in log
    assert not re.search(r"ESP-IDF v\d", log)  # no made-up bootloader version
    assert "v5.3.1" not in log


def test_chip_revision_below_the_images_minimum_is_refused(real: RealBuild) -> None:
    out = boot(CHIP, real_flash(real), chip_revision=2)
    assert out.app is None and out.boot_loop
    assert ("boot_comm: chip revision check failed. Required >= v0.3, found v0.2." in out.log)


def test_rollback_between_two_real_builds(real: RealBuild, real_v2: RealBuild) -> None:
    f = real_flash(real, "two-ota", SLOT["ota_0"])
    first = boot(CHIP, f)
    assert first.app is not None and first.app.partition_label == "ota_0"
    f.program(SLOT["ota_1"], real_v2.app_bin.read_bytes())
    assert boot_chain.set_boot_partition(f, "ota_1") == "ESP_OK"
    trial = boot(CHIP, f, reset_reason="sw")
    assert trial.app is not None and trial.app.version == "2.0.0"
    assert trial.app.partition_label == "ota_1" and trial.app.ota_state == "PENDING_VERIFY"
    # The new build never confirms itself (nothing runs it), so the next boot rolls back.
    back = boot(CHIP, f, reset_reason="sw")
    assert back.app is not None and back.app.version == "1.4.2", back.log
    assert back.app.partition_label == "ota_0"
    assert OtaState.ABORTED in {e.state for e in f.otadata()}


def test_secure_boot_v2_checks_a_real_build(real: RealBuild, tmp_path: Path) -> None:
    espsecure = pytest.importorskip("espsecure")
    key, signed = tmp_path / "key.pem", tmp_path / "signed.bin"
    with contextlib.redirect_stdout(io.StringIO()):
        espsecure.generate_signing_key(version="2", scheme="rsa3072", keyfile=str(key))
        with key.open("rb") as k, real.app_bin.open("rb") as d:
            espsecure.sign_data(version="2", keyfile=[k], output=str(signed),
                                append_signatures=False, hsm=False, hsm_config=None,
                                pub_key=[], signature=[], datafile=d, skip_padding=False)
        digest_file = tmp_path / "digest.bin"
        with key.open("rb") as k:
            espsecure.digest_sbv2_public_key(k, str(digest_file))
    efuse = BootEfuse(secure_boot_enabled=True, key_digests=(digest_file.read_bytes(),))
    unsigned = boot(CHIP, real_flash(real), efuse=efuse, signature_verifier=verify_block)
    assert unsigned.app is None
    assert "Secure boot signature verification failed" in unsigned.log
    f = real_flash(real)
    f.program(0x10000, signed.read_bytes())
    ok = boot(CHIP, f, efuse=efuse, signature_verifier=verify_block)
    assert ok.app is not None and ok.app.project == "riscv_null_store", ok.log
    assert ok.app.demo is False


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            self.data += data

    @property
    def text(self) -> str:
        with self.lock:
            return self.data.decode(errors="replace")


def test_virtual_board_says_it_cannot_run_the_app_and_runs_nothing(
    real: RealBuild, tmp_path: Path
) -> None:
    flash = FlashMemory(tmp_path / "c3.flash", 4 << 20)
    source = real_flash(real)
    flash.write(0, source.read(0, 0x40000))
    flash.close()
    board = VirtualBoard("c3-real", CHIP, tmp_path / "c3.flash", 4 << 20, "58:cf:79:00:00:01",
                         None, powered=False)
    sink = Sink()
    board.attach(sink)
    try:
        board.power(True)
        deadline = time.monotonic() + 5
        while "cannot run this app" not in sink.text:
            assert time.monotonic() < deadline, sink.text
            time.sleep(0.01)
        text = sink.text
        line = next(x for x in text.splitlines() if "cannot run this app" in x)
        assert line.startswith("[virtual board c3-real: cannot run this app: 'riscv_null_store' "
                               "1.4.2 (ESP-IDF bare-metal gcc ")
        assert "none of its code runs here" in line and line.endswith("real board.]")
        # The line follows app_main directly; the app's own output never comes.
        assert text.index("Calling app_main()") < text.index(line)
        status = board.status()
        assert status.mode == "stopped" and status.app is not None
        assert status.app["runs"] == "no" and status.app["project"] == "riscv_null_store"
        before = len(sink.data)
        board.feed(b"version\r\n")  # nothing listens: no echo, no prompt, no crash loop
        time.sleep(0.5)
        assert len(sink.data) == before
        assert "> " not in text and "hilfarm-demo" not in text and "hilfarm-mesh" not in text
    finally:
        board.close()
