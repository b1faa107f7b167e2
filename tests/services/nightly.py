"""A week of realistic nightly HIL results, written through a farm store's own API (seeded).

Seven nights, one candidate firmware each (``demo 1.0.1`` .. ``1.0.7``); every night each test of
three suites runs three times on a board of its chip, with a lease recorded around it as the
farm does (reservation, per-board outcome, result). Three faults are planted, and the report
must find exactly them:

* a flaky test: ``examples/test_mesh.py::test_mesh_heal`` fails 30 % of its runs on any board;
* a bad board: ``esp32-3`` (a loose USB cable): 35 % of its leases end in a rig fault before the
  test runs (the farm retries the test on another board, as ``--hil-infra-retries 1`` does), and
  half of the health checks after such a fault fail;
* a firmware that broke a test: from ``1.0.5`` on, ``examples/test_ota.py::test_rollback``
  fails every run.

One test also gets slower every night (``test_update_under_loss``, +12 % a night). The others
pass, with durations that vary by a few percent.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from typing import Any

DAY = 86400.0
BOARDS = {"esp32": ["esp32-1", "esp32-2", "esp32-3"], "esp32c3": ["esp32c3-1", "esp32c3-2"]}
TESTS = {  # test id -> (chip, median seconds)
    "examples/test_boot.py::test_boots[esp32]": ("esp32", 4.0),
    "examples/test_boot.py::test_boots[esp32c3]": ("esp32c3", 4.2),
    "examples/test_boot.py::test_version": ("esp32", 3.1),
    "examples/test_mesh.py::test_mesh_forms": ("esp32", 21.0),
    "examples/test_mesh.py::test_mesh_heal": ("esp32", 34.0),
    "examples/test_mesh.py::test_mesh_soak": ("esp32", 60.0),
    "examples/test_ota.py::test_update_confirms": ("esp32c3", 18.0),
    "examples/test_ota.py::test_rollback": ("esp32c3", 22.0),
    "examples/test_ota.py::test_update_under_loss": ("esp32", 40.0),
    "examples/test_ota.py::test_tampered_image_rejected": ("esp32c3", 6.0),
}
FLAKY = "examples/test_mesh.py::test_mesh_heal"
BROKEN = "examples/test_ota.py::test_rollback"
SLOWER = "examples/test_ota.py::test_update_under_loss"
BAD_BOARD = "esp32-3"
BREAKS_AT = 4  # night index of 1.0.5
REPEATS = 3


def firmware(night: int) -> str:
    return hashlib.sha256(f"demo 1.0.{night + 1}".encode()).hexdigest()


@dataclass(frozen=True)
class Week:
    """What was planted, for the test to compare the report with."""

    since: float
    until: float
    flaky: str
    broken: str
    first_bad: str
    last_good: str
    bad_board: str
    slower: str
    results: int


def generate_week(store: Any, *, seed: int = 17, now: float | None = None) -> Week:
    rng = random.Random(seed)
    now = time.time() if now is None else now
    start = now - 7 * DAY
    results = 0
    quarantined: set[str] = set()
    fails_in_row = dict.fromkeys((b for bs in BOARDS.values() for b in bs), 0)
    for night in range(7):
        fw = firmware(night)
        clock = start + night * DAY + 3600.0  # the nightly job starts at 01:00
        for test_id, (chip, seconds) in TESTS.items():
            for _ in range(REPEATS):
                tried: set[str] = set()
                while True:
                    boards = [b for b in BOARDS[chip] if b not in tried | quarantined]
                    if not boards:
                        break
                    board = rng.choice(boards)
                    tried.add(board)
                    lease = f"{rng.getrandbits(128):032x}"
                    owner = {"pid": 4242, "host": "ci-runner-1", "user": "ci", "test_id": test_id,
                             "ci_job": f"GITHUB_RUN_ID={9000 + night}", "worker": "",
                             "reason": ""}
                    store.record_reservation(lease, [board], owner, f"1 x {chip}", clock,
                                             clock + 0.05, 0.05)
                    infra_p = 0.35 if board == BAD_BOARD else 0.01
                    if rng.random() < infra_p:
                        clock += 9.0  # the flash timed out
                        store.record_release(lease, clock, "infra_error", {board: "infra_error"})
                        ok = rng.random() < (0.5 if board == BAD_BOARD else 1.0)
                        if not ok and fails_in_row[board] == 2:
                            ok = True  # keep the demo's board in service (a person reseated it)
                        health = store.record_check(
                            board, ok, "baseline demo booted" if ok else
                            "no boot banner within 15 s (port /dev/ttyUSB2 silent)")
                        fails_in_row[board] = 0 if ok else fails_in_row[board] + 1
                        if health.value == "QUARANTINED":
                            quarantined.add(board)
                        continue  # retried on another board
                    duration = seconds * rng.uniform(0.95, 1.05)
                    if test_id == SLOWER:
                        duration *= 1.12 ** night
                    failed = (test_id == FLAKY and rng.random() < 0.3) or (
                        test_id == BROKEN and night >= BREAKS_AT)
                    outcome = "failed" if failed else "passed"
                    clock += duration
                    store.record_release(lease, clock, "failed" if failed else "ok",
                                         {board: "failed" if failed else "ok"})
                    store.record_result(board, test_id, outcome, duration, fw, at=clock)
                    results += 1
                    break
    return Week(start, now + 1, FLAKY, BROKEN, firmware(BREAKS_AT), firmware(BREAKS_AT - 1),
                BAD_BOARD, SLOWER, results)
