"""The Device handle a test gets: console, reset, power, flash and boot information of one board.

Built by the farm from drivers (console, reset, power, flasher) and plain board facts; it holds no
rack records and makes no reservation decisions. Infrastructure trouble surfaces as BootError /
FlashError / PortError (InfrastructureError), so the plugin reports a setup error and marks the
board UNKNOWN instead of failing the test. It must not open ports itself: the console owns the
port, and flashing borrows it through ``pause()``/``resume()``.

``ota_update`` drives an over-the-air update through the app's console (``ota <url>``: the
console protocol, :mod:`pytest_hilfarm.board.protocol`, which firmware under test mirrors) and
reads the outcome from the log; it serves a local image through an
:class:`~pytest_hilfarm.ota.server.OtaServer` on 127.0.0.1 when given a path or bytes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_hilfarm.board.console import DEFAULT_PROMPT, Console
from pytest_hilfarm.board.protocol import (
    APP_STARTED,
    BANNER_FIELDS,
    BOOT_FAILED,
    CANNOT_RUN,
    COMMAND_FAILED,
    DEMO_RUNS,
    LOADED_APP,
    OTA_NEW,
    OTA_RESULT,
    REPLY_FIELD,
    ROLLBACK_REASON,
    ROM_RESET,
    TABLE_ROW,
)
from pytest_hilfarm.drivers.flashing import (
    FlashPlan,
    FlashReport,
    ProgressFn,
    flash,
    make_plan,
    read_md5,
)
from pytest_hilfarm.drivers.power import PowerDriver
from pytest_hilfarm.drivers.reset import ResetDriver
from pytest_hilfarm.errors import BootError, CommandError, ConsoleTimeout, UsageError

Flasher = Callable[..., FlashReport]

OTA_OUTCOMES = ("confirmed", "rolled_back", "rejected")


@dataclass(frozen=True)
class OtaOutcome:
    """How an over-the-air update ended (:meth:`Device.ota_update`).

    ``result``: "confirmed" (the new version runs and its slot is VALID, or UNDEFINED on a
    bootloader without rollback), "rolled_back" (it
    booted but failed its self-test, crashed or was reset before confirming; the old version
    runs again) or "rejected" (download or verification failed; the old version never stopped).
    ``before``/``after`` are the boot information before and after; ``running`` the ``version``
    / ``status`` fields of the app running at the end; ``reason`` the line that decided it;
    ``log`` the console from the ``ota`` command on.
    """

    result: str
    url: str
    before: BootInfo
    after: BootInfo
    running: dict[str, str]
    reason: str | None
    log: str
    seconds: float

    @property
    def confirmed(self) -> bool:
        return self.result == "confirmed"

    @property
    def rolled_back(self) -> bool:
        return self.result == "rolled_back"

    @property
    def rejected(self) -> bool:
        return self.result == "rejected"


@dataclass(frozen=True)
class BootInfo:
    """What the last boot log says about the running app (None where it said nothing).

    ``runs_on_virtual``: False when a virtual board said it cannot run this app (an image not
    built for the virtual rack boots to ``app_main`` and stops; ``not_run_reason`` says why),
    True when the virtual rack's demo app started, None otherwise (a real board).
    """

    partition_label: str | None
    partition_offset: int | None
    project: str | None
    app_version: str | None
    idf_version: str | None
    runs_on_virtual: bool | None = None
    not_run_reason: str | None = None


class AppCannotRun(ConsoleTimeout):
    """The board said it cannot run the flashed app (a virtual board given a real build)."""


def _quoted(reply: str) -> str:
    lines = reply.split("\n") if reply else ["(empty reply)"]
    return "\n".join(f"    | {line}" for line in lines)


def parse_boot_info(text: str) -> BootInfo:
    """Parse an ESP-IDF boot log (bootloader + app startup lines); the last boot wins."""
    text = text.replace("\r", "")
    offset: int | None = None
    for match in LOADED_APP.finditer(text):
        offset = int(match.group(1), 16)
    label: str | None = None
    if offset is not None:
        for row in TABLE_ROW.finditer(text):
            if int(row.group(2), 16) == offset:
                label = row.group(1)
    fields: dict[str, str | None] = {}
    for key, regex in BANNER_FIELDS.items():
        found = regex.findall(text)
        fields[key] = found[-1] if found else None
    # Whichever was said last belongs to the last boot.
    cannot = list(CANNOT_RUN.finditer(text))
    demo = list(DEMO_RUNS.finditer(text))
    runs: bool | None = None
    reason: str | None = None
    if cannot and (not demo or cannot[-1].start() > demo[-1].start()):
        runs, reason = False, cannot[-1].group(1)
    elif demo:
        runs = True
    return BootInfo(label, offset, fields["project"], fields["app_version"], fields["idf_version"],
                    runs, reason)


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
        # Why the last boot that was waited for did not reach the app (None: it did, or none
        # was waited for): the farm leaves such a board for a health check when it is released.
        self.boot_failure: str | None = None

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
        try:
            return self.console.expect(pattern, timeout)
        except ConsoleTimeout:
            self._check_runs(self.console.text_since(self._boot_mark or 0), "it never came")
            raise

    def expect_exact(self, text: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait for literal text in the board's output."""
        try:
            return self.console.expect_exact(text, timeout)
        except ConsoleTimeout:
            self._check_runs(self.console.text_since(self._boot_mark or 0), "it never came")
            raise

    def _check_runs(self, text: str, what: str) -> None:
        """Raise AppCannotRun when the board said it cannot run the app (a virtual board given
        an image not built for it): waiting for the app's output would only time out.
        """
        found = CANNOT_RUN.search(text)
        if found is not None:
            raise AppCannotRun(
                f"the board cannot run this app, so {what}: {found.group(1)}",
                where=f"board {self.id} ({self.chip})",
                hint="a virtual board boots a real build up to app_main and stops there; run "
                "tests of the app's behaviour on a real board (docs/virtual-rack.md)")

    def write(self, data: str | bytes) -> None:
        """Send text or bytes to the board's console."""
        self.console.write(data)

    def command(
        self,
        cmd: str,
        timeout: float = 5.0,
        prompt: str | re.Pattern[str] = DEFAULT_PROMPT,
        *,
        check: bool = True,
    ) -> str:
        """Run a console command and return its reply (see Console.command).

        After a boot, first waits (up to ``timeout``) for the app's first prompt: ESP-IDF's
        console, like the virtual rack's app, drops input typed before it shows a prompt.
        A reply with a line that says the command failed (``error: ...``, or ESP-IDF's REPL
        lines ``Unrecognized command`` / ``Command returned non-zero error code: ...``) raises
        :class:`CommandError`; ``check=False`` returns such a reply like any other.
        """
        if not self._prompt_seen:
            regex = re.compile(prompt) if isinstance(prompt, str) else prompt
            deadline = time.monotonic() + timeout
            mark = self._boot_mark if self._boot_mark is not None else 0
            while regex.search(text := self.console.window(mark)[1]) is None:
                self._check_runs(text, f"{cmd!r} was not sent")
                crashed = BOOT_FAILED.search(text)
                if crashed is not None:
                    self.boot_failure = crashed.group(0).strip()
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
        reply = self.console.command(cmd, timeout, prompt)
        failed = COMMAND_FAILED.search(reply) if check else None
        if failed is not None:
            raise CommandError(
                f"command {cmd!r} failed: {failed.group(0).strip()}\n{_quoted(reply)}",
                command=cmd, reply=reply, board=self.id, where=f"board {self.id}",
                hint="the app refused or could not do it (not a rig fault); to get such a "
                f"reply back as text, pass check=False; full log: {self.log_path}",
            )
        return reply

    def wait_for(
        self,
        cmd: str,
        pattern: str | re.Pattern[str],
        *,
        timeout: float = 30.0,
        interval: float = 0.25,
        command_timeout: float = 5.0,
    ) -> re.Match[str]:
        """Run ``cmd`` every ``interval`` s until its reply matches ``pattern``; return the match.

        For conditions that take time (a mesh forming, a sensor settling): replaces a
        hand-written sleep loop. A reply that reports an error (``error: mesh not joined``)
        counts as "not yet". After ``timeout`` s raises :class:`ConsoleTimeout` with the
        pattern, the last reply and the log path. A crash or a missing prompt is not waited
        out: its ConsoleTimeout comes from :meth:`command` at once.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        started = time.monotonic()
        deadline = started + timeout
        polls = 0
        while True:
            polls += 1
            reply = self.command(cmd, timeout=command_timeout, check=False)
            match = regex.search(reply)
            if match is not None:
                return match
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConsoleTimeout(
                    f"the reply to {cmd!r} did not match {regex.pattern!r} within {timeout:g} s "
                    f"({polls} polls); last reply:\n{_quoted(reply)}",
                    where=f"board {self.id}",
                    hint=f"the condition never held; full log: {self.log_path}",
                )
            time.sleep(min(interval, left))

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
                self.boot_failure = failed.group(0).strip()
                raise BootError(
                    f"the board failed to boot: {failed.group(0).strip()}\n"
                    f"{self._tail()}",
                    where=f"board {self.id} ({self.chip})",
                    hint=f"check the firmware (a crash at boot is the image's fault when the "
                    f"baseline boots); full log: {self.log_path}",
                )
            if started is not None:
                # Everything up to the banner belongs to this boot; later expects start after it
                # (and after a virtual board's "cannot run this app" line, part of the same boot).
                self.boot_failure = None
                end = started.end()
                cannot = CANNOT_RUN.search(text, end)
                if cannot is not None and "rst:" not in text[end : cannot.start()]:
                    end = cannot.end()
                self.console.seek(start + end)
                return parse_boot_info(text[:end])
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                self.console.expect(APP_STARTED, min(left, 0.25))
            except ConsoleTimeout:
                continue
        self.boot_failure = f"no app start banner within {timeout:g} s"
        raise BootError(
            f"no app start banner within {timeout:g} s\n{self._tail()}",
            where=f"board {self.id} ({self.chip})",
            hint="the board may be unpowered, stuck in download mode, or boot-looping; "
            f"full log: {self.log_path}",
        )

    def check_stays_up(self, seconds: float = 0.5) -> None:
        """After a boot: raise BootError if the app panics or aborts within ``seconds``.

        A boot check that only waits for the start banner passes an app that crashes right
        after ``app_main`` starts (the banner comes first); a health check must not.
        """
        mark = self.console.position
        deadline = time.monotonic() + seconds
        while True:
            crashed = BOOT_FAILED.search(self.console.window(mark)[1])
            if crashed is not None:
                self.boot_failure = crashed.group(0).strip()
                raise BootError(
                    f"the app crashed right after it started: {self.boot_failure}\n"
                    f"{self._tail()}",
                    where=f"board {self.id} ({self.chip})",
                    hint=f"the firmware crashes at start; full log: {self.log_path}",
                )
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.02))

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
        from pytest_hilfarm.board.wiring import flash_and_boot

        plan = make_plan(plan_or_path)
        self.console.pause()
        try:
            # Booted below, by the reset driver, while the console listens.
            report = flash_and_boot(
                self.port, self.chip, plan, reset=self.reset_driver, flasher=self._flasher,
                boot=False, baud=self.flash_baud, progress=progress,
                skip_identical=skip_identical, board=self.id,
            )
        finally:
            self.console.resume()
        if wait:
            self.reset(timeout=timeout)
        return report

    # -- over the air -----------------------------------------------------------------------------

    def app_fields(self, timeout: float = 5.0) -> dict[str, str]:
        """The running app's ``version`` and ``status`` replies as one dict (key: value lines)."""
        fields: dict[str, str] = {}
        for cmd in ("version", "status"):
            reply = self.command(cmd, timeout=timeout).replace("\r", "")
            for match in REPLY_FIELD.finditer(reply):
                fields.setdefault(match.group(1), match.group(2).strip())
        return fields

    def ota_update(
        self,
        image: str | Path | bytes,
        *,
        server: Any = None,
        timeout: float = 120.0,
        retries: int | None = None,
    ) -> OtaOutcome:
        """Update the running app over the air and wait for the outcome (see :class:`OtaOutcome`).

        ``image`` is an ``http://`` URL the board can reach (127.0.0.1 on the virtual rack), or
        an image file / bytes that is published on ``server`` (an ``OtaServer``; a temporary one
        when None). ``retries`` limits the app's download retries (the app's default: 8).
        A new app that neither confirms nor rolls back within ``timeout`` (it hangs at boot)
        raises :class:`ConsoleTimeout`.
        """
        started = time.monotonic()
        own_server = None
        if isinstance(image, str) and image.startswith(("http://", "https://")):
            url = image
        else:
            if server is None:
                from pytest_hilfarm.ota.server import OtaServer

                own_server = server = OtaServer().start()
            if isinstance(image, bytes):
                name = f"{self.id}-update.bin"
                url = server.publish(name, image)
            else:
                path = Path(image)
                if not path.is_file():
                    raise UsageError(f"no image file at {path}", where=f"OTA update of {self.id}",
                                     hint="pass an app .bin, its bytes, or an http:// URL")
                url = server.publish(f"{self.id}-{path.name}", path)
        try:
            return self._ota_run(url, started, timeout, retries)
        finally:
            if own_server is not None:
                own_server.stop()

    def _ota_run(self, url: str, started: float, timeout: float,
                 retries: int | None) -> OtaOutcome:
        before = self.boot_info()
        deadline = started + timeout
        where = f"OTA update of board {self.id}"
        mark = self.console.mark()
        cmd = f"ota {url}" + (f" {retries}" if retries is not None else "")
        reply = self.command(cmd, timeout=min(10.0, timeout), check=False)
        if COMMAND_FAILED.search(reply) is not None:
            raise UsageError(f"the app refused the update: {reply.strip()}", where=where,
                             hint="wait for the previous update to end, and check the URL")
        result = self._ota_wait(OTA_RESULT, mark, deadline, where)
        if result.group(1) == "failed":
            self.console.seek(result.end() + self.console.window(mark)[0])
            running = self.app_fields()
            return OtaOutcome("rejected", url, before, before, running, result.group(2).strip(),
                              self.console.text_since(mark), time.monotonic() - started)
        new = OTA_NEW.search(result.group(0))
        new_version = new.group(2) if new else None
        new_slot = new.group(3) if new else None
        boot_start, prompt_end = self._ota_settle(mark, deadline, where)
        # What follows belongs to the boot that stayed up: boot_info() and commands start there.
        self._boot_mark = boot_start
        self.console.seek(prompt_end)
        self._prompt_seen = True
        after = self.boot_info()
        running = self.app_fields()
        log = self.console.text_since(mark)
        # VALID after the self-test; UNDEFINED when the bootloader has no rollback option
        # (esp_ota_set_boot_partition then writes no NEW state and nothing is confirmed).
        ok = (running.get("version") == new_version and running.get("partition") == new_slot
              and running.get("ota_state") in ("VALID", "UNDEFINED"))
        reason_match = None if ok else ROLLBACK_REASON.search(log)
        reason = reason_match.group(0).strip() if reason_match else None
        return OtaOutcome("confirmed" if ok else "rolled_back", url, before, after, running,
                          reason, log, time.monotonic() - started)

    def _ota_wait(self, regex: re.Pattern[str], mark: int, deadline: float,
                  where: str) -> re.Match[str]:
        while True:
            _, text = self.console.window(mark)
            match = regex.search(text)
            if match is not None:
                return match
            if time.monotonic() >= deadline:
                raise ConsoleTimeout(
                    f"no OTA result line ({regex.pattern!r}) before the timeout\n{self._tail()}",
                    where=where, hint="the download may be stuck: check the server's request log "
                    f"and the board log {self.log_path}")
            time.sleep(0.05)

    def _ota_settle(self, mark: int, deadline: float, where: str) -> tuple[int, int]:
        """Wait until an app that booted after the update shows its prompt and stays up.

        Returns (absolute start of that boot's log, absolute end of its first prompt). A new
        app that fails its self-test or crashes reboots *before* its prompt, so the first boot
        with a prompt is the one that stays (the new app confirmed, or the old one after the
        rollback).
        """
        prompt = re.compile(DEFAULT_PROMPT)
        while True:
            base, text = self.console.window(mark)
            result = OTA_RESULT.search(text)
            after = result.end() if result else 0
            boots = list(APP_STARTED.finditer(text, after))
            if boots:
                last = boots[-1]
                shown = prompt.search(text, last.end())
                if shown is not None:
                    resets = [m.start() for m in ROM_RESET.finditer(text, after, last.start())]
                    first_line = text.rfind("\n", 0, resets[-1]) + 1 if resets else last.start()
                    return base + first_line, base + shown.end()
            if time.monotonic() >= deadline:
                raise ConsoleTimeout(
                    "the update was written and the board rebooted, but no app reached its "
                    f"console prompt before the timeout\n{self._tail()}", where=where,
                    hint="the new app may hang at boot without confirming itself: a reset "
                    "rolls it back (ABORTED); full log: " + str(self.log_path))
            time.sleep(0.05)
