"""The console protocol the Device reads: boot lines, the prompt's replies, OTA outcome lines.

What a board prints is ESP-IDF's (ROM and bootloader lines, the app's startup banner, panics)
plus the small line protocol of the virtual rack's demo app, which firmware under test is
expected to mirror: ``key: value`` replies after the echoed command, ``error: <message>`` for a
failed one, ESP-IDF-style log lines, and the OTA progress and outcome lines. The whole protocol,
command by command, is written down in ``docs/console-protocol.md``; the demo app
(:mod:`pytest_hilfarm.sim.app`) speaks it and the Device (:mod:`pytest_hilfarm.board.device`)
reads it through the patterns below. Patterns only: nothing here opens a port.
"""

from __future__ import annotations

import re

# A virtual board that booted an image it has no model of says so in one line (sim/board.py
# cannot_run_line) and runs nothing more: the boot is over there.
CANNOT_RUN = re.compile(r"\[virtual board [^:\]\r\n]+: cannot run this app: ([^\r\n]*)\]")
# The app has started once ESP-IDF prints its version in the app's startup banner
# (app_init in IDF >= 5.0, cpu_start before) or calls app_main.
APP_STARTED = re.compile(
    r"(?:app_init|cpu_start): ESP-IDF:[^\n]*\n|main_task: Calling app_main\(\)|"
    + CANNOT_RUN.pattern
)
# The virtual rack's demo app announces itself right after app_main (sim/app.py).
DEMO_RUNS = re.compile(r"hilfarm-demo: running partition ")
# Signs that the boot will not reach the app: fail at once instead of waiting for the timeout.
# A slot that is "not bootable", and "ota data partition invalid, falling back to factory", are
# not among them: the bootloader goes on to the next slot (an OTA rollback, a refused signature;
# bootloader_utility.c), and "No bootable app partitions" follows when none is left.
BOOT_FAILED = re.compile(
    r"Guru Meditation Error[^\n]*|abort\(\) was called[^\n]*|"
    r"E \(\d+\) boot: (?:No bootable app partitions|(?!ota data partition invalid).*[Ii]nvalid)"
    r"[^\n]*|ets_main\.c \d+[^\n]*|invalid header: 0x[0-9a-f]+"
)

# The app's OTA result lines (docs/console-protocol.md) and what rolls an update back.
OTA_RESULT = re.compile(
    r"hilfarm-demo: OTA (succeeded|failed): ([^\r\n]*)"
)
OTA_NEW = re.compile(r"OTA succeeded: (\S+) (\S+) in (\S+), rebooting")
ROLLBACK_REASON = re.compile(
    r"self-test failed[^\r\n]*|Guru Meditation Error[^\r\n]*|task_wdt:[^\r\n]*|"
    r"OTA app partition slot \d+ is not bootable[^\r\n]*"
)
ROM_RESET = re.compile(r"rst:0x[0-9a-f]+")
REPLY_FIELD = re.compile(r"^(\w+): (.*)$", re.M)
# A reply line that says the command failed: the demo app's one-line ``error: <message>``
# (sim/app.py), and the lines ESP-IDF's console REPL prints itself after a command
# (esp_console's repl task: unknown command, a non-zero return code, a console error).
COMMAND_FAILED = re.compile(
    r"^(?:error:.*|Unrecognized command|Command returned non-zero error code:.*|"
    r"Internal error:.*)$",
    re.M,
)
LOADED_APP = re.compile(r"boot: Loaded app from partition at offset (0x[0-9a-fA-F]+)")
TABLE_ROW = re.compile(
    r"boot:\s+\d+\s+(\S+)\s+.*?\s([0-9a-fA-F]{8})\s+([0-9a-fA-F]{8})\s*$", re.M
)
BANNER_FIELDS = {
    "project": re.compile(r"(?:app_init|cpu_start): Project name:\s+(\S.*?)\s*$", re.M),
    "app_version": re.compile(r"(?:app_init|cpu_start): App version:\s+(\S.*?)\s*$", re.M),
    "idf_version": re.compile(r"(?:app_init|cpu_start): ESP-IDF:\s+(\S.*?)\s*$", re.M),
}
