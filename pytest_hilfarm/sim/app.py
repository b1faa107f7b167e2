"""The demo app a virtual board runs once its boot chain started an image, and its console.

:class:`DemoApp` prints the rest of an ESP-IDF app start, applies the image's faults (crash, hang,
slow boot, failing OTA self-test, mesh drops), joins the rack's :class:`MeshMedium`, answers a
line console and installs OTA updates (``ota <url>``). It acts on the board only through its
:class:`AppHost` (an OTA download runs on the host's fetch thread); it does no I/O, never
sleeps (every delay goes through ``host.call_later``) and is confined to the board's thread
(mesh deliveries are handed over with ``host.call_later(0, ...)``).

It speaks the console protocol written down in ``docs/console-protocol.md`` (the Device's side:
:mod:`pytest_hilfarm.board.protocol`); a change to a reply or a log line here is a change to that
protocol, so the document and the Device's patterns change with it.
"""

from __future__ import annotations

import enum
import hashlib
import math
import re
import types
from collections import deque
from collections.abc import Callable
from functools import partial

from pytest_hilfarm.esp.chips import CHIPS
from pytest_hilfarm.esp.image import HEADER_SIZE, chip_id_of
from pytest_hilfarm.sim.mesh import BROADCAST, MeshMedium, Packet
from pytest_hilfarm.sim.model import AppHost, AppInfo, Faults, FetchHandle, OtaError

TAG = "hilfarm-demo"
MESH_TAG = "hilfarm-mesh"
PROMPT = "> "
EOL = "\r\n"
APP_MAIN_MS = 312  # boot time at which app_main() is called, as on an ESP32 DevKit
WDT_PERIOD = 5.0  # CONFIG_ESP_TASK_WDT_TIMEOUT_S default
INBOX_SIZE = 64  # a real app's queue is bounded; a soak test must not grow memory forever
BATTERY_DRAIN_PCT_PER_S = 0.1 / 60.0
_BASE_HEAP = types.MappingProxyType({"esp32": 298_712, "esp32s2": 241_004, "esp32c3": 327_480,
                                     "esp32s3": 386_620, "esp32c6": 441_908})

HELP = (
    "version - project, version, secure version, IDF version, running partition",
    "status - uptime, free heap, running partition, OTA state, mesh membership",
    "sensor - temperature, humidity, pressure",
    "battery - battery voltage and charge",
    "mesh nodes - nodes in this board's mesh, itself included",
    "mesh send <node-id|all> <text> - send a mesh message",
    "mesh inbox [clear] - received mesh messages",
    "ota <url> [retries] - download and install a firmware update over HTTP",
    "reboot - restart the board",
    "crash - crash the app (panic and reset)",
    "help - this list",
)
MESH_USAGE = "mesh nodes | mesh send <node-id|all> <text> | mesh inbox [clear]"
OTA_TAG = "esp_https_ota"
OTA_MAX_RETRIES = 8
OTA_BACKOFF_S = (1.0, 2.0, 4.0)  # then 4 s for every further retry
# esp_app_desc_t sits at 0x20 (notes §1.2); its version string is at +16, 32 bytes.
_DESC_VERSION = slice(0x20 + 16, 0x20 + 48)


class _State(enum.Enum):
    IDLE = "idle"  # constructed, start() not called yet
    BOOTING = "booting"  # app_main running its (maybe slow) init
    READY = "ready"  # console answering
    HUNG = "hung"  # hang_at_boot: only the task watchdog speaks
    DEAD = "dead"  # crashed / rebooting / stopped: nothing more happens


class DemoApp:
    """The firmware a virtual board runs (see the module docstring for the console).

    ``position`` is the board's place in the rack (mesh topology); None takes
    ``host.position`` if the host has one, else the trailing number of ``host.board_id``, else 0.
    """

    def __init__(
        self,
        host: AppHost,
        info: AppInfo,
        medium: MeshMedium | None,
        *,
        position: int | None = None,
    ) -> None:
        self._host = host
        self._info = info
        self._medium = medium
        self._position = _resolve_position(host, position)
        self._state = _State.IDLE
        self._t0 = 0.0
        self._ota_state = info.ota_state
        self._in_mesh = False
        self._prompt_shown = False
        self._inbox: deque[Packet] = deque(maxlen=INBOX_SIZE)
        self._ota: _OtaJob | None = None
        self._unity: _UnityMenu | None = None

    @property
    def wants_empty_lines(self) -> bool:
        """A Unity menu reads empty lines (ENTER shows the test list); the console does not."""
        return self._unity is not None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Print the app start and apply the image's boot faults. Call once."""
        if self._state is not _State.IDLE:
            raise RuntimeError("DemoApp.start() called twice")
        self._t0 = self._host.now()
        self._state = _State.BOOTING
        info, faults = self._info, self._info.faults
        # The boot chain (sim/boot.py) already printed the ESP-IDF startup lines up to
        # "Calling app_main()"; the app's own output starts here.
        lines = [
            f"I ({APP_MAIN_MS}) {TAG}: running partition {info.partition_label} at "
            f"0x{info.partition_offset:x}, ota_state {self._ota_state or 'none'}",
            f"I ({APP_MAIN_MS}) {TAG}: initializing",
        ]
        self._host.emit("".join(line + EOL for line in lines))
        if faults.crash_at_boot:
            self._state = _State.DEAD
            self._host.panic(panic_text(self._host.chip, info.image_sha256, store=False,
                                        elf_sha256=info.elf_sha256, faults=faults))
        elif faults.hang_at_boot:
            # The main task spins without yielding: no console, only the watchdog.
            self._state = _State.HUNG
            self._host.call_later(WDT_PERIOD, self._watchdog)
        elif faults.unity_menu:
            self._state = _State.READY
            self._unity = _UnityMenu(self)
            self._unity.start()
        elif faults.slow_boot > 0:
            self._host.call_later(faults.slow_boot, self._finish_init)
        else:
            self._finish_init()

    def stop(self) -> None:
        """The board reset or lost power: leave the mesh, ignore any later input or timer."""
        self._state = _State.DEAD
        if self._ota is not None:
            self._ota.cancel()
            self._ota = None
        if self._in_mesh and self._medium is not None:
            self._in_mesh = False
            self._medium.leave(self._host.board_id)

    def _finish_init(self) -> None:
        if self._state is not _State.BOOTING:
            return
        if self._ota_state == "PENDING_VERIFY":
            # The rollback contract: a new slot confirms itself only after its self-test.
            if self._info.faults.fail_self_test:
                self._log("E", TAG, "self-test failed, rolling back")
                self.stop()
                self._host.mark_app_invalid_and_reboot()
                return
            self._log("I", TAG, "self-test passed, marking app valid")
            self._host.mark_app_valid()
            self._ota_state = "VALID"
        if self._medium is not None:
            self._log(
                "I", MESH_TAG, f"joining mesh as {self._host.board_id} (position {self._position})"
            )
            self._medium.join(
                self._host.board_id,
                self._position,
                self._deliver,
                drop_fraction=self._info.faults.drop_mesh,
            )
            self._in_mesh = True
        self._log("I", TAG, f"{self._info.project} {self._info.version} ready")
        self._state = _State.READY
        self._host.emit(PROMPT)
        self._prompt_shown = True

    def _watchdog(self) -> None:
        if self._state is not _State.HUNG:
            return
        for text in (
            "Task watchdog got triggered. The following tasks/users did not reset the watchdog "
            "in time:",
            " - IDLE0 (CPU 0)",
            "Tasks currently running:",
            "CPU 0: main",
            "Print CPU 0 (current core) backtrace",
        ):
            self._log("E", "task_wdt", text)
        self._host.call_later(WDT_PERIOD, self._watchdog)

    # ------------------------------------------------------------------ console

    def feed_line(self, line: str) -> None:
        """Handle one console line (without or with its line end)."""
        if self._state is not _State.READY:
            return
        line = line.strip("\r\n")
        if self._unity is not None:
            self._unity.feed_line(line)
            return
        self._host.emit(line + EOL)
        self._prompt_shown = False
        words = line.split()
        reply = self._dispatch(words, line) if words else []
        if reply is None or self._state is not _State.READY:
            return  # rebooting / crashing: no prompt
        self._host.emit("".join(r + EOL for r in reply) + PROMPT)
        self._prompt_shown = True

    def _dispatch(self, words: list[str], line: str) -> list[str] | None:
        handlers: dict[str, Callable[[list[str], str], list[str] | None]] = {
            "version": self._cmd_version,
            "status": self._cmd_status,
            "sensor": self._cmd_sensor,
            "battery": self._cmd_battery,
            "mesh": self._cmd_mesh,
            "help": self._cmd_help,
            "reboot": self._cmd_reboot,
            "crash": self._cmd_crash,
            "ota": self._cmd_ota,
        }
        handler = handlers.get(words[0])
        if handler is None:
            return [f"error: unknown command '{words[0]}' (try 'help')"]
        return handler(words, line)

    def _cmd_version(self, words: list[str], line: str) -> list[str]:
        if len(words) != 1:
            return ["error: usage: version"]
        info = self._info
        return [
            f"project: {info.project}",
            f"version: {info.version}",
            f"secure_version: {info.secure_version}",
            f"idf_ver: {info.idf_ver}",
            f"chip: {info.chip}",
            f"partition: {info.partition_label}",
            f"partition_offset: 0x{info.partition_offset:x}",
        ]

    def _cmd_status(self, words: list[str], line: str) -> list[str]:
        if len(words) != 1:
            return ["error: usage: status"]
        medium = self._medium
        joined = self._in_mesh and medium is not None and medium.is_joined(self._host.board_id)
        return [
            f"uptime_s: {self._uptime():.3f}",
            f"heap_free: {self._heap_free()}",
            f"partition: {self._info.partition_label}",
            f"ota_state: {self._ota_state or 'none'}",
            f"mesh_joined: {'yes' if joined else 'no'}",
        ]

    def _cmd_sensor(self, words: list[str], line: str) -> list[str]:
        if len(words) != 1:
            return ["error: usage: sensor"]
        temp, hum, press = sensor_values(self._host.mac, self._host.now())
        return [
            f"temperature_c: {temp:.2f}",
            f"humidity_pct: {hum:.2f}",
            f"pressure_hpa: {press:.2f}",
        ]

    def _cmd_battery(self, words: list[str], line: str) -> list[str]:
        if len(words) != 1:
            return ["error: usage: battery"]
        volts, pct = battery_values(self._host.mac, self._uptime())
        return [f"battery_v: {volts:.3f}", f"battery_pct: {pct}"]

    def _cmd_help(self, words: list[str], line: str) -> list[str]:
        return list(HELP)

    def _cmd_reboot(self, words: list[str], line: str) -> None:
        self._log("I", TAG, "restart requested from console")
        self.stop()
        self._host.reboot("console reboot")
        return None

    def _cmd_crash(self, words: list[str], line: str) -> None:
        self.stop()
        self._host.panic(panic_text(self._host.chip, self._info.image_sha256, store=True,
                                    elf_sha256=self._info.elf_sha256, faults=self._info.faults))
        return None

    def _cmd_ota(self, words: list[str], line: str) -> list[str]:
        if len(words) not in (2, 3) or (len(words) == 3 and not words[2].isdigit()):
            return ["error: usage: ota <url> [retries]"]
        if self._ota is not None:
            return ["error: OTA already in progress"]
        retries = int(words[2]) if len(words) == 3 else OTA_MAX_RETRIES
        self._ota = _OtaJob(self, words[1], retries)
        # Started after the reply: its first log lines belong after the prompt.
        self._host.call_later(0.0, self._ota.start)
        return [f"ota: downloading {words[1]}"]

    def _ota_finished(self, job: _OtaJob) -> None:
        if self._ota is job:
            self._ota = None

    def _cmd_mesh(self, words: list[str], line: str) -> list[str]:
        sub = words[1] if len(words) > 1 else ""
        if sub not in ("nodes", "send", "inbox"):
            return [f"error: usage: {MESH_USAGE}"]
        if self._medium is None:
            return ["error: no mesh radio"]
        me = self._host.board_id
        if sub == "nodes":
            if len(words) != 2:
                return ["error: usage: mesh nodes"]
            members = self._medium.members(me) if self._in_mesh else []
            return [f"nodes: {len(members)}", ("ids: " + " ".join(members)).rstrip()]
        if sub == "inbox":
            if len(words) == 3 and words[2] == "clear":
                count = len(self._inbox)
                self._inbox.clear()
                return [f"cleared: {count}"]
            if len(words) != 2:
                return ["error: usage: mesh inbox [clear]"]
            return [f"inbox: {len(self._inbox)}"] + [
                f"msg: id={p.msg_id} src={p.src} dst={p.dst} hops={p.hops} text={p.text}"
                for p in self._inbox
            ]
        # send: the text is the rest of the raw line so inner spacing survives.
        match = re.match(r"\s*mesh\s+send\s+(\S+)\s+(.*\S)", line)
        if match is None:
            return ["error: usage: mesh send <node-id|all> <text>"]
        dst, text = match.group(1), match.group(2)
        if dst == me:
            return ["error: cannot send to self"]
        if not (self._in_mesh and self._medium.is_joined(me)):
            return ["error: mesh not joined"]
        if dst != BROADCAST and dst not in self._medium.nodes(me):
            return [f"error: no route to {dst}"]
        msg_id = self._medium.send(me, dst, text)
        return [f"sent: id={msg_id} dst={dst}"]

    # ------------------------------------------------------------------ mesh

    def _deliver(self, packet: Packet) -> None:
        # Called on the medium's thread: hand over to the board's thread.
        self._host.call_later(0.0, partial(self._on_packet, packet))

    def _on_packet(self, packet: Packet) -> None:
        if self._state is not _State.READY:
            return
        self._inbox.append(packet)
        self._log("I", MESH_TAG, f"rx id={packet.msg_id} src={packet.src} hops={packet.hops}")

    # ------------------------------------------------------------------ helpers

    def _uptime(self) -> float:
        return APP_MAIN_MS / 1000.0 + (self._host.now() - self._t0)

    def _heap_free(self) -> int:
        base = _BASE_HEAP.get(self._host.chip, 280_000)
        return base - int(_unit(self._host.mac, "heap") * 2048) - 96 * len(self._inbox)

    def _log(self, level: str, tag: str, text: str) -> None:
        ms = round(self._uptime() * 1000)
        # A log line must not glue onto a prompt already on screen.
        lead = EOL if self._prompt_shown else ""
        self._prompt_shown = False
        self._host.emit(f"{lead}{level} ({ms}) {tag}: {text}{EOL}")


# The Unity test app's cases: (name, tags as the menu prints them, what the case does).
UNITY_FILE = "main/test_demo_app.c"
UNITY_CASES = (
    ("sensor values are plausible", "[sensor]", "pass"),
    ("battery voltage is in range", "[sensor][power]", "pass"),
    ("mesh node id is stable", "[mesh]", "pass"),
    ("config checksum matches", "[storage]", "fail"),
    ("wear levelling on this flash", "[storage]", "ignore"),
    ("null pointer store", "[panic]", "panic"),
    ("sensor soak over an hour", "[sensor][ignore]", "pass"),
)
UNITY_CASE_S = 0.05  # how long a case runs (scheduled, never slept)


class _UnityMenu:
    """ESP-IDF's ``unity_run_menu()`` (components/unity/unity_runner.c) over the demo app.

    Prints ``Press ENTER to see the list of tests.``; an empty line prints the menu
    (``(n)<TAB>"name" [tags]`` lines, then ``Enter test for running.``); a line starting with
    a digit runs that case and prints ``Test ran in <n>ms``, ``"name"`` runs by name, ``[tag]``
    runs the cases whose tags contain it (``Running tests matching '[tag]'...``; ``!`` inverts),
    ``*`` runs all. Each case prints ``Running <name>...``, its output, then Unity's
    ``<file>:<line>:<name>:PASS`` / ``:FAIL: <message>`` / ``:IGNORE: <message>``; a selection
    ends with Unity's summary (``N Tests F Failures I Ignored`` then ``OK`` or ``FAIL``) and
    ``Enter next test, or 'enter' to see menu``. Input that arrives while cases run is dropped,
    as ``unity_gets`` flushes the UART first. The panicking case resets the board, which boots
    back into the menu.
    """

    def __init__(self, app: DemoApp) -> None:
        self._app = app
        self._busy = False
        self._counts = [0, 0, 0]  # tests, failures, ignored since UNITY_BEGIN

    def _emit(self, *lines: str) -> None:
        self._app._host.emit("".join(line + EOL for line in lines))

    def start(self) -> None:
        self._emit("", "", "Press ENTER to see the list of tests.")

    def feed_line(self, line: str) -> None:
        if self._busy:
            return
        cmd = line.rstrip()
        if not cmd:
            menu = [f'({i})\t"{name}" {tags}' for i, (name, tags, _) in
                    enumerate(UNITY_CASES, 1)]
            self._emit("", "", "Here's the test menu, pick your combo:", *menu, "",
                       "Enter test for running.")
            return
        self._counts = [0, 0, 0]
        invert = cmd.startswith("!")
        body = cmd[1:] if invert else cmd
        chosen: list[int] = []
        timed = False
        if body.startswith("*"):
            chosen = list(range(len(UNITY_CASES)))
        elif body.startswith("["):
            self._emit(f"Running tests {'NOT ' if invert else ''}matching '{body}'...")
            chosen = [i for i, (_, tags, _) in enumerate(UNITY_CASES)
                      if (body in tags) != invert]
        elif body.startswith('"') and body.rfind('"') > 0:
            wanted = body[1 : body.rfind('"')]
            chosen = [i for i, (name, _, _) in enumerate(UNITY_CASES) if name == wanted]
        elif body[0].isdigit():
            digits = re.match(r"\d+", body)
            index = int(digits.group(0)) if digits else 0
            if 1 <= index <= len(UNITY_CASES):
                chosen, timed = [index - 1], True
        self._busy = True
        self._run(chosen, timed, self._app._host.now())

    def _run(self, pending: list[int], timed: bool, started: float) -> None:
        if self._app._state is not _State.READY:
            return
        if not pending:
            if timed:
                ms = round((self._app._host.now() - started) * 1000)
                self._emit(f"Test ran in {ms}ms")
            tests, failures, ignored = self._counts
            self._emit("", "-----------------------",
                       f"{tests} Tests {failures} Failures {ignored} Ignored ",
                       "FAIL" if failures else "OK", "Enter next test, or 'enter' to see menu")
            self._busy = False
            return
        index, rest = pending[0], pending[1:]
        name, _, kind = UNITY_CASES[index]
        self._emit(f"Running {name}...")
        line = 20 + 12 * index  # where the case's TEST_CASE sits in the test file
        host = self._app._host
        if kind == "panic":
            self._app.stop()
            host.panic(panic_text(host.chip, self._app._info.image_sha256, store=True,
                                  elf_sha256=self._app._info.elf_sha256,
                                  faults=self._app._info.faults))
            return

        def finish() -> None:
            if self._app._state is not _State.READY:
                return
            self._counts[0] += 1
            if kind == "pass":
                temp, _, _ = sensor_values(host.mac, host.now())
                self._emit(f"I ({round(self._app._uptime() * 1000)}) test: temperature "
                           f"{temp:.2f} C", f"{UNITY_FILE}:{line}:{name}:PASS")
            elif kind == "fail":
                self._counts[1] += 1
                self._emit(f"{UNITY_FILE}:{line + 7}:{name}:FAIL: Expected 0x5A17C0DE "
                           "Was 0x5A17C0DF")
            else:
                self._counts[2] += 1
                self._emit(f"{UNITY_FILE}:{line + 2}:{name}:IGNORE: not supported on a "
                           "virtual board")
            self._run(rest, timed, started)

        host.call_later(UNITY_CASE_S, finish)


class _OtaJob:
    """One ``ota <url>``: esp_https_ota's begin/perform/finish on the app's side.

    Runs on the board's thread only; the bytes come from :meth:`AppHost.fetch`. Every failure
    goes through :meth:`_fail`, which aborts the write and leaves otadata alone, so the running
    slot stays the one that boots.
    """

    def __init__(self, app: DemoApp, url: str, max_retries: int = OTA_MAX_RETRIES) -> None:
        self._app = app
        self._max_retries = max_retries
        self._host = app._host
        self._url = url
        self._fetch: FetchHandle | None = None
        self._total: int | None = None
        self._written = 0
        self._skip = 0  # bytes of a full resend that were already written
        self._begun = False
        self._head = bytearray()
        self._checked_header = False
        self._next_pct = 10
        self._retries = 0
        self._done = False

    def start(self) -> None:
        if self._done:
            return
        info = self._app._info
        self._app._log("I", OTA_TAG, "Starting OTA...")
        self._app._log("I", TAG, f"Running firmware version: {info.version}")
        self._request()

    def cancel(self) -> None:
        self._done = True
        if self._fetch is not None:
            self._fetch.cancel()

    def _live(self) -> bool:
        return not self._done and self._app._state is _State.READY

    def _request(self) -> None:
        self._fetch = self._host.fetch(self._url, offset=self._written,
                                       on_response=self._on_response, on_data=self._on_data,
                                       on_done=self._on_done)

    def _on_response(self, status: int, start: int, total: int | None) -> None:
        if not self._live():
            return
        if status not in (200, 206):
            return  # on_done reports the status
        if status == 200:
            start = 0
            self._skip = self._written  # the server ignored Range: drop what we already have
        elif start != self._written:
            self._fail("ESP_FAIL", f"server resumed at byte {start}, expected {self._written}")
            return
        if self._total is None:
            self._total = total
        if self._begun:
            return
        try:
            label, offset = self._host.ota_begin(self._total or 0)
        except OtaError as exc:
            self._fail_ota(exc)
            return
        self._begun = True
        self._app._log("I", OTA_TAG, f"Writing to <{label}> partition at offset 0x{offset:x}")
        size = f"{self._total} bytes" if self._total is not None else "unknown"
        self._app._log("I", TAG, f"OTA image size: {size}")

    def _on_data(self, chunk: bytes) -> None:
        if not self._live() or not self._begun:
            return
        if self._skip:
            drop = min(self._skip, len(chunk))
            self._skip -= drop
            chunk = chunk[drop:]
            if not chunk:
                return
        if not self._checked_header:
            self._head += chunk[: max(0, 0x20 + 256 - len(self._head))]
            if len(self._head) >= HEADER_SIZE and self._head[0] == 0xE9:
                found = int.from_bytes(self._head[12:14], "little")
                expected = chip_id_of(self._host.chip)
                if found != expected:
                    # esp_https_ota.c esp_ota_verify_chip_id(), before anything is written.
                    self._app._log("E", OTA_TAG, f"Mismatch chip id, expected {expected}, "
                                                 f"found {found}")
                    self._fail("ESP_ERR_INVALID_VERSION",
                               f"the image is for chip id {found}, this board is "
                               f"{self._host.chip} (chip id {expected})")
                    return
            if len(self._head) >= _DESC_VERSION.stop or self._head[:1] != b"\xe9":
                self._checked_header = True
                if self._head[:1] == b"\xe9":
                    version = bytes(self._head[_DESC_VERSION]).split(b"\0", 1)[0]
                    self._app._log("I", TAG, "New firmware version: "
                                             f"{version.decode('utf-8', 'replace')}")
        try:
            self._host.ota_write(chunk)
        except OtaError as exc:
            self._fail_ota(exc)
            return
        self._written += len(chunk)
        total = self._total
        if total:
            pct = self._written * 100 // total
            if pct >= self._next_pct:
                self._app._log("I", TAG, f"OTA progress: {self._written}/{total} bytes "
                                         f"({pct}%)")
                self._next_pct = (pct // 10 + 1) * 10

    def _on_done(self, error: str | None) -> None:
        if not self._live():
            return
        self._fetch = None
        if error is None and self._total is not None and self._written < self._total:
            error = f"connection closed after {self._written} of {self._total} bytes"
        if error is not None:
            if error.startswith("HTTP status"):
                self._fail("ESP_FAIL", f"server answered {error[12:]} for {self._url}")
                return
            if error.startswith("cannot fetch") or self._retries >= self._max_retries:
                tries = f" after {self._retries + 1} attempts" if self._retries else ""
                self._fail("ESP_FAIL", f"download failed{tries}: {error}")
                return
            self._retries += 1
            delay = OTA_BACKOFF_S[min(self._retries, len(OTA_BACKOFF_S)) - 1]
            self._app._log("W", OTA_TAG, f"download interrupted at byte {self._written}: "
                                         f"{error}; retry {self._retries}/{self._max_retries} "
                                         f"in {delay:g} s")
            self._host.call_later(delay, self._resume)
            return
        if not self._begun:
            self._fail("ESP_FAIL", "the server sent no image")
            return
        self._finish()

    def _resume(self) -> None:
        if not self._live():
            return
        self._app._log("I", OTA_TAG, f"resuming at byte {self._written} (HTTP Range)")
        self._request()

    def _finish(self) -> None:
        try:
            result = self._host.ota_end()
            self._host.ota_set_boot_partition()
        except OtaError as exc:
            self._fail_ota(exc)
            return
        key = result.signed_by[:16] if result.signed_by else "unchecked"
        self._app._log("I", TAG, f"OTA image verified: {result.project} {result.version} "
                                 f"secure_version {result.secure_version} sha256 "
                                 f"{result.sha256[:16]} key {key}")
        self._app._log("I", TAG, f"OTA succeeded: {result.project} {result.version} in "
                                 f"{result.partition_label}, rebooting")
        self._app._log("I", TAG, "Prepare to restart system!")
        self._done = True
        self._app._ota_finished(self)
        self._app.stop()
        self._host.reboot("OTA update")

    def _fail_ota(self, exc: OtaError) -> None:
        for level, tag, text in exc.lines:
            self._app._log(level, tag, text)
        self._fail(exc.code, exc.message)

    def _fail(self, code: str, message: str) -> None:
        if self._done:
            return
        self._done = True
        if self._fetch is not None:
            self._fetch.cancel()
            self._fetch = None
        self._host.ota_abort()
        info = self._app._info
        self._app._log("E", TAG, f"OTA failed: {code}: {message}")
        self._app._log("I", TAG, f"still running {info.partition_label} ({info.project} "
                                 f"{info.version})")
        self._app._ota_finished(self)


def sensor_values(mac: str, now: float) -> tuple[float, float, float]:
    """Temperature (C), relative humidity (%) and pressure (hPa) of a board at time ``now``.

    A per-MAC base plus slow sine drifts: plausible, and the same for the same MAC and time.
    """
    temp = 20.0 + 6.0 * _unit(mac, "t") + 1.5 * _wave(mac, "tw", now, 1800.0)
    hum = 35.0 + 25.0 * _unit(mac, "h") + 5.0 * _wave(mac, "hw", now, 2400.0)
    press = 1000.0 + 25.0 * _unit(mac, "p") + 1.2 * _wave(mac, "pw", now, 3600.0)
    return temp, hum, press


def battery_values(mac: str, uptime: float) -> tuple[float, int]:
    """Battery voltage and whole percent after ``uptime`` seconds (starts at 75..99 %)."""
    pct = max(0.0, 75.0 + 24.0 * _unit(mac, "b") - BATTERY_DRAIN_PCT_PER_S * uptime)
    return 3.3 + 0.9 * pct / 100.0, int(pct)


def panic_text(chip: str, sha256: str, *, store: bool, elf_sha256: str,
               faults: Faults | None = None) -> str:
    """ESP-IDF-like panic output for a NULL access, CRLF line ends, ending in ``Rebooting...``.

    Xtensa chips say LoadProhibited/StoreProhibited, RISC-V ones Load/Store access fault, as
    ESP-IDF does. Addresses derive from the image hash ``sha256`` so one image always crashes
    the same way; the "ELF file SHA256" line is the app descriptor's ``app_elf_sha256``
    (``elf_sha256``, hex), as ESP-IDF's panic handler prints it, never the image's hash.
    An image built with ``panic_pc``/``panic_ra`` faults there instead (addresses of its ELF).
    """
    seed = hashlib.sha256(f"{sha256}/{store}".encode()).digest()
    words = [int.from_bytes(seed[i : i + 4], "big") for i in range(0, 32, 4)]
    if CHIPS[chip].architecture == "riscv":
        cause = "Store access fault" if store else "Load access fault"
        pc = (faults.panic_pc if faults and faults.panic_pc else 0x42000000
              | (words[0] & 0x000FFFFC))
        ra = faults.panic_ra if faults and faults.panic_ra else pc - 0x1A
        sp = 0x3FC80000 | (words[1] & 0x0000FFF0)
        lines = [
            f"Guru Meditation Error: Core  0 panic'ed ({cause}). Exception was unhandled.",
            "",
            "Core  0 register dump:",
            f"MEPC    : 0x{pc:08x}  RA      : 0x{ra:08x}  SP      : 0x{sp:08x}  "
            f"GP      : 0x3fc8b200",
            f"TP      : 0x{sp + 0x200:08x}  T0      : 0x{words[2]:08x}  T1      : "
            f"0x{words[3]:08x}  T2      : 0x00000000",
            f"MSTATUS : 0x00001881  MTVEC   : 0x40380001  MCAUSE  : 0x0000000{7 if store else 5}  "
            "MTVAL   : 0x00000000",
            f"MHARTID : 0x00000000  S0      : 0x{words[4]:08x}  S1      : 0x{words[5]:08x}  "
            "A0      : 0x00000000",
        ]
    else:
        cause = "StoreProhibited" if store else "LoadProhibited"
        pc = (faults.panic_pc if faults and faults.panic_pc else 0x400D0000
              | (words[0] & 0x0000FFFC))
        sp = 0x3FFB0000 | (words[1] & 0x0000FFF0)
        lines = [
            f"Guru Meditation Error: Core  0 panic'ed ({cause}). Exception was unhandled.",
            "",
            "Core  0 register dump:",
            f"PC      : 0x{pc:08x}  PS      : 0x00060030  A0      : 0x{0x80000000 | pc + 0x2C:08x}"
            f"  A1      : 0x{sp:08x}",
            f"A2      : 0x00000000  A3      : 0x{words[2]:08x}  A4      : 0x00000001  "
            f"A5      : 0x{words[3]:08x}",
            # EXCCAUSE 28/29 are LoadProhibited/StoreProhibited on Xtensa.
            f"EXCCAUSE: 0x{0x1D if store else 0x1C:08x}  EXCVADDR: 0x00000000",
            "",
            f"Backtrace: 0x{pc - 3:08x}:0x{sp:08x} 0x{pc + 0x29:08x}:0x{sp + 0x20:08x} "
            f"0x40086e6d:0x{sp + 0x40:08x}",
        ]
    lines += ["", "", f"ELF file SHA256: {elf_sha256[:16]}", "", "Rebooting..."]
    return "".join(line + EOL for line in lines)


def _resolve_position(host: AppHost, position: int | None) -> int:
    if position is not None:
        return position
    from_host = getattr(host, "position", None)
    if isinstance(from_host, int):
        return from_host
    match = re.search(r"(\d+)$", host.board_id)
    return int(match.group(1)) if match else 0


def _unit(mac: str, salt: str) -> float:
    # sha256, not hash(): str hashes are salted per process and the values must be stable.
    digest = hashlib.sha256(f"{mac.lower()}/{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _wave(mac: str, salt: str, now: float, period: float) -> float:
    return math.sin(2.0 * math.pi * (now / period + _unit(mac, salt)))
