"""One virtual ESP board: power, EN/IO0 lines, boot modes, UART, and the app it runs.

A :class:`VirtualBoard` owns its flash file, its ROM-loader session and the demo app it boots.
All of its state changes under one execution lock, normally on its own worker thread (events
from the control endpoint and timers go through one queue; port bytes are handled inline when
nothing is queued ahead of them), so the loader, boot chain and app never see two threads at once.
It models what esptool and a console can observe (banners, modes, bytes and, optionally, their
UART time), not electrical or RF physics. It knows nothing about sockets or the daemon: bytes go
out through whatever :class:`OutputSink` is attached, and it must never import the farm core.

It also holds the board's virtual eFuses (:class:`BootEfuse`, burned only upwards by
:mod:`pytest_hilfarm.sim.efuse`) and gives the app an
:class:`~pytest_hilfarm.sim.apphost.AppHostImpl` (OTA writes and downloads on this board).
"""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from pytest_hilfarm.esp.chips import format_revision
from pytest_hilfarm.ota.signing import verify_block
from pytest_hilfarm.sim import boot as boot_chain
from pytest_hilfarm.sim.app import DemoApp
from pytest_hilfarm.sim.apphost import AppHostImpl
from pytest_hilfarm.sim.boot import BootEfuse
from pytest_hilfarm.sim.chips import rom_banner
from pytest_hilfarm.sim.efuse import burn_efuse, secure_version_bits
from pytest_hilfarm.sim.flash import FlashMemory
from pytest_hilfarm.sim.loader import LoaderSession
from pytest_hilfarm.sim.model import AppInfo, BootOutcome

# Modes reported by status(); "download"/"stub" come from the loader session itself. "stopped":
# the boot chain started an app that has no model here (not a demo build), see CANNOT_RUN.
MODES = ("off", "reset", "download", "stub", "app", "stopped", "halted", "boot-loop")
# The RTC watchdog esptool arms for --after watchdog-reset fires after WDTCONFIG1 = 2000
# slow-clock cycles (~136 kHz RTC clock on the C3/S3: ~15 ms).
RTC_WDT_DELAY = 0.015

# The DevKit EN pin has an RC delay (10k/1uF, ~10 ms on silicon). Over rfc2217 the pyserial client
# waits >= 50 ms for each control-line ack, so esptool's ClassicReset holds the (DTR=1, RTS=1)
# transient (EN high, IO0 high) for ~50 ms before IO0 goes low; sampling IO0 100 ms after EN rises
# is what makes default-reset land in download mode (notes/esp-rom-protocol.md section 7).
DEFAULT_RC_DELAY = 0.1
# A chip that fails to boot resets (RTC watchdog / esp_restart) and tries again; real chips
# repeat every few hundred ms, which keeps a console readable and the CPU idle.
DEFAULT_BOOT_RETRY_DELAY = 0.7
DEFAULT_BAUD = 115200
UART_BITS_PER_BYTE = 10  # start + 8 data + stop
# A console client that stops reading for this long is dropped instead of stalling the board
# (a real UART drops bytes the host does not take; blocking the board forever would be worse).
SINK_TIMEOUT = 5.0
def cannot_run_line(board_id: str, info: AppInfo) -> str:
    """The one console line a virtual board prints instead of running an app it has no model
    of (an image without the demo-app marker, e.g. a real ESP-IDF build).

    ``Device.boot_info()`` reads it back (``runs_on_virtual=False``); keep the
    ``[virtual board <id>: cannot run this app: ...]`` shape.
    """
    if info.has_app_desc:
        what = (f"'{info.project}' {info.version} (ESP-IDF {info.idf_ver}) was not built for the "
                "virtual rack (no demo-app marker)")
    else:
        what = (f"the image in {info.partition_label} at 0x{info.partition_offset:x} has no "
                "esp_app_desc_t and was not built for the virtual rack")
    return (f"[virtual board {board_id}: cannot run this app: {what}; a virtual board models "
            "the boot chain, not the CPU, so none of its code runs here and the board stops "
            "at app_main. Test its behaviour on a real board.]")


class OutputSink(Protocol):
    """Where the board's UART TX bytes go (the connected client, if any)."""

    def write(self, data: bytes) -> None:
        """Deliver bytes to the client; may raise OSError if the client is gone."""


@dataclass(frozen=True)
class BoardStatus:
    """Snapshot of a board for the control endpoint's ``status``."""

    board_id: str
    chip: str
    mac: str
    powered: bool
    mode: str
    flash_size: int
    baud: int
    app: dict[str, str] | None
    client: bool
    en: bool
    io0: bool
    wire_time: bool
    rx_bytes: int  # UART bytes received / sent since the daemon started
    tx_bytes: int
    wire_seconds: float  # their UART time at the baud they crossed at (the bench's lower bound)
    revision: str = ""  # the chip revision the eFuses report, "v0.4"


def _nothing() -> None:
    """An event that only wakes the worker (so it recomputes its next timer)."""


class VirtualBoard:
    """A simulated ESP32-family board driven through :meth:`feed`, lines, power and reset.

    Thread-safe entry points: :meth:`feed`, :meth:`attach`, :meth:`detach`,
    :meth:`set_client_lines`, :meth:`set_lines`, :meth:`power`, :meth:`reset`,
    :meth:`set_wire_time`, :meth:`call_later`, :meth:`status`, :meth:`close`. Everything else runs
    under the board's execution lock (on its worker thread, or inline in :meth:`feed`).
    """

    def __init__(
        self,
        board_id: str,
        chip: str,
        flash_path: Path | str,
        flash_size: int,
        mac: str,
        medium: Any,
        *,
        position: int = 0,
        features: tuple[str, ...] = (),
        rollback_enabled: bool = True,
        efuse: BootEfuse | None = None,
        on_efuse_change: Callable[[BootEfuse], None] | None = None,
        rc_delay: float = DEFAULT_RC_DELAY,
        boot_retry_delay: float = DEFAULT_BOOT_RETRY_DELAY,
        wire_time: bool = False,
        powered: bool = True,
        revision: int | None = None,
    ) -> None:
        self.board_id = board_id
        self.chip = chip
        self.mac = mac
        # major * 100 + minor, as the eFuses report it; None: the chip's current silicon.
        self.revision = revision
        self.flash_size = flash_size
        self.position = position
        self.features = tuple(features)
        self._medium = medium
        self._rollback_enabled = rollback_enabled
        self._efuse = efuse if efuse is not None else BootEfuse()
        self._on_efuse_change = on_efuse_change
        self._rc_delay = rc_delay
        self._boot_retry_delay = boot_retry_delay
        self._flash = FlashMemory(Path(flash_path), flash_size)
        self._loader = LoaderSession(
            chip,
            self._flash,
            bytes.fromhex(mac.replace(":", "")),
            on_run_app=self._on_run_app,
            on_baud=self._on_baud,
            revision=revision,
            on_watchdog=self._on_watchdog,
        )
        # Worker-thread state. Everything below runs under _exec_lock: on the worker thread, or
        # on a port thread in feed()'s fast path. _queued counts posted, not yet finished events.
        self._exec_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._queued = 0
        self._owner: int | None = None  # thread id holding _exec_lock
        self._event_time = 0.0  # when the event being handled happened (its timers count from it)
        # (time posted, event); None stops the worker.
        self._events: queue.SimpleQueue[tuple[float, Callable[[], None]] | None] = (
            queue.SimpleQueue()
        )
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._epoch = 0  # bumped by every reset/power change; stale timers and apps check it
        self._mode = "off"
        self._app: Any = None
        self._app_info: AppInfo | None = None
        self._console_line = bytearray()
        self._console_cr = False  # the last console byte was a CR (CR LF is one line end)
        self._pending_boot = False
        self._pending_wdt = False
        self._pending_baud: int | None = None
        self._loop_outcome: BootOutcome | None = None  # a "wdt" retry's outcome, reused
        self._loop_parked = False
        self._powered = False
        self._baud = DEFAULT_BAUD
        # Lines: the control endpoint's drivers and the USB-UART's DTR/RTS are wired-AND onto
        # EN and IO0 (both are open-drain pulls against the DevKit's pull-ups).
        self._ctl_en = True
        self._ctl_io0 = True
        self._dtr = False
        self._rts = False
        # Shared with port threads.
        self._sink_lock = threading.Lock()
        self._sink: OutputSink | None = None
        self._wire_time = wire_time
        self._rx_free_at = 0.0
        self._tx_free_at = 0.0
        self._rx_lock = threading.Lock()
        self._rx_bytes = 0
        self._tx_bytes = 0
        self._wire_seconds = 0.0
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"board-{board_id}", daemon=True
        )
        self._thread.start()
        if powered:
            self.power(True)

    # ------------------------------------------------------------------ thread-safe API

    def feed(self, data: bytes) -> None:
        """Bytes from the client arrive on the board's UART RX (paced when wire time is on)."""
        if not data:
            return
        with self._rx_lock:
            self._rx_bytes += len(data)
            self._wire_seconds += len(data) * UART_BITS_PER_BYTE / self._baud
        if self._wire_time:
            # Sleep per chunk in the caller's (port) thread: the bytes reach the chip only once
            # they have crossed the wire, and the port thread has nothing else to do meanwhile.
            with self._rx_lock:
                now = time.monotonic()
                done = max(now, self._rx_free_at) + len(data) * UART_BITS_PER_BYTE / self._baud
                self._rx_free_at = done
            delay = done - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        # Fast path: with nothing queued ahead of these bytes, handle them right here under the
        # board's execution lock instead of waking the worker (a thread hand-off per packet is
        # most of the board's CPU cost in a flash write). Queued events keep their order.
        with self._exec_lock:
            with self._count_lock:
                idle = self._queued == 0
            if idle:
                self._owner = threading.get_ident()
                self._event_time = time.monotonic()
                try:
                    self._guard(lambda: self._on_rx(data))
                finally:
                    self._owner = None
                return
        self._post(lambda: self._on_rx(data))

    def attach(self, sink: OutputSink) -> None:
        """Connect a client; the board's TX goes to it from now on."""
        with self._sink_lock:
            self._sink = sink
        self._post(self._console_line.clear)
        self._post(self._resume_loop)

    def detach(self, sink: OutputSink) -> None:
        """Disconnect ``sink`` (if it is still the attached one) and release DTR/RTS."""
        with self._sink_lock:
            if self._sink is sink:
                self._sink = None
        # A closed USB-UART releases DTR and RTS: (0,0) leaves EN and IO0 high, no reset edge.
        self.set_client_lines(dtr=False, rts=False)

    @property
    def has_client(self) -> bool:
        return self._sink is not None

    def set_client_lines(self, *, dtr: bool | None = None, rts: bool | None = None) -> None:
        """DTR/RTS from the USB-UART (rfc2217 SET_CONTROL); True = asserted."""

        def apply() -> None:
            if dtr is not None:
                self._dtr = dtr
            if rts is not None:
                self._rts = rts
            self._lines_changed()

        self._post(apply)

    def set_lines(self, *, en: bool | None = None, io0: bool | None = None) -> None:
        """Drive EN/IO0 from the rack's control hardware (True = released/high); waits."""

        def apply() -> None:
            if en is not None:
                self._ctl_en = en
            if io0 is not None:
                self._ctl_io0 = io0
            self._lines_changed()

        self._call(apply)

    def power(self, on: bool) -> None:
        """Switch the board's supply; returns once the board has reacted."""
        self._call(lambda: self._set_power(on))

    def reset(self, boot: str = "flash") -> None:
        """EN pulse with IO0 held low (``"download"``) or high (``"flash"``); waits for the mode.

        Done atomically on the board (no RC window), so the caller can use the port right after.
        """
        if boot not in ("flash", "download"):
            raise ValueError(f"reset boot must be 'flash' or 'download', not {boot!r}")
        self._call(lambda: self._control_reset(download=boot == "download"))

    def set_wire_time(self, enabled: bool) -> None:
        """Turn UART wire-time emulation on or off."""
        self._wire_time = enabled
        with self._rx_lock:
            self._rx_free_at = 0.0
        self._tx_free_at = 0.0

    @property
    def wire_time(self) -> bool:
        return self._wire_time

    def call_later(self, delay: float, func: Callable[[], None]) -> None:
        """Run ``func`` under the board's execution lock after ``delay`` seconds."""
        if self._owner == threading.get_ident():
            # From board code itself: count from the time of the event being handled.
            entry = (self._event_time + max(0.0, delay), next(self._timer_seq), func)
            heapq.heappush(self._timers, entry)
            if threading.current_thread() is not self._thread:
                self._post(_nothing)  # feed()'s inline path: wake the worker to re-arm its wait
            return
        due = time.monotonic() + max(0.0, delay)
        self._post(lambda: heapq.heappush(self._timers, (due, next(self._timer_seq), func)))

    @property
    def efuse(self) -> BootEfuse:
        """The board's virtual eFuses now (an immutable record)."""
        return self._efuse

    def burn_efuse(self, **burn: Any) -> BootEfuse:
        """Burn eFuses (see :func:`burn_efuse`; raises UsageError); returns the new record.

        Takes effect at once for the running app's OTA checks and at the next boot for the
        bootloader, as on a chip. Stored through ``on_efuse_change``.
        """
        result: list[BootEfuse] = []

        def apply() -> None:
            new = burn_efuse(self._efuse, self.chip, **burn)
            self._set_efuse(new)
            result.append(new)

        self._call(apply)
        return result[0]

    def replace_chip(self, efuse: BootEfuse) -> None:
        """Simulator only: a fresh chip with these eFuses (what swapping the module does)."""
        self._call(lambda: self._set_efuse(efuse))

    def status(self) -> BoardStatus:
        """Snapshot of the board (read without stopping it; may be mid-transition)."""
        mode = self._mode
        if mode in ("download", "stub"):
            mode = "stub" if self._loader.mode == "stub" else "download"
        info = self._app_info if mode in ("app", "stopped") else None
        app = None
        if info is not None:
            app = {
                "project": info.project,
                "version": info.version,
                "slot": info.partition_label,
                "ota_state": info.ota_state or "",
                "runs": "yes" if info.demo else "no",
            }
        return BoardStatus(
            board_id=self.board_id,
            chip=self.chip,
            mac=self.mac,
            powered=self._powered,
            mode=mode,
            flash_size=self.flash_size,
            baud=self._baud,
            app=app,
            client=self.has_client,
            en=self._en(),
            io0=self._io0(),
            wire_time=self._wire_time,
            rx_bytes=self._rx_bytes,
            tx_bytes=self._tx_bytes,
            wire_seconds=self._wire_seconds,
            revision=format_revision(self._loader.revision),
        )

    def close(self) -> None:
        """Stop the app and the worker thread, and flush the flash file."""
        if self._closed:
            return
        self._call(self._shutdown)
        self._closed = True
        self._events.put(None)
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ worker plumbing

    def _post(self, func: Callable[[], None]) -> None:
        with self._count_lock:
            self._queued += 1
        self._events.put((time.monotonic(), func))

    def _call(self, func: Callable[[], None], timeout: float = 30.0) -> None:
        if self._owner == threading.get_ident():  # already running board code: no hand-off
            func()
            return
        done: Future[None] = Future()

        def run() -> None:
            try:
                func()
            except BaseException as exc:  # handed back to the caller's thread
                done.set_exception(exc)
            else:
                done.set_result(None)

        self._post(run)
        done.result(timeout=timeout)

    def _run(self) -> None:
        while True:
            timeout = None
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            try:
                item = self._events.get(timeout=timeout)
            except queue.Empty:
                item = None
                if self._closed:
                    return
            else:
                if item is None:
                    return
            with self._exec_lock:
                self._owner = threading.get_ident()
                if item is not None:
                    posted, event = item
                    # Timers that fell due before this event was posted go first, and the event
                    # runs at its posting time: a late worker must not reorder, e.g., the EN RC
                    # sample and a DTR change that came after it.
                    self._run_timers(posted)
                    self._event_time = posted
                    self._guard(event)
                    with self._count_lock:
                        self._queued -= 1
                self._run_timers(time.monotonic())
                self._owner = None

    def _run_timers(self, until: float) -> None:
        while self._timers and self._timers[0][0] <= until:
            due, _, func = heapq.heappop(self._timers)
            self._event_time = due
            self._guard(func)

    def _guard(self, func: Callable[[], None]) -> None:
        # One bad event (an app bug, a loader bug) must not kill the board's thread: log it on
        # the board's console, as a crashing firmware would print, and keep serving.
        try:
            func()
        except Exception as exc:  # noqa: BLE001 - the board must outlive any single fault
            self._emit(f"\r\n[virtual board {self.board_id}: internal error {exc!r}]\r\n".encode())

    # ------------------------------------------------------------------ output

    def _emit(self, data: bytes) -> None:
        if not data or not self._powered or self._mode in ("off", "reset"):
            return
        with self._sink_lock:
            sink = self._sink
        if sink is None:
            return
        with self._rx_lock:
            self._tx_bytes += len(data)
            self._wire_seconds += len(data) * UART_BITS_PER_BYTE / self._baud
        if self._wire_time:
            # Sleep per chunk: the chunk is delivered after its UART time, so a host sees the
            # throughput of a real UART at the current baud without a per-byte loop.
            now = time.monotonic()
            done = max(now, self._tx_free_at) + len(data) * UART_BITS_PER_BYTE / self._baud
            self._tx_free_at = done
            delay = done - now
            if delay > 0:
                time.sleep(delay)
        try:
            sink.write(data)
        except OSError:
            with self._sink_lock:
                if self._sink is sink:
                    self._sink = None

    # ------------------------------------------------------------------ input

    def _on_rx(self, data: bytes) -> None:
        if not self._powered:
            return
        mode = self._mode
        if mode in ("download", "stub"):
            out = self._loader.feed(data)
            if out:
                self._emit(out)
            # Baud changes after the ack went out at the old rate, as on the chip.
            if self._pending_baud is not None:
                self._baud = self._pending_baud
                self._pending_baud = None
            if self._pending_boot:
                self._pending_boot = False
                self._spi_boot("sw")  # the ROM loader jumps to flash boot: a software reset
            if self._pending_wdt:
                self._pending_wdt = False
                epoch = self._epoch
                self.call_later(RTC_WDT_DELAY, lambda: self._watchdog_reset(epoch))
        elif mode == "app":
            self._console_input(data)
        # off / reset / halted / boot-loop: the chip is not listening.

    def _console_input(self, data: bytes) -> None:
        for byte in data:
            after_cr, self._console_cr = self._console_cr, byte == 0x0D
            if byte in (0x0A, 0x0D):
                # An app that reads empty lines (a Unity menu: ENTER shows the test list) gets
                # them, with CR LF taken as one line end.
                empty_ok = getattr(self._app, "wants_empty_lines", False) and not (
                    byte == 0x0A and after_cr)
                if self._console_line or empty_ok:
                    line = self._console_line.decode("utf-8", "replace")
                    self._console_line.clear()
                    if self._app is not None:
                        self._app.feed_line(line)
                        if self._mode != "app":
                            return
            elif len(self._console_line) < 4096:  # a console line buffer is finite
                self._console_line.append(byte)

    def _on_run_app(self) -> None:
        # Called by the loader from inside feed(): boot once its reply has been sent.
        self._pending_boot = True

    def _on_watchdog(self) -> None:
        # Called by the loader from inside feed(): reset once its reply has been sent.
        self._pending_wdt = True

    def _watchdog_reset(self, epoch: int) -> None:
        # The RTC watchdog's system reset: the chip restarts and samples its strapping pins
        # again, so it boots from flash unless IO0 is held low (ROM or stub alike stop).
        if epoch != self._epoch or not self._powered or self._mode not in ("download", "stub"):
            return
        self._enter_reset()
        self._leave_reset(download=not self._io0(), reason="wdt")

    def _on_baud(self, baud: int) -> None:
        if baud > 0:
            self._pending_baud = baud

    # ------------------------------------------------------------------ lines, power, reset

    def _en(self) -> bool:
        return self._ctl_en and not (self._rts and not self._dtr)

    def _io0(self) -> bool:
        return self._ctl_io0 and not (self._dtr and not self._rts)

    def _lines_changed(self) -> None:
        if not self._powered:
            return
        en = self._en()
        in_reset = self._mode == "reset"
        if not en and not in_reset:
            self._enter_reset()
        elif en and in_reset and not self._rc_pending:
            self._rc_pending = True
            epoch = self._epoch
            self.call_later(self._rc_delay, lambda: self._rc_expired(epoch))

    _rc_pending = False

    def _rc_expired(self, epoch: int) -> None:
        self._rc_pending = False
        if epoch != self._epoch or self._mode != "reset":
            return
        if not self._en():
            return
        self._leave_reset(download=not self._io0())

    def _enter_reset(self) -> None:
        self._stop_app()
        self._epoch += 1
        self._rc_pending = False
        self._mode = "reset"

    def _leave_reset(self, *, download: bool, reason: str = "poweron") -> None:
        self._epoch += 1
        self._baud = DEFAULT_BAUD
        self._pending_baud = None
        self._pending_boot = False
        self._pending_wdt = False
        if download:
            self._mode = "download"
            # Banner first, at the reset edge: esptool looks for it right after its reset
            # sequence and flushes its input before SYNC (bytes after that break SLIP parsing).
            banner = rom_banner(self.chip, True) if reason == "poweron" else rom_banner(
                self.chip, True, reset_reason=boot_chain.rom_reset_text(self.chip, reason))
            self._emit(banner.encode())
            self._loader.enter_download()
        else:
            self._loop_outcome = None
            self._spi_boot(reason)

    def _set_power(self, on: bool) -> None:
        if on == self._powered:
            return
        if not on:
            self._stop_app()
            self._epoch += 1
            self._rc_pending = False
            self._mode = "off"
            self._powered = False
            self._flash.flush()
            return
        self._powered = True
        self._mode = "reset"
        if self._en():
            self._leave_reset(download=not self._io0())

    def _control_reset(self, *, download: bool) -> None:
        if not self._powered:
            raise RuntimeError(
                f"board {self.board_id} is powered off; power it on before resetting it"
            )
        self._enter_reset()
        self._leave_reset(download=download)

    def _schedule_soft_reset(self, epoch: int, delay: float, reason: str) -> None:
        # Deferred (never inside the app's own call) and delayed by the restart time, so a
        # crash-at-boot image loops at a chip's pace instead of spinning the CPU.
        self.call_later(delay, lambda: self._soft_reset(epoch, reason))

    def _soft_reset(self, epoch: int, reason: str) -> None:
        # esp_restart()/panic reset: EN is not involved, the chip boots from flash again.
        if epoch != self._epoch or not self._powered:
            return
        self._stop_app()
        self._epoch += 1
        self._loop_outcome = None
        self._spi_boot(reason)

    def _stop_app(self) -> None:
        app, self._app = self._app, None
        self._app_info = None
        self._console_line.clear()
        if app is not None:
            try:
                app.stop()
            except Exception:  # noqa: BLE001 - a stopping app cannot stop a reset
                pass

    # ------------------------------------------------------------------ boot

    def _spi_boot(self, reason: str) -> None:
        """Boot from flash; ``reason`` picks the ROM's rst: line (poweron, sw, panic, wdt)."""
        self._stop_app()
        self._loop_parked = False
        self._mode = "booting"  # transient, inside this call: the chip is out of reset and talks
        if reason != "wdt":  # a watchdog retry follows a boot that wrote nothing
            self._flash.flush()
        outcome = self._loop_outcome if reason == "wdt" else None
        if outcome is None:
            outcome = boot_chain.boot(
                self.chip,
                self._flash,
                efuse=self._efuse,
                rollback_enabled=self._rollback_enabled,
                reset_reason=reason,
                # The real RSA-PSS check of each Secure Boot V2 block (secure_boot_signatures
                # _bootloader.c verifies every candidate block with the ROM's RSA routines).
                signature_verifier=verify_block,
                chip_revision=self.revision,
            )
        log = outcome.log
        if outcome.app is not None and not outcome.app.demo:
            # Said in the same write as the boot log, so a reader never sees app_main without
            # the reason nothing follows it.
            log += cannot_run_line(self.board_id, outcome.app) + "\r\n"
        self._emit(log.encode("utf-8", "replace"))
        if outcome.app is not None:
            self._loop_outcome = None
            if outcome.app.ota_state == "VALID":
                self._raise_secure_version(outcome.app.secure_version)
            self._app_info = outcome.app
            if not outcome.app.demo:
                # Nothing of the app runs: no console, no mesh, no self-test (so an OTA slot
                # stays PENDING_VERIFY until the next reset rolls it back, as on a chip whose
                # app never confirms itself).
                self._mode = "stopped"
                return
            self._mode = "app"
            epoch = self._epoch
            self._app = DemoApp(AppHostImpl(self, epoch), outcome.app, self._medium)
            self._app.start()
        elif outcome.boot_loop:
            # Within one boot loop nothing can change the flash (no loader, no app), so a
            # retry's outcome is reused instead of re-parsing the flash every attempt.
            if reason == "wdt":
                self._loop_outcome = outcome
            self._mode = "boot-loop"
            epoch = self._epoch
            self.call_later(self._boot_retry_delay, lambda: self._retry_boot(epoch))
        else:
            self._loop_outcome = None
            self._mode = "halted"

    def _retry_boot(self, epoch: int) -> None:
        if epoch != self._epoch or self._mode != "boot-loop":
            return
        if self._sink is None and self._loop_outcome is not None:
            # Nobody listens and the outcome is known: another attempt would change nothing
            # observable, so park the loop (idle racks stay at ~0 CPU). attach() resumes it.
            self._loop_parked = True
            return
        self._epoch += 1
        self._spi_boot("wdt")  # the RTC watchdog resets a chip stuck in the ROM

    def _resume_loop(self) -> None:
        if self._loop_parked and self._mode == "boot-loop":
            self._loop_parked = False
            self._epoch += 1
            self._spi_boot("wdt")

    def _mark_running_slot(self, *, valid: bool) -> None:
        info = self._app_info
        if info is None:
            return
        if valid:
            if boot_chain.mark_valid(self._flash, info) == "ESP_OK":
                self._app_info = replace(info, ota_state="VALID")
                self._raise_secure_version(info.secure_version)
        else:
            boot_chain.mark_invalid(self._flash, info)
        self._flash.flush()

    def _raise_secure_version(self, secure_version: int) -> None:
        # The bootloader's update_anti_rollback(): the eFuse only ever goes up, and only when
        # anti-rollback is configured.
        efuse = self._efuse
        if efuse.anti_rollback and secure_version > efuse.secure_version:
            bits = secure_version_bits(self.chip)
            self._set_efuse(replace(efuse, secure_version=min(secure_version, bits)))

    def _set_efuse(self, efuse: BootEfuse) -> None:
        if efuse == self._efuse:
            return
        self._efuse = efuse
        if self._on_efuse_change is not None:
            self._on_efuse_change(efuse)

    def _shutdown(self) -> None:
        self._stop_app()
        self._epoch += 1
        self._mode = "off"
        self._powered = False
        self._flash.flush()
        self._flash.close()
