"""The ROM download-mode loader and the flasher stub of a simulated ESP chip.

:class:`LoaderSession` is a byte-in/byte-out state machine: :meth:`LoaderSession.feed` takes what
the host sent and returns everything the chip sends back (SLIP-framed responses, ``OHAI`` after a
stub upload, READ_FLASH data as acks arrive). It speaks enough of the protocol for unmodified
esptool 5.6 (see the ESP ROM protocol note, sections 1-5). It does no I/O, never sleeps, starts no
threads and never runs uploaded code: a stub upload just switches it to stub behaviour. Bad input
never raises out of ``feed()``; it gets an error status or is ignored, as on a real chip.

Like the chips, the ROM loader talks to the SPI flash only after SPI_ATTACH (esptool's
``attach_flash``): before it the flash's data line is not connected, so SPI user commands read
all ones (flash id ``ffffff``: "Detected flash size: Unknown") and the ROM's flash commands
fail. The flasher stub attaches the flash when it starts, and implements MEM_BEGIN/DATA/END
like esptool's stub, so a stub left running serves a new esptool run that does not sync
(``--before no-reset-no-sync``): that run uploads the stub again, and the stub answers ``OHAI``.
Arming the RTC watchdog the way esptool's ``--after watchdog-reset`` does (unlock key, then
WDTCONFIG0 with the enable bit) calls ``on_watchdog`` from ROM and stub alike.
"""

from __future__ import annotations

import enum
import hashlib
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from pytest_hilfarm.esp.image import xor_checksum

from . import slip
from .chips import SPI_CMD_USR, ChipSpec, chip_spec, efuse_registers, jedec_id_for_size, sfdp_table
from .flash import SECTOR_SIZE, FlashMemory

Mode = Literal["download", "stub", "app"]

# Command opcodes (esptool's ESP_CMDS).
FLASH_BEGIN = 0x02
FLASH_DATA = 0x03
FLASH_END = 0x04
MEM_BEGIN = 0x05
MEM_END = 0x06
MEM_DATA = 0x07
SYNC = 0x08
WRITE_REG = 0x09
READ_REG = 0x0A
SPI_SET_PARAMS = 0x0B
SPI_ATTACH = 0x0D
READ_FLASH_SLOW = 0x0E
CHANGE_BAUDRATE = 0x0F
FLASH_DEFL_BEGIN = 0x10
FLASH_DEFL_DATA = 0x11
FLASH_DEFL_END = 0x12
SPI_FLASH_MD5 = 0x13
GET_SECURITY_INFO = 0x14
ERASE_FLASH = 0xD0
ERASE_REGION = 0xD1
READ_FLASH = 0xD2

ROM_BAUD = 115200
SYNC_PAYLOAD = b"\x07\x07\x12\x20" + b"\x55" * 32
READ_SLOW_BLOCK = 64
_DATA_HEADER = 16  # len, seq, 0, 0 in front of MEM_DATA / FLASH_DATA / FLASH_DEFL_DATA
_MAX_READ_PACKET = 0x10000
_MAX_READ_WINDOW = 128  # packets in flight, whatever the host asks for
_MAX_REGISTERS = 4096  # writable words kept; more distinct addresses are dropped, not stored
# RTC_CNTL_WDT_WKEY: the write-protect key that unlocks the RTC watchdog's config registers
# (esptool targets esp32c3.py / esp32s3.py / esp32s2.py).
RTC_WDT_WKEY = 0x50D83AA1
RTC_WDT_EN = 1 << 31  # RTC_CNTL_WDT_EN in WDTCONFIG0
# What SPI user commands read while no flash is attached: MISO is not driven.
_UNATTACHED = 0xFFFFFFFF
# ROM flash commands that need the flash attached first.
_NEEDS_FLASH = frozenset({0x02, 0x10, 0x13, 0x0E})


class Fault(enum.Enum):
    """Why a command failed, independent of who (ROM or stub) reports it."""

    INVALID = "invalid message"
    UNSUPPORTED = "unsupported command"
    FAILED = "failed to act"
    CHECKSUM = "bad checksum"
    WRITE = "flash write error"
    READ = "flash read error"
    READ_LEN = "read length error"
    DEFLATE = "deflate error"
    BLOCK_SIZE = "bad block size"
    NOT_IN_FLASH_MODE = "not in flash mode"
    NOT_ENOUGH_DATA = "not enough data"
    TOO_MUCH_DATA = "too much data"


# Error byte each loader puts after status 1. ROM codes from Espressif's serial-protocol doc;
# stub codes from esptool's flasher_stub/include/stub_flasher.h.
ROM_ERRORS: dict[Fault, int] = {
    Fault.INVALID: 0x05,
    Fault.UNSUPPORTED: 0x05,
    Fault.FAILED: 0x06,
    Fault.CHECKSUM: 0x07,
    Fault.WRITE: 0x08,
    Fault.READ: 0x09,
    Fault.READ_LEN: 0x0A,
    Fault.DEFLATE: 0x0B,
    Fault.BLOCK_SIZE: 0x05,
    Fault.NOT_IN_FLASH_MODE: 0x06,
    Fault.NOT_ENOUGH_DATA: 0x06,
    Fault.TOO_MUCH_DATA: 0x08,
}
STUB_ERRORS: dict[Fault, int] = {
    Fault.INVALID: 0xC0,
    Fault.UNSUPPORTED: 0xFF,
    Fault.FAILED: 0xC4,
    Fault.CHECKSUM: 0xC1,
    Fault.WRITE: 0xC4,
    Fault.READ: 0xC4,
    Fault.READ_LEN: 0xC0,
    Fault.DEFLATE: 0xC7,
    Fault.BLOCK_SIZE: 0xC2,
    Fault.NOT_IN_FLASH_MODE: 0xC6,
    Fault.NOT_ENOUGH_DATA: 0xC8,
    Fault.TOO_MUCH_DATA: 0xC9,
}


class CommandFailed(Exception):
    """Raised inside a handler to answer the command with an error status."""

    def __init__(self, fault: Fault, detail: str = "") -> None:
        super().__init__(f"{fault.value}: {detail}" if detail else fault.value)
        self.fault = fault


@dataclass(frozen=True)
class _Reply:
    """A handler's answer: the response's value/data, frames sent after it, an action after."""

    value: int = 0
    data: bytes = b""
    extra: tuple[bytes, ...] = ()
    then: Callable[[], None] | None = None


@dataclass
class _FlashWrite:
    """An open FLASH_BEGIN / FLASH_DEFL_BEGIN (mutable progress, not a record)."""

    offset: int
    size: int  # bytes the host announced (ROM: erase size; stub: exact image size)
    num_blocks: int
    block_size: int
    compressed: bool
    jit_erase: bool  # stub: erase sectors as data reaches them; ROM erased up front
    next_seq: int = 0
    written: int = 0
    erased_to: int = 0
    inflater: zlib._Decompress | None = field(default=None, repr=False)


@dataclass
class _MemLoad:
    size: int
    num_blocks: int
    block_size: int
    address: int
    next_seq: int = 0
    received: int = 0


@dataclass
class _FlashRead:
    """A stub READ_FLASH being streamed (frames go out as the host acks them)."""

    offset: int
    length: int
    packet_size: int
    window: int
    sent: int = 0
    acked: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.md5, repr=False)


def _noop() -> None:
    pass


def _noop_baud(baud: int) -> None:
    pass


class LoaderSession:
    """ROM download-mode loader + flasher stub of one board, fed raw UART bytes.

    ``on_run_app`` is called when the ROM loader hands over to flash (FLASH_END); the session then
    ignores input (``mode == "app"``) until :meth:`enter_download`. ``on_baud`` is called with the
    new rate after the CHANGE_BAUDRATE ack has been queued in the output of that ``feed()`` call:
    a board that models wire time sends that output at the old rate. ``flash_id`` is the RDID
    answer; by default a Winbond part matching the flash size. ``revision`` is the chip
    revision the eFuses report (major * 100 + minor; default: the chip's current silicon).
    ``on_watchdog`` is called (inside ``feed()``) when the host arms the RTC watchdog to reset
    the chip; the board performs the reset.
    """

    def __init__(
        self,
        chip: str | ChipSpec,
        flash: FlashMemory,
        mac: bytes,
        *,
        on_run_app: Callable[[], None] = _noop,
        on_baud: Callable[[int], None] = _noop_baud,
        flash_id: int | None = None,
        revision: int | None = None,
        on_watchdog: Callable[[], None] = _noop,
    ) -> None:
        self._spec = chip_spec(chip)
        self._flash = flash
        self._mac = bytes(mac)
        self._revision = self._spec.default_revision if revision is None else revision
        self._fixed = efuse_registers(self._spec, self._mac, self._revision)
        self._on_run_app = on_run_app
        self._on_baud = on_baud
        self._on_watchdog = on_watchdog
        self._attached = False
        self._flash_id = jedec_id_for_size(flash.size) if flash_id is None else flash_id
        self._sfdp = sfdp_table(flash.size)
        self._slip = slip.SlipDecoder()
        self.internal_errors = 0  # handler bugs turned into "failed" replies (tests assert 0)
        self.last_error = ""
        self._handlers: dict[int, Callable[[bytes, int], _Reply]] = {
            SYNC: self._sync,
            READ_REG: self._read_reg,
            WRITE_REG: self._write_reg,
            GET_SECURITY_INFO: self._security_info,
            SPI_ATTACH: self._spi_attach,
            SPI_SET_PARAMS: self._spi_set_params,
            CHANGE_BAUDRATE: self._change_baud,
            FLASH_BEGIN: partial(self._flash_begin, compressed=False),
            FLASH_DATA: partial(self._flash_data, compressed=False),
            FLASH_END: self._flash_end,
            FLASH_DEFL_BEGIN: partial(self._flash_begin, compressed=True),
            FLASH_DEFL_DATA: partial(self._flash_data, compressed=True),
            FLASH_DEFL_END: self._flash_end,
            SPI_FLASH_MD5: self._md5,
            MEM_BEGIN: self._mem_begin,
            MEM_DATA: self._mem_data,
            MEM_END: self._mem_end,
            READ_FLASH_SLOW: self._read_flash_slow,
            READ_FLASH: self._read_flash,
            ERASE_FLASH: self._erase_flash,
            ERASE_REGION: self._erase_region,
        }
        # esptool's stub implements MEM_BEGIN/DATA/END too (stub_flasher.c), not READ_FLASH_SLOW.
        self._rom_only = frozenset({READ_FLASH_SLOW})
        self._stub_only = frozenset({READ_FLASH, ERASE_FLASH, ERASE_REGION})
        self._mode: Mode = "download"
        self._baud = ROM_BAUD
        self._regs: dict[int, int] = {}
        self._status_regs = [0, 0, 0]
        self._write: _FlashWrite | None = None
        self._mem: _MemLoad | None = None
        self._mem_loaded = False
        self._read: _FlashRead | None = None
        self.enter_download()

    # ----------------------------------------------------------------- public state

    @property
    def mode(self) -> Mode:
        """``"download"`` (ROM loader), ``"stub"`` (flasher stub) or ``"app"`` (handed over)."""
        return self._mode

    @property
    def chip(self) -> ChipSpec:
        return self._spec

    @property
    def revision(self) -> int:
        """The chip revision the eFuses report (major * 100 + minor)."""
        return self._revision

    @property
    def baudrate(self) -> int:
        """The UART rate the loader believes in (115200 after a reset)."""
        return self._baud

    def enter_download(self) -> None:
        """Fresh ROM loader state, as after a reset with IO0 low."""
        self._mode = "download"
        self._baud = ROM_BAUD
        self._slip.reset()
        self._regs = {}
        self._status_regs = [0, 0, 0]
        self._write = None
        self._mem = None
        self._mem_loaded = False
        self._read = None
        self._attached = False

    @property
    def flash_attached(self) -> bool:
        """Whether the SPI flash is attached (after SPI_ATTACH, or while the stub runs)."""
        return self._attached

    def feed(self, data: bytes) -> bytes:
        """Consume bytes from the host; return every byte the chip sends in answer."""
        out: list[bytes] = []
        for frame in self._slip.feed(data):
            if self._mode == "app":
                break
            self._frame(frame, out)
        return b"".join(out)

    # ----------------------------------------------------------------- framing

    def _frame(self, frame: bytes, out: list[bytes]) -> None:
        if self._read is not None:
            if len(frame) == 4:
                self._read_ack(int.from_bytes(frame, "little"), out)
                return
            if len(frame) < 8 or frame[0] != 0:
                return
            # A command in the middle of a read: the host gave up on it.
            self._read = None
        if len(frame) < 8 or frame[0] != 0:
            return  # not a request (noise, or our own echo): the ROM stays silent
        op, size, chk = struct.unpack_from("<BHI", frame, 1)
        data = frame[8:]
        handler = self._handlers.get(op)
        wrong_mode = self._stub_only if self._mode == "download" else self._rom_only
        if handler is None or op in wrong_mode:
            out.append(self._fail(op, Fault.UNSUPPORTED))
            return
        if size != len(data):
            out.append(self._fail(op, Fault.INVALID))
            return
        if op in _NEEDS_FLASH and not self._attached:
            # The ROM's SPI flash routines drive a flash that is not connected yet.
            self.last_error = f"op 0x{op:02x} before SPI_ATTACH: no flash attached"
            out.append(self._fail(op, Fault.FAILED))
            return
        try:
            reply = handler(data, chk)
        except CommandFailed as exc:
            self.last_error = str(exc)
            out.append(self._fail(op, exc.fault))
            return
        except Exception as exc:  # a bug must not take the board off the line
            self.internal_errors += 1
            self.last_error = f"internal error in op 0x{op:02x}: {exc!r}"
            out.append(self._fail(op, Fault.FAILED))
            return
        out.append(self._response(op, reply.value, reply.data, 0, 0))
        out.extend(reply.extra)
        if reply.then is not None:
            reply.then()

    def _response(self, op: int, value: int, data: bytes, status: int, error: int) -> bytes:
        # The ROM sends 2 reserved bytes after status/error; the stub does not.
        tail = bytes((status, error, 0, 0)) if self._mode == "download" else bytes((status, error))
        body = struct.pack("<BBHI", 1, op, len(data) + len(tail), value & 0xFFFFFFFF)
        return slip.encode(body + data + tail)

    def _fail(self, op: int, fault: Fault) -> bytes:
        table = ROM_ERRORS if self._mode == "download" else STUB_ERRORS
        return self._response(op, 0, b"", 1, table[fault])

    @staticmethod
    def _words(data: bytes, count: int) -> tuple[int, ...]:
        if len(data) != 4 * count:
            raise CommandFailed(Fault.INVALID, f"expected {4 * count} bytes, got {len(data)}")
        return struct.unpack(f"<{count}I", data)

    # ----------------------------------------------------------------- basic commands

    def _sync(self, data: bytes, chk: int) -> _Reply:
        if data != SYNC_PAYLOAD:
            raise CommandFailed(Fault.INVALID, "bad SYNC pattern")
        value = self._spec.rom_sync_value if self._mode == "download" else 0
        # The chip answers SYNC 8 times; esptool waits for all of them.
        frame = self._response(SYNC, value, b"", 0, 0)
        return _Reply(value=value, extra=(frame,) * 7)

    def _read_reg(self, data: bytes, chk: int) -> _Reply:
        (addr,) = self._words(data, 1)
        return _Reply(value=self._reg(addr))

    def _reg(self, addr: int) -> int:
        if addr == self._spec.uart_clkdiv_reg:
            # esptool derives the crystal from baud * divider: report a 40 MHz crystal.
            return 40_000_000 // self._baud
        fixed = self._fixed.get(addr)
        if fixed is not None:
            return fixed
        return self._regs.get(addr, 0)

    def _write_reg(self, data: bytes, chk: int) -> _Reply:
        if not data or len(data) % 16:
            raise CommandFailed(Fault.INVALID, "WRITE_REG takes 16-byte entries")
        wdt = self._spec.rtc_wdt
        fire = False
        for addr, value, mask, _delay in struct.iter_unpack("<IIII", data):
            if addr in self._fixed:
                continue  # eFuse read registers and ROM words are read-only
            if wdt is not None and addr == wdt[1] and self._regs.get(wdt[0]) != RTC_WDT_WKEY:
                continue  # the RTC watchdog's config is write-protected until unlocked
            if addr not in self._regs and len(self._regs) >= _MAX_REGISTERS:
                continue
            self._regs[addr] = (self._regs.get(addr, 0) & ~mask | value & mask) & 0xFFFFFFFF
            if addr == self._spec.spi_base and self._regs[addr] & SPI_CMD_USR:
                self._run_spi_command()
            if wdt is not None and addr == wdt[1] and self._regs[addr] & RTC_WDT_EN:
                fire = True
        if fire:
            # Armed RTC watchdog (esptool's --after watchdog-reset): it resets the chip after
            # WDTCONFIG1 slow-clock cycles (2000, ~15 ms); the reply to this write goes out
            # first, then the board resets.
            return _Reply(then=self._on_watchdog)
        return _Reply()

    def _run_spi_command(self) -> None:
        """Emulate the SPI controller's user command (how esptool reads flash id, SFDP, status)."""
        spec = self._spec
        base = spec.spi_base
        usr = self._regs.get(base + spec.spi_usr, 0)
        command = self._regs.get(base + spec.spi_usr2, 0) & 0xFF
        miso_bits = (self._regs.get(base + spec.spi_miso_dlen, 0) + 1) if usr & (1 << 28) else 0
        mosi_bits = (self._regs.get(base + spec.spi_mosi_dlen, 0) + 1) if usr & (1 << 27) else 0
        w0 = base + spec.spi_w0
        mosi = self._regs.get(w0, 0)
        addr = self._regs.get(base + 4, 0)
        if usr & (1 << 30) and spec.spi_addr_msb:
            addr_bits = ((self._regs.get(base + spec.spi_usr1, 0) >> 26) & 0x3F) + 1
            addr >>= max(0, 32 - addr_bits)
        result: int | None = None
        if not self._attached:
            result = _UNATTACHED  # no flash on the bus yet: MISO reads all ones
        elif command == 0x9F:  # RDID
            result = self._flash_id
        elif command == 0x5A:  # RDSFDP
            chunk = self._sfdp[addr : addr + 4] if addr < len(self._sfdp) else b""
            result = int.from_bytes(chunk.ljust(4, b"\xff"), "little")
        elif command in (0x05, 0x35, 0x15):  # RDSR, RDSR2, RDSR3
            result = self._status_regs[(0x05, 0x35, 0x15).index(command)]
        elif command in (0x01, 0x31, 0x11) and mosi_bits:  # WRSR (1-2 bytes), WRSR2, WRSR3
            first = (0x01, 0x31, 0x11).index(command)
            for i in range(min(mosi_bits // 8, 3 - first)):
                self._status_regs[first + i] = (mosi >> (8 * i)) & 0xFF
        if result is not None and miso_bits:
            mask = (1 << min(miso_bits, 32)) - 1
            self._regs[w0] = result & mask
        # The command completes at once: the USR bit reads back clear.
        self._regs[base] &= ~SPI_CMD_USR

    def _security_info(self, data: bytes, chk: int) -> _Reply:
        if self._spec.security_info is None:
            raise CommandFailed(Fault.UNSUPPORTED, f"no security info on {self._spec.esptool_name}")
        return _Reply(data=self._spec.security_info)

    def _spi_attach(self, data: bytes, chk: int) -> _Reply:
        if len(data) not in (4, 8):
            raise CommandFailed(Fault.INVALID, "SPI_ATTACH takes 4 or 8 bytes")
        self._attached = True
        return _Reply()

    def _spi_set_params(self, data: bytes, chk: int) -> _Reply:
        self._words(data, 6)
        return _Reply()

    def _change_baud(self, data: bytes, chk: int) -> _Reply:
        new, _old = self._words(data, 2)
        if new == 0:
            raise CommandFailed(Fault.INVALID, "baud rate 0")

        def switch() -> None:
            self._baud = new
            self._on_baud(new)

        return _Reply(then=switch)

    # ----------------------------------------------------------------- RAM upload (stub)

    def _mem_begin(self, data: bytes, chk: int) -> _Reply:
        size, blocks, block_size, address = self._words(data, 4)
        if blocks and not block_size:
            raise CommandFailed(Fault.INVALID, "zero block size")
        self._mem = _MemLoad(size, blocks, block_size, address)
        return _Reply()

    def _mem_data(self, data: bytes, chk: int) -> _Reply:
        load = self._mem
        if load is None:
            raise CommandFailed(Fault.FAILED, "MEM_DATA without MEM_BEGIN")
        seq, payload = self._check_block(data, chk, load.next_seq, load.block_size)
        if load.received + len(payload) > load.size:
            raise CommandFailed(Fault.INVALID, "more data than MEM_BEGIN announced")
        load.received += len(payload)
        load.next_seq = seq + 1
        self._mem_loaded = True
        return _Reply()

    def _mem_end(self, data: bytes, chk: int) -> _Reply:
        no_exec, _entry = self._words(data, 2)
        self._mem = None
        if no_exec or not self._mem_loaded:
            return _Reply()

        def start_stub() -> None:
            # Nothing is executed: the uploaded code is taken to be esptool's flasher stub. It
            # attaches the SPI flash when it starts. A stub uploaded over a running stub (a new
            # esptool run that skipped SYNC) starts afresh the same way.
            self._mode = "stub"
            self._write = None
            self._read = None
            self._attached = True

        return _Reply(extra=(slip.encode(b"OHAI"),), then=start_stub)

    # ----------------------------------------------------------------- flash writes

    def _check_block(
        self, data: bytes, chk: int, expected_seq: int, block_size: int
    ) -> tuple[int, bytes]:
        if len(data) < _DATA_HEADER:
            raise CommandFailed(Fault.INVALID, "data block shorter than its header")
        length, seq = struct.unpack_from("<II", data)
        payload = data[_DATA_HEADER:]
        if length != len(payload):
            raise CommandFailed(Fault.INVALID, f"block says {length} bytes, carries {len(payload)}")
        if xor_checksum(payload) != chk:
            raise CommandFailed(Fault.CHECKSUM, f"block {seq}")
        if seq != expected_seq:
            raise CommandFailed(Fault.INVALID, f"block {seq}, expected {expected_seq}")
        if len(payload) > block_size:
            raise CommandFailed(Fault.BLOCK_SIZE, f"{len(payload)}-byte block > {block_size}")
        return seq, payload

    def _flash_begin(self, data: bytes, chk: int, *, compressed: bool) -> _Reply:
        rom = self._mode == "download"
        allowed = (self._spec.rom_begin_words,) if rom else (4, 5)
        if len(data) // 4 not in allowed or len(data) % 4:
            raise CommandFailed(Fault.INVALID, f"begin takes {allowed[0] * 4} bytes")
        size, num_blocks, block_size, offset = struct.unpack_from("<IIII", data)
        if len(data) == 20 and struct.unpack_from("<I", data, 16)[0]:
            raise CommandFailed(Fault.FAILED, "encrypted writes are not simulated")
        if num_blocks and not block_size:
            raise CommandFailed(Fault.BLOCK_SIZE, "zero block size")
        end = offset + size
        if end > self._flash.size:
            raise CommandFailed(Fault.WRITE, f"0x{offset:x}+0x{size:x} is past the end of flash")
        state = _FlashWrite(offset, size, num_blocks, block_size, compressed, jit_erase=not rom)
        state.erased_to = offset - offset % SECTOR_SIZE
        if compressed:
            state.inflater = zlib.decompressobj()
        if rom and size:
            # The ROM erases the whole announced region before it acks.
            self._erase_to(state, end)
        self._write = state
        return _Reply()

    def _erase_to(self, state: _FlashWrite, end: int) -> None:
        limit = -(-(state.offset + state.size) // SECTOR_SIZE) * SECTOR_SIZE
        target = min(-(-end // SECTOR_SIZE) * SECTOR_SIZE, limit, self._flash.size)
        if target > state.erased_to:
            self._flash.erase(state.erased_to, target - state.erased_to)
            state.erased_to = target

    def _flash_data(self, data: bytes, chk: int, *, compressed: bool) -> _Reply:
        state = self._write
        if state is None or state.compressed != compressed:
            raise CommandFailed(Fault.NOT_IN_FLASH_MODE, "no matching FLASH_BEGIN")
        seq, payload = self._check_block(data, chk, state.next_seq, state.block_size)
        rom = self._mode == "download"
        if state.inflater is not None:
            remaining = state.size - state.written
            try:
                # Bounded output: a zlib bomb cannot make us allocate more than the image.
                chunk = state.inflater.decompress(payload, remaining + 1)
            except zlib.error as exc:
                raise CommandFailed(Fault.DEFLATE, str(exc)) from None
            if len(chunk) > remaining or state.inflater.unconsumed_tail:
                raise CommandFailed(Fault.TOO_MUCH_DATA, "inflated past the announced size")
            position = state.offset + state.written
        elif rom:
            # The ROM places block n at offset + n * block_size; the last block is padded.
            chunk = payload
            position = state.offset + seq * state.block_size
        else:
            remaining = state.size - state.written
            if remaining <= 0 and payload:
                raise CommandFailed(Fault.TOO_MUCH_DATA, "image already complete")
            chunk = payload[:remaining]  # the stub drops the 0xFF padding of the last block
            position = state.offset + state.written
        if position + len(chunk) > self._flash.size:
            raise CommandFailed(Fault.WRITE, f"0x{position:x} is past the end of flash")
        if state.jit_erase:
            self._erase_to(state, position + len(chunk))
        self._flash.write(position, chunk)
        state.written = position + len(chunk) - state.offset
        state.next_seq = seq + 1
        return _Reply()

    def _flash_end(self, data: bytes, chk: int) -> _Reply:
        (flag,) = self._words(data, 1)
        if self._mode == "download":
            # Any FLASH_END leaves the ROM loader ("run user code"); esptool avoids it.
            return _Reply(then=self._leave_to_app)
        state = self._write
        if state is None:
            raise CommandFailed(Fault.NOT_IN_FLASH_MODE, "FLASH_END without FLASH_BEGIN")
        if state.written < state.size:
            raise CommandFailed(Fault.NOT_ENOUGH_DATA, f"{state.size - state.written} bytes short")
        self._write = None
        self._flash.flush()
        if flag:
            return _Reply()  # flag 1: stay in the stub
        return _Reply(then=self._stub_reboot)

    def _leave_to_app(self) -> None:
        self._flash.flush()
        self._write = None
        self._mode = "app"
        self._on_run_app()

    def _stub_reboot(self) -> None:
        # The stub's soft reset drops back into the ROM loader.
        self.enter_download()

    # ----------------------------------------------------------------- flash reads/erases

    def _md5(self, data: bytes, chk: int) -> _Reply:
        addr, size, _, _ = self._words(data, 4)
        try:
            digest = self._flash.md5(addr, size)
        except ValueError as exc:
            raise CommandFailed(Fault.READ, str(exc)) from None
        if self._mode == "download":
            return _Reply(data=digest.hex().encode("ascii"))  # ROM: 32 lowercase hex chars
        return _Reply(data=digest)

    def _read_flash_slow(self, data: bytes, chk: int) -> _Reply:
        addr, length = self._words(data, 2)
        if length > READ_SLOW_BLOCK:
            raise CommandFailed(Fault.READ_LEN, f"{length} > {READ_SLOW_BLOCK}")
        try:
            chunk = self._flash.read(addr, length)
        except ValueError as exc:
            raise CommandFailed(Fault.READ, str(exc)) from None
        return _Reply(data=chunk.ljust(READ_SLOW_BLOCK, b"\x00"))  # always a 64-byte buffer

    def _read_flash(self, data: bytes, chk: int) -> _Reply:
        offset, length, packet_size, window = self._words(data, 4)
        if not 0 < packet_size <= _MAX_READ_PACKET or window == 0:
            raise CommandFailed(Fault.INVALID, "bad packet size or window")
        if offset + length > self._flash.size:
            raise CommandFailed(Fault.READ, f"0x{offset:x}+0x{length:x} is past the end of flash")
        read = _FlashRead(offset, length, packet_size, min(window, _MAX_READ_WINDOW))
        frames: list[bytes] = []
        self._read = read
        self._pump(read, frames)
        return _Reply(extra=tuple(frames))

    def _read_ack(self, total: int, out: list[bytes]) -> None:
        read = self._read
        if read is None:
            return
        if read.acked <= total <= read.sent:
            read.acked = total
        self._pump(read, out)

    def _pump(self, read: _FlashRead, out: list[bytes]) -> None:
        limit = read.window * read.packet_size
        while read.sent < read.length and read.sent - read.acked < limit:
            n = min(read.packet_size, read.length - read.sent)
            chunk = self._flash.read(read.offset + read.sent, n)
            read.digest.update(chunk)
            read.sent += n
            out.append(slip.encode(chunk))
        if read.acked >= read.length:
            out.append(slip.encode(read.digest.digest()))
            self._read = None

    def _erase_flash(self, data: bytes, chk: int) -> _Reply:
        self._flash.erase_all()
        return _Reply()

    def _erase_region(self, data: bytes, chk: int) -> _Reply:
        offset, size = self._words(data, 2)
        if offset % SECTOR_SIZE or size % SECTOR_SIZE:
            raise CommandFailed(Fault.INVALID, "erase region must be 4 KiB aligned")
        try:
            self._flash.erase(offset, size)
        except ValueError as exc:
            raise CommandFailed(Fault.WRITE, str(exc)) from None
        return _Reply()
