"""The file-based reservation backend: exclusivity, all-or-nothing, fairness, dead holders."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from pytest_hilfarm.errors import InfrastructureError, ReservationTimeout, UsageError
from pytest_hilfarm.reservation import (
    Lease,
    Owner,
    OwnerRecord,
    Policy,
    ReservationBackend,
    Reserver,
    _Flock,
)
from pytest_hilfarm.reservation.allocate import BoardInfo, BoardRequest
from pytest_hilfarm.store import BoardHealth, FarmStore, FarmStoreProtocol

ESP32 = [BoardInfo(f"esp32-{i}", "esp32", frozenset({"mesh-radio"})) for i in (1, 2, 3)]
RACK = [*ESP32, BoardInfo("c3-1", "esp32c3")]
SPAWN = multiprocessing.get_context("spawn")  # never fork a process that may hold flocks


def make(root: Path, boards: list[BoardInfo] = RACK) -> Reserver:
    store = FarmStore(root / "farm.sqlite")
    for board in boards:
        if store.health(board.id).changed_at is None:
            store.set_health(board.id, BoardHealth.GOOD, "test setup")
    return Reserver(boards, root / "locks", store)


def any_esp32(count: int = 1) -> BoardRequest:
    return BoardRequest(count=count, chip="esp32")


def assert_no_overlaps(store: FarmStoreProtocol) -> int:
    """Check from the store's history that no board was ever granted twice at once."""
    history = [r for r in store.history(limit=100_000) if r.granted_at is not None]
    for board in {b for r in history for b in r.boards}:
        spans = sorted((r.granted_at or 0.0, r.released_at or float("inf"))
                       for r in history if board in r.boards)
        for (_, end), (begin, _) in zip(spans, spans[1:]):
            assert begin >= end, f"{board} granted twice at once"
    return len(history)


def expect_timeout(reserver: Reserver, request: BoardRequest, timeout: float) -> None:
    with pytest.raises(ReservationTimeout):
        reserver.reserve(request, timeout=timeout)


class Witness:
    """Proves exclusivity independently of the lock: O_EXCL creation fails on a double hold."""

    def __init__(self, root: Path) -> None:
        self.root = root / "witness"
        self.root.mkdir(exist_ok=True)

    def enter(self, lease: Lease) -> None:
        for board in lease.boards:
            os.close(os.open(self.root / board, os.O_CREAT | os.O_EXCL | os.O_WRONLY))

    def leave(self, lease: Lease) -> None:
        for board in lease.boards:
            os.unlink(self.root / board)


def test_reserver_satisfies_the_backend_protocol(tmp_path: Path) -> None:
    backend: ReservationBackend = make(tmp_path)  # mypy checks the structural match
    assert backend.status()


def test_reserve_and_release_records_history(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    owner = Owner.current(test_id="tests/x.py::t", environ={"GITHUB_RUN_ID": "77"})
    with reserver.reserve(any_esp32(2), owner, timeout=5) as lease:
        assert lease.boards == ("esp32-1", "esp32-2")
        assert lease.needs_check == frozenset()
        record = OwnerRecord.from_json((tmp_path / "locks/esp32-1.owner.json").read_text())
        assert record.lease_id == lease.id and record.owner == owner
        assert record.owner.ci_job == "GITHUB_RUN_ID=77"
    assert lease.released
    assert (tmp_path / "locks/esp32-1.owner.json").read_text() == ""  # released cleanly
    (entry,) = reserver.store.history()
    assert entry.lease_id == lease.id and entry.outcome == "ok"
    assert entry.boards == ("esp32-1", "esp32-2") and entry.owner["test_id"] == "tests/x.py::t"


def test_release_is_idempotent_and_validates_outcomes(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    lease = reserver.reserve(any_esp32(2), timeout=5)
    with pytest.raises(UsageError, match="does not hold"):
        lease.release({"c3-1": "ok"})
    with pytest.raises(UsageError, match="unknown lease outcome"):
        lease.release({"esp32-1": "exploded"})
    assert not lease.released  # a bad call releases nothing
    lease.release({"esp32-1": "infra_error", "esp32-2": "failed"})
    lease.release()  # second call: no effect, no error
    store = reserver.store
    assert store.health("esp32-1").health is BoardHealth.UNKNOWN  # infra fault -> check
    assert store.health("esp32-2").health is BoardHealth.GOOD  # a test failure is not the board's
    (entry,) = store.history()
    assert entry.outcome == "infra_error"
    assert entry.board_outcomes == {"esp32-1": "infra_error", "esp32-2": "failed"}


def test_context_manager_fails_closed(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    with pytest.raises(InfrastructureError):
        with reserver.reserve(any_esp32(), timeout=5):
            raise InfrastructureError("port vanished")
    assert reserver.store.health("esp32-1").health is BoardHealth.UNKNOWN
    with pytest.raises(KeyboardInterrupt):
        with reserver.reserve(BoardRequest(chip="esp32c3"), timeout=5):
            raise KeyboardInterrupt
    assert reserver.store.history()[0].outcome == "aborted"
    assert reserver.store.health("c3-1").health is BoardHealth.UNKNOWN


def test_unknown_boards_are_flagged_for_a_check(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    for board in ("esp32-1", "esp32-2", "esp32-3"):
        reserver.store.set_health(board, BoardHealth.UNKNOWN, "fresh")
    reserver.store.set_health("esp32-3", BoardHealth.GOOD, "checked")
    with reserver.reserve(any_esp32(2), timeout=5) as lease:
        assert lease.boards == ("esp32-3", "esp32-1")  # GOOD first
        assert lease.needs_check == {"esp32-1"}


def test_impossible_request_fails_at_once(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    start = time.monotonic()
    with pytest.raises(UsageError, match="only 3 such board"):
        reserver.reserve(any_esp32(4), timeout=30)
    with pytest.raises(UsageError, match="no esp32s2 board"):
        reserver.reserve(BoardRequest(chip="esp32s2"), timeout=30)
    assert time.monotonic() - start < 1


def test_quarantined_boards_fail_fast_with_a_hint(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    reserver.store.quarantine("c3-1", "burnt regulator")
    with pytest.raises(InfrastructureError, match="board restore") as info:
        reserver.reserve(BoardRequest(chip="esp32c3"), timeout=30)
    assert "c3-1: QUARANTINED" in str(info.value)


def test_two_threads_never_share_a_board(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    held = reserver.reserve(BoardRequest(only=frozenset({"esp32-1"})), timeout=5)
    outcome: list[BaseException] = []

    def other() -> None:
        try:
            reserver.reserve(BoardRequest(only=frozenset({"esp32-1"})), timeout=0.1)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert isinstance(outcome[0], ReservationTimeout)
    held.release()


def test_exclusive_across_threads(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    witness = Witness(tmp_path)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(25):
                lease = reserver.reserve(any_esp32(rng.randint(1, 3)), timeout=20)
                witness.enter(lease)
                time.sleep(rng.uniform(0, 0.002))
                witness.leave(lease)
                lease.release()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert assert_no_overlaps(reserver.store) == 150


def _contend(root: str, seed: int, leases: int) -> None:
    reserver = make(Path(root))
    witness = Witness(Path(root))
    rng = random.Random(seed)
    for n in range(leases):
        lease = reserver.reserve(any_esp32(rng.randint(1, 3)),
                                 Owner.current(test_id=f"p{seed}-{n}"), timeout=30)
        witness.enter(lease)
        time.sleep(rng.uniform(0.001, 0.004))
        witness.leave(lease)
        lease.release()


def test_exclusive_across_processes(tmp_path: Path) -> None:
    make(tmp_path)
    procs = [SPAWN.Process(target=_contend, args=(str(tmp_path), i, 20)) for i in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert assert_no_overlaps(FarmStore(tmp_path / "farm.sqlite")) == 80


def test_all_or_nothing_takes_no_board_while_waiting(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    blocker = reserver.reserve(BoardRequest(only=frozenset({"esp32-3"})), timeout=5)
    probes: list[bool] = []

    def probe_while_waiting() -> None:
        time.sleep(0.1)
        for board in ("esp32-1", "esp32-2"):
            lock = _Flock(tmp_path / "locks" / f"{board}.lock")
            probes.append(lock.try_acquire())
            lock.release()

    thread = threading.Thread(target=probe_while_waiting)
    thread.start()
    with pytest.raises(ReservationTimeout):
        reserver.reserve(any_esp32(3), timeout=0.3)
    thread.join()
    assert probes == [True, True]  # the waiting 3-board request held neither free board
    blocker.release()
    with reserver.reserve(any_esp32(3), timeout=1) as lease:
        assert len(lease.boards) == 3


def test_crossing_multi_board_requests_do_not_deadlock(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    pairs = [("esp32-1", "esp32-2"), ("esp32-2", "esp32-3"), ("esp32-3", "esp32-1")]
    done: list[int] = []

    def worker(pair: tuple[str, str]) -> None:
        for _ in range(30):
            with reserver.reserve(BoardRequest(count=2, only=frozenset(pair)), timeout=20):
                time.sleep(0.0005)
        done.append(1)

    threads = [threading.Thread(target=worker, args=(p,)) for p in pairs * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(done) == 6
    assert_no_overlaps(reserver.store)


def test_competing_requests_are_served_in_arrival_order(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    everything = reserver.reserve(any_esp32(3), timeout=5)
    granted: list[str] = []

    def ask(name: str, count: int) -> None:
        with reserver.reserve(any_esp32(count), timeout=10):
            granted.append(name)
            time.sleep(0.02)

    big = threading.Thread(target=ask, args=("big", 3))
    big.start()
    time.sleep(0.1)  # "big" is queued first
    small = [threading.Thread(target=ask, args=(f"small{i}", 1)) for i in range(3)]
    for thread in small:
        thread.start()
        time.sleep(0.02)
    everything.release()
    for thread in [big, *small]:
        thread.join(20)
    assert granted[0] == "big"
    assert sorted(granted[1:]) == ["small0", "small1", "small2"]


def test_younger_small_request_does_not_overtake_a_waiting_big_one(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    small = [reserver.reserve(BoardRequest(only=frozenset({b})), timeout=5)
             for b in ("esp32-1", "esp32-2", "esp32-3")]
    big = threading.Thread(target=lambda: reserver.reserve(any_esp32(3), timeout=5).release())
    big.start()
    time.sleep(0.1)  # the big request is queued
    small[0].release()  # esp32-1 is free, but the big request, older, needs it
    with pytest.raises(ReservationTimeout, match=r"queued ahead \(#\d+\): 3 x esp32"):
        reserver.reserve(any_esp32(1), timeout=0.2)
    small[1].release()
    small[2].release()
    big.join(5)
    assert not big.is_alive()
    granted = [r for r in reserver.store.history() if r.request == "3 x esp32 board(s)"]
    assert granted[0].granted_at is not None and granted[0].outcome == "ok"


def test_non_competing_requests_do_not_wait_behind_the_queue(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    blocker = reserver.reserve(any_esp32(1), timeout=5)
    waiting = threading.Thread(target=expect_timeout, args=(reserver, any_esp32(3), 0.5))
    waiting.start()
    time.sleep(0.1)
    start = time.monotonic()
    with reserver.reserve(BoardRequest(chip="esp32c3"), timeout=0.2) as lease:
        assert lease.boards == ("c3-1",)
    assert time.monotonic() - start < 0.15
    waiting.join()
    blocker.release()


def _stream_of_small_requests(root: str, seed: int, stop: object) -> None:
    # Two streams per process: with six streams over three boards, every board is busy almost
    # all the time, so a 3-board request only gets in if the queue keeps boards for it.
    # No stagger: the small requests grab a free board as fast as they can.
    reserver = make(Path(root))
    reserver.stagger_step = 0.0

    def stream(rng: random.Random) -> None:
        while not stop.is_set():  # type: ignore[attr-defined]
            with reserver.reserve(any_esp32(1), timeout=30):
                time.sleep(rng.uniform(0.005, 0.015))

    threads = [threading.Thread(target=stream, args=(random.Random(seed * 10 + i),))
               for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_big_request_is_not_starved_by_a_stream_of_small_ones(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    stop = SPAWN.Event()
    procs = [
        SPAWN.Process(target=_stream_of_small_requests, args=(str(tmp_path), i, stop))
        for i in range(3)
    ]
    for proc in procs:
        proc.start()
    # Wait until the stream really runs (spawned interpreters take a moment to start).
    deadline = time.time() + 3
    while len(reserver.store.history(limit=20)) < 10 and time.time() < deadline:
        time.sleep(0.02)
    assert len(reserver.store.history(limit=20)) >= 10, "the stream did not start"
    waits = []
    try:
        for _ in range(5):
            lease = reserver.reserve(any_esp32(3), timeout=3)
            waits.append(lease.waited)
            lease.release()
            time.sleep(0.05)
    finally:
        stop.set()
        for proc in procs:
            proc.join(30)
    assert [p.exitcode for p in procs] == [0] * 3
    # Served in arrival order: it waits only for the few small requests queued before it
    # (typically 30 ms here); the bound is loose for a loaded 2-core CI box.
    assert max(waits) < 1.0, waits
    assert_no_overlaps(reserver.store)


def test_timeout_says_what_was_asked_and_who_holds_what(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    holder = Owner.current(test_id="tests/test_mesh.py::test_join",
                           environ={"CI_JOB_ID": "4242", "PYTEST_XDIST_WORKER": "gw1"})
    lease = reserver.reserve(any_esp32(2), holder, timeout=5)
    reserver.hold("esp32-3", reason="scope on UART0", person="alice")
    asker = Owner.current(test_id="tests/test_big.py::test_all")
    with pytest.raises(ReservationTimeout) as info:
        reserver.reserve(BoardRequest(count=3, chip="esp32",
                                      features=frozenset({"mesh-radio"})), asker, timeout=0.2)
    text = str(info.value)
    assert "3 x esp32 board(s) with features {mesh-radio}" in text
    assert "within 0.2 s" in text
    assert "tests/test_big.py::test_all" in text
    for board in ("esp32-1", "esp32-2"):
        assert f"{board}: held by pid {os.getpid()}" in text
    assert "test tests/test_mesh.py::test_join" in text
    assert "CI job CI_JOB_ID=4242" in text and "xdist gw1" in text
    assert "since 20" in text  # ISO time of the grant
    assert "esp32-3: held at the bench by alice" in text and "scope on UART0" in text
    assert "hilfarm status" in text
    assert reserver.store.history()[0].outcome == "timeout"
    lease.release()


def _hold_and_wait(root: str, boards: int, ready: object) -> None:
    reserver = make(Path(root))
    reserver.reserve(any_esp32(boards), Owner.current(test_id="doomed"), timeout=10)
    ready.set()  # type: ignore[attr-defined]
    time.sleep(60)


def test_sigkilled_holder_frees_its_boards_which_become_unknown(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    ready = SPAWN.Event()
    proc = SPAWN.Process(target=_hold_and_wait, args=(str(tmp_path), 2, ready))
    proc.start()
    assert ready.wait(30)
    status = {s.board: s for s in reserver.status()}
    assert status["esp32-1"].holder is not None
    assert status["esp32-1"].holder.owner.test_id == "doomed"
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    status = {s.board: s for s in reserver.status()}
    assert status["esp32-1"].holder is None and status["esp32-1"].stale_owner is not None
    start = time.monotonic()
    lease = reserver.reserve(any_esp32(3), timeout=2)
    assert time.monotonic() - start < 0.5  # freed by the kernel at once, not by a lock's age
    assert lease.needs_check == {"esp32-1", "esp32-2"}
    store = reserver.store
    assert store.health("esp32-1").health is BoardHealth.UNKNOWN
    assert "died" in store.health("esp32-1").reason
    assert store.health("esp32-3").health is BoardHealth.GOOD
    dead = [r for r in store.history() if r.owner.get("test_id") == "doomed"]
    assert dead[0].outcome == "holder_died"
    assert dead[0].released_at is not None and dead[0].released_at <= lease.granted_at
    lease.release()
    assert_no_overlaps(store)


def _wait_for_three(root: str) -> None:
    make(Path(root)).reserve(any_esp32(3), timeout=60)


def test_a_dead_waiter_does_not_block_the_queue(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    blocker = reserver.reserve(any_esp32(1), timeout=5)
    proc = SPAWN.Process(target=_wait_for_three, args=(str(tmp_path),))
    proc.start()
    deadline = time.time() + 20
    while not list((tmp_path / "locks/queue").glob("*.ticket")) and time.time() < deadline:
        time.sleep(0.01)
    # While it waits, it keeps the free boards for itself: a 1-board request must queue.
    with pytest.raises(ReservationTimeout, match="queued ahead"):
        reserver.reserve(any_esp32(1), timeout=0.1)
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    with reserver.reserve(any_esp32(1), timeout=0.5) as lease:
        assert lease.boards == ("esp32-2",)
    assert not list((tmp_path / "locks/queue").glob("*.ticket"))  # cleaned up
    blocker.release()


def _hold_from_cli(root: str) -> None:
    result = make(Path(root)).hold("esp32-1", reason="reflow", person="bob")
    assert result.in_use_by is None


def test_manual_hold_persists_blocks_and_unhold_frees(tmp_path: Path) -> None:
    # The hold is taken by a process that then exits, like `hilfarm lock esp32-1`.
    proc = SPAWN.Process(target=_hold_from_cli, args=(str(tmp_path),))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    reserver = make(tmp_path)
    with pytest.raises(ReservationTimeout, match="held at the bench by bob"):
        reserver.reserve(BoardRequest(only=frozenset({"esp32-1"})), timeout=0.2)
    with reserver.reserve(any_esp32(2), timeout=1) as lease:
        assert "esp32-1" not in lease.boards
    status = {s.board: s for s in reserver.status()}
    assert status["esp32-1"].hold is not None and status["esp32-1"].hold.reason == "reflow"
    assert reserver.unhold("esp32-1") is not None
    with reserver.reserve(BoardRequest(only=frozenset({"esp32-1"})), timeout=1):
        pass


def test_the_person_holding_a_board_may_reserve_it(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    reserver.hold("esp32-1", reason="debugging", person="erin")
    only_1 = BoardRequest(only=frozenset({"esp32-1"}))
    with pytest.raises(ReservationTimeout):
        reserver.reserve(only_1, timeout=0.1, as_person="frank")
    with reserver.reserve(only_1, timeout=1, as_person="erin") as lease:
        assert lease.boards == ("esp32-1",)
    assert reserver.store.holds()["esp32-1"].person == "erin"  # the hold outlives the lease


def test_hold_of_a_board_in_use_names_the_lease(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    with reserver.reserve(BoardRequest(only=frozenset({"esp32-2"})),
                          Owner.current(test_id="busy"), timeout=5):
        result = reserver.hold("esp32-2", reason="scope", person="carol")
        assert result.in_use_by is not None and result.in_use_by.owner.test_id == "busy"
    with pytest.raises(ReservationTimeout):
        reserver.reserve(BoardRequest(only=frozenset({"esp32-2"})), timeout=0.1)
    with pytest.raises(UsageError, match="needs a reason"):
        reserver.hold("esp32-1", reason=" ", person="carol")
    with pytest.raises(UsageError, match="no board named"):
        reserver.hold("esp32-9", reason="x", person="carol")


def test_a_waiter_for_a_held_board_does_not_block_others(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    reserver.hold("esp32-3", reason="bench work", person="dave")
    waiter = threading.Thread(target=expect_timeout, args=(reserver, any_esp32(3), 0.6))
    waiter.start()
    time.sleep(0.1)
    # The 3-board request waits on a person; it must not keep esp32-1/2 from others meanwhile.
    with reserver.reserve(any_esp32(1), timeout=0.2):
        pass
    waiter.join()


def test_bad_board_ids_are_rejected(tmp_path: Path) -> None:
    store = FarmStore(tmp_path / "farm.sqlite")
    with pytest.raises(UsageError, match="cannot name a lock file"):
        Reserver([BoardInfo("../etc", "esp32")], tmp_path / "locks", store)
    with pytest.raises(UsageError, match="appears twice"):
        Reserver([BoardInfo("a", "esp32"), BoardInfo("a", "esp32")], tmp_path / "locks", store)


# --- the candidate's chips (issue: a build for one chip must get a board it runs on) ----------


def test_request_without_chip_takes_only_the_candidates_chips(tmp_path: Path) -> None:
    # c3-1 would come first by health and name if chips did not filter (it has no features).
    reserver = make(tmp_path)
    with reserver.reserve(BoardRequest(1, chips=frozenset({"esp32c3"})), timeout=1) as lease:
        assert lease.boards == ("c3-1",)
    with reserver.reserve(BoardRequest(3, chips=frozenset({"esp32"})), timeout=1) as lease:
        assert sorted(lease.boards) == ["esp32-1", "esp32-2", "esp32-3"]
    with pytest.raises(UsageError, match="no esp32s2 board"):
        reserver.reserve(BoardRequest(1, chips=frozenset({"esp32s2"})), timeout=0)


def test_waiting_ticket_keeps_its_chips(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    got: list[tuple[str, ...]] = []
    with reserver.reserve(BoardRequest(1, chip="esp32c3"), timeout=1):
        waiter = threading.Thread(target=lambda: got.append(
            reserver.reserve(BoardRequest(1, chips=frozenset({"esp32c3"})), timeout=10).boards))
        waiter.start()
        time.sleep(0.3)  # it waits in the queue: the esp32 boards are free but not its chip
        assert not got
    waiter.join(10)
    assert got == [("c3-1",)]


def test_interrupted_lease_says_why_who_and_when(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    owner = Owner.current("tests/t.py::test_x")
    lease = reserver.reserve(BoardRequest(1, chip="esp32c3"), owner, timeout=1)
    lease.release(default="aborted", note="SIGINT (Ctrl-C)")
    state = reserver.store.health("c3-1")
    assert state.health is BoardHealth.UNKNOWN
    assert state.reason.startswith("health check due: interrupted (SIGINT (Ctrl-C))")
    assert f"pid {os.getpid()}" in state.reason and "tests/t.py::test_x" in state.reason
    assert "released at 20" in state.reason


# --- the scheduler on real locks: backfill, priorities, wake-ups, the queue view ---------------


def _history(store: FarmStoreProtocol, test_id: str, hold: float, times: int = 5) -> None:
    """Record ``times`` past leases of ``test_id`` that each lasted ``hold`` seconds."""
    now = time.time() - 7200
    for n in range(times):
        lease_id = f"past-{test_id}-{n}"
        store.record_reservation(lease_id, (), Owner.current(test_id).to_dict(),
                                 "1 x esp32 board(s)", now, now, 0.0)
        store.record_release(lease_id, now + hold, "ok")
        now += hold + 1


def _queued(root: Path, count: int, reserver: Reserver | None = None) -> None:
    """Wait until ``count`` requests queue (with ``reserver``: until its queue lists them, as a
    ticket file is only listed once its waiter has locked it)."""
    deadline = time.time() + 10
    while (len(reserver.queue()) if reserver is not None
           else len(list((root / "locks/queue").glob("*.ticket")))) < count:
        assert time.time() < deadline, "the request did not queue"
        time.sleep(0.005)


def test_a_short_test_with_history_backfills_while_a_big_request_waits(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    _history(reserver.store, "t::long", 600.0)
    _history(reserver.store, "t::short", 0.05)
    assert reserver.expected_hold("t::short") == pytest.approx(0.05)
    blocker = reserver.reserve(BoardRequest(only=frozenset({"esp32-1"})),
                               Owner.current("t::long"), timeout=5)
    big: list[Lease] = []
    waiter = threading.Thread(target=lambda: big.append(reserver.reserve(any_esp32(3),
                                                                         timeout=10)))
    waiter.start()
    _queued(tmp_path, 1)
    # The big request cannot start before t::long ends (expected in ten minutes): a 50 ms test
    # may use a free board meanwhile. Strict arrival order would make it wait.
    with reserver.reserve(any_esp32(1), Owner.current("t::short"), timeout=0.5) as short:
        assert short.boards == ("esp32-2",)
    # A test without history is not trusted to be short: it waits behind the big request.
    with pytest.raises(ReservationTimeout, match="queued ahead"):
        reserver.reserve(any_esp32(1), Owner.current("t::new"), timeout=0.2)
    blocker.release()
    waiter.join(10)
    assert big and len(big[0].boards) == 3
    big[0].release()
    assert_no_overlaps(reserver.store)


def test_fifo_policy_keeps_the_old_arrival_order(tmp_path: Path) -> None:
    store = FarmStore(tmp_path / "farm.sqlite")
    reserver = Reserver(RACK, tmp_path / "locks", store, policy=Policy(backfill=False))
    _history(store, "t::long", 600.0)
    _history(store, "t::short", 0.05)
    blocker = reserver.reserve(BoardRequest(only=frozenset({"esp32-1"})),
                               Owner.current("t::long"), timeout=5)
    waiter = threading.Thread(target=expect_timeout, args=(reserver, any_esp32(3), 1.0))
    waiter.start()
    _queued(tmp_path, 1)
    with pytest.raises(ReservationTimeout):
        reserver.reserve(any_esp32(1), Owner.current("t::short"), timeout=0.2)
    waiter.join()
    blocker.release()


def test_higher_priority_is_served_first_and_ageing_lets_low_priority_run(
        tmp_path: Path) -> None:
    store = FarmStore(tmp_path / "farm.sqlite")
    for board in RACK:
        store.set_health(board.id, BoardHealth.GOOD, "test setup")
    reserver = Reserver(RACK, tmp_path / "locks", store, policy=Policy(ageing=0.5))
    c3 = BoardRequest(chip="esp32c3")
    order: list[str] = []

    def ask(name: str, priority: int) -> None:
        with reserver.reserve(c3, Owner.current(name), timeout=10, priority=priority):
            order.append(name)

    held = reserver.reserve(c3, timeout=1)
    nightly = threading.Thread(target=ask, args=("nightly", -1))
    nightly.start()
    _queued(tmp_path, 1, reserver)
    pr = threading.Thread(target=ask, args=("pr", 5))
    pr.start()
    _queued(tmp_path, 2, reserver)
    entries = reserver.queue()
    assert [(e.position, e.priority) for e in entries] == [(1, 5), (2, -1)]
    assert "pr" in entries[0].owner and entries[0].expected_start is not None
    held.release()
    pr.join(10)
    nightly.join(10)
    assert order == ["pr", "nightly"]
    # Ageing: after waiting 3 steps (1.5 s), priority -1 counts as 2 and beats a fresh 1.
    held = reserver.reserve(c3, timeout=1)
    order.clear()
    nightly = threading.Thread(target=ask, args=("nightly", -1))
    nightly.start()
    _queued(tmp_path, 1, reserver)
    time.sleep(1.6)
    pr = threading.Thread(target=ask, args=("pr", 1))
    pr.start()
    _queued(tmp_path, 2, reserver)
    assert [e.effective_priority for e in reserver.queue()] == [2, 1]
    held.release()
    pr.join(10)
    nightly.join(10)
    assert order == ["nightly", "pr"]


def test_waiters_sleep_until_an_event_instead_of_polling(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    reserver.safety_recheck = 60.0
    decisions = [0]
    decide_once = reserver._decide

    def counted(*args: object, **kwargs: object) -> object:
        decisions[0] += 1
        return decide_once(*args, **kwargs)  # type: ignore[arg-type]

    reserver._decide = counted  # type: ignore[method-assign]
    blocker = reserver.reserve(BoardRequest(chip="esp32c3"), timeout=1)
    got: list[Lease] = []
    waiter = threading.Thread(target=lambda: got.append(
        reserver.reserve(BoardRequest(chip="esp32c3"), timeout=30)))
    waiter.start()
    _queued(tmp_path, 1)
    time.sleep(1.0)
    # One decision to queue (a periodic recheck every 50 ms would have made about 20).
    assert decisions[0] <= 2, decisions
    released = time.monotonic()
    blocker.release()
    waiter.join(5)
    assert got and time.monotonic() - released < 0.5
    got[0].release()


def _hold_c3_until_killed(root: str, ready: object) -> None:
    make(Path(root)).reserve(BoardRequest(chip="esp32c3"), Owner.current(test_id="doomed"),
                             timeout=10)
    ready.set()  # type: ignore[attr-defined]
    time.sleep(60)


def test_a_waiter_notices_a_sigkilled_holder_at_once(tmp_path: Path) -> None:
    reserver = make(tmp_path)
    reserver.safety_recheck = 60.0
    ready = SPAWN.Event()
    proc = SPAWN.Process(target=_hold_c3_until_killed, args=(str(tmp_path), ready))
    proc.start()
    assert ready.wait(30)
    got: list[Lease] = []
    waiter = threading.Thread(target=lambda: got.append(
        reserver.reserve(BoardRequest(chip="esp32c3"), timeout=30)))
    waiter.start()
    _queued(tmp_path, 1)
    assert proc.pid is not None
    killed = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    waiter.join(10)
    assert got and time.monotonic() - killed < 1.0  # the kernel's close woke it
    assert got[0].needs_check == {"c3-1"}
    got[0].release()
    proc.join(10)
    assert_no_overlaps(reserver.store)
