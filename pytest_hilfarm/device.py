"""The Device handle a test gets: console, reset, power, flash and boot information of one board.

Built by the farm from drivers (console, reset, power, flasher) and plain board facts; it holds no
rack records and makes no reservation decisions. Infrastructure trouble surfaces as BootError /
FlashError / PortError (InfrastructureError), so the plugin reports a setup error and marks the
board UNKNOWN instead of failing the test. It must not open ports itself: the console owns the
port, and flashing borrows it through ``pause()``/``resume()``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_hilfarm.console import DEFAULT_PROMPT, Console
from pytest_hilfarm.errors import BootError, ConsoleTimeout, UsageError
from pytest_hilfarm.flashing import (
    FlashPlan,
    FlashReport,
    ProgressFn,
    flash,
    make_plan,
    read_md5,
)
from pytest_hilfarm.power import PowerDriver
from pytest_hilfarm.reset import ResetDriver

# The app has started once ESP-IDF prints its version in the app's startup banner
# (app_init in IDF >= 5.0, cpu_start before) or calls app_main.
APP_STARTED = re.compile(
    r"(?:app_init|cpu_start): ESP-IDF:[^\n]*\n|main_task: Calling app_main\(\)"
)
# Signs that the boot will not reach the app: fail at once instead of waiting for the timeout.
BOOT_FAILED = re.compile(
    r"Guru Meditation Error[^\n]*|abort\(\) was called[^\n]*|"
    r"E \(\d+\) boot: (?:No bootable app partitions|Factory app partition is not bootable|"
    r"OTA app partition slot \d+ is not bootable|.*[Ii]nvalid)[^\n]*|"
    r"ets_main\.c \d+[^\n]*|invalid header: 0x[0-9a-f]+"
)

Flasher = Callable[..., FlashReport]


@dataclass(frozen=True)
class BootInfo:
    """What the last boot log says about the running app (None where it said nothing)."""

    partition_label: str | None
    partition_offset: int | None
    project: str | None
    app_version: str | None
    idf_version: str | None


_LOADED = re.compile(r"boot: Loaded app from partition at offset (0x[0-9a-fA-F]+)")
_TABLE_ROW = re.compile(
    r"boot:\s+\d+\s+(\S+)\s+.*?\s([0-9a-fA-F]{8})\s+([0-9a-fA-F]{8})\s*$", re.M
)
_FIELD = {
    "project": re.compile(r"(?:app_init|cpu_start): Project name:\s+(\S.*?)\s*$", re.M),
    "app_version": re.compile(r"(?:app_init|cpu_start): App version:\s+(\S.*?)\s*$", re.M),
    "idf_version": re.compile(r"(?:app_init|cpu_start): ESP-IDF:\s+(\S.*?)\s*$", re.M),
}


def parse_boot_info(text: str) -> BootInfo:
    """Parse an ESP-IDF boot log (bootloader + app startup lines); the last boot wins."""
    text = text.replace("\r", "")
    offset: int | None = None
    for match in _LOADED.finditer(text):
        offset = int(match.group(1), 16)
    label: str | None = None
    if offset is not None:
        for row in _TABLE_ROW.finditer(text):
            if int(row.group(2), 16) == offset:
                label = row.group(1)
    fields: dict[str, str | None] = {}
    for key, regex in _FIELD.items():
        found = regex.findall(text)
        fields[key] = found[-1] if found else None
    return BootInfo(label, offset, fields["project"], fields["app_version"], fields["idf_version"])


class Device:
    """One reserved board, as a test sees it.

    ``port`` is what esptool opens (a device path or URL); ``resolve_port`` (optional) returns
    the current path after re-enumeration. ``flasher`` defaults to :func:`flashing.flash`.
    """

    def __init__(
        self,
        *,
        id: str,  # noqa: A002 - the board's id is the natural name for tests
        chip: str,
        port: str,
        console: Console,
        reset: ResetDriver,
        power: PowerDriver,
        mac: str | None = None,
        resolve_port: Callable[[], str | None] | None = None,
        flasher: Flasher = flash,
        boot_timeout: float = 10.0,
        flash_baud: int = 921600,
    ) -> None:
        self.id = id
        self.chip = chip
        self.mac = mac
        self._port = port
        self.console = console
        self.reset_driver = reset
        self.power_driver = power
        self._resolve_port = resolve_port
        self._flasher = flasher
        self.boot_timeout = boot_timeout
        self.flash_baud = flash_baud
        self._boot_mark: int | None = None
        self._prompt_seen = False

    def __repr__(self) -> str:
        return f"<Device {self.id} {self.chip} on {self.port}>"

    @property
    def port(self) -> str:
        if self._resolve_port is not None:
            current = self._resolve_port()
            if current:
                self._port = current
        return self._port

    @property
    def log_path(self) -> Path:
        return self.console.log_path

    # -- console ----------------------------------------------------------------------------------

    def expect(self, pattern: str | re.Pattern[str], timeout: float = 10.0) -> re.Match[str]:
        """Wait for a regex in the board's output (see Console.expect)."""
        return self.console.expect(pattern, timeout)

    def expect_exact(self, text: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait for literal text in the board's output."""
        return self.console.expect_exact(text, timeout)

    def write(self, data: str | bytes) -> None:
        """Send text or bytes to the board's console."""
        self.console.write(data)

    def command(
        self, cmd: str, timeout: float = 5.0, prompt: str | re.Pattern[str] = DEFAULT_PROMPT
    ) -> str:
        """Run a console command and return its reply (see Console.command).

        After a boot, first waits (up to ``timeout``) for the app's first prompt: ESP-IDF's
        console, like the virtual rack's app, drops input typed before it shows a prompt.
        """
        if not self._prompt_seen:
            regex = re.compile(prompt) if isinstance(prompt, str) else prompt
            deadline = time.monotonic() + timeout
            mark = self._boot_mark if self._boot_mark is not None else 0
            while regex.search(text := self.console.window(mark)[1]) is None:
                crashed = BOOT_FAILED.search(text)
                if crashed is not None:
                    # No prompt will come: say why now instead of after the timeout.
                    raise ConsoleTimeout(
                        f"the app crashed before its console prompt, so {cmd!r} was not sent: "
                        f"{crashed.group(0).strip()}\n{self._tail()}",
                        where=f"board {self.id}",
                        hint=f"the firmware panics at start; full log: {self.log_path}",
                    )
                if time.monotonic() >= deadline:
                    raise ConsoleTimeout(
                        f"the console prompt {regex.pattern!r} did not appear within "
                        f"{timeout:g} s, so {cmd!r} was not sent\n{self._tail()}",
                        where=f"board {self.id}",
                        hint=f"the app may not run a console, or uses another prompt (pass "
                        f"prompt=...); full log: {self.log_path}",
                    )
                time.sleep(0.01)
            self._prompt_seen = True
        return self.console.command(cmd, timeout, prompt)

    # -- boot -------------------------------------------------------------------------------------

    def _mark_boot(self) -> None:
        self._boot_mark = self.console.mark()
        self._prompt_seen = False

    def wait_boot(self, timeout: float | None = None) -> BootInfo:
        """Wait until the app has started (since the last reset, power cycle or flash)."""
        timeout = self.boot_timeout if timeout is None else timeout
        # From the last reset, or from what the test already consumed (a crash it expected,
        # say), whichever is later: that is where the boot being waited for starts.
        mark = max(self._boot_mark or 0, self.console.position)
        if mark != self._boot_mark:
            self._boot_mark = mark
            self._prompt_seen = False
        deadline = time.monotonic() + timeout
        while True:
            start, text = self.console.window(mark)
            started = APP_STARTED.search(text)
            failed = BOOT_FAILED.search(text)
            if failed is not None and (started is None or failed.start() < started.start()):
                raise BootError(
                    f"the board failed to boot: {failed.group(0).strip()}\n"
                    f"{self._tail()}",
                    where=f"board {self.id} ({self.chip})",
                    hint=f"check the firmware (a crash at boot is the image's fault when the "
                    f"baseline boots); full log: {self.log_path}",
                )
            if started is not None:
                # Everything up to the banner belongs to this boot; later expects start after it.
                self.console.seek(start + started.end())
                return parse_boot_info(text[: started.end()])
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                self.console.expect(APP_STARTED, min(left, 0.25))
            except ConsoleTimeout:
                continue
        raise BootError(
            f"no app start banner within {timeout:g} s\n{self._tail()}",
            where=f"board {self.id} ({self.chip})",
            hint="the board may be unpowered, stuck in download mode, or boot-looping; "
            f"full log: {self.log_path}",
        )

    def _tail(self) -> str:
        tail = self.console.tail(20)
        lines = tail.split("\n") if tail else ["(no output at all)"]
        return "  last lines of the console:\n" + "\n".join(f"    | {line}" for line in lines)

    def boot_info(self) -> BootInfo:
        """Partition, project, app and IDF versions from the last boot log in the buffer."""
        mark = self._boot_mark if self._boot_mark is not None else 0
        return parse_boot_info(self.console.text_since(mark))

    def reset(self, *, wait: bool = True, timeout: float | None = None) -> BootInfo | None:
        """Reset into the app and (by default) wait for it to start."""
        self._mark_boot()
        self.reset_driver.reset_to_app()
        return self.wait_boot(timeout) if wait else None

    def power_cycle(
        self, off_seconds: float = 0.5, *, wait: bool = True, timeout: float | None = None
    ) -> BootInfo | None:
        """Switch the board off and on, wait for its port to come back and (by default) boot."""
        self._mark_boot()
        self.power_driver.cycle(off_seconds)
        self.console.wait_connected(timeout=timeout or self.boot_timeout)
        return self.wait_boot(timeout) if wait else None

    # -- flashing ---------------------------------------------------------------------------------

    def probe(self, *, wait: bool = True, timeout: float | None = None) -> str:
        """Prove the rig path works: enter download mode, read the first sector's MD5, reboot.

        What a health check does for a board without a baseline image: it shows the port,
        the reset lines and the ROM loader answer, whatever the flash holds.
        """
        before = self.reset_driver.esptool_before
        if before == "no-reset":
            try:
                self.reset_driver.reset_to_download()
            except UsageError:
                pass  # reset: none: the board must already wait in download mode
        self.console.pause()
        try:
            digest = read_md5(self.port, self.chip, 0, 0x1000, before=before, after="no-reset")
        finally:
            self.console.resume()
        if wait:
            self._mark_boot()
            self.reset_driver.reset_to_app()
        return digest

    def _enter_download(self) -> None:
        try:
            self.reset_driver.reset_to_download()
        except UsageError:
            pass  # reset: none: the board must already wait in download mode

    def flash(
        self,
        plan_or_path: FlashPlan | Path | str | bytes | list[tuple[Any, Any]],
        *,
        progress: ProgressFn | None = None,
        skip_identical: bool = True,
        wait: bool = True,
        timeout: float | None = None,
    ) -> FlashReport:
        """Flash firmware (image, build dir, flasher_args.json, pairs or plan) and boot it.

        The console releases the port while esptool has it. The board is put into download mode
        by esptool itself when its reset lines allow (classic, usb-jtag), else through the reset
        driver (virtual); after flashing the reset driver boots the app while the console
        listens, so the boot log is captured.
        """
        plan = make_plan(plan_or_path)
        before = self.reset_driver.esptool_before
        self.console.pause()
        try:
            report = self._flasher(
                self.port,
                self.chip,
                plan,
                baud=self.flash_baud,
                progress=progress,
                skip_identical=skip_identical,
                before=before,
                after="no-reset",
                board=self.id,
                enter_download=self._enter_download if before == "no-reset" else None,
            )
        finally:
            self.console.resume()
        if wait:
            self.reset(timeout=timeout)
        return report
