"""The farm: open a rack, reserve boards, hand out prepared sessions and devices, report status.

Usable without pytest: ``Farm.open(rack)`` then ``with farm.session(count=2, firmware=...) as s``.
It wires rack records to drivers (ports, power, reset, console) and keeps each board's health in
the farm store; it never imports the virtual rack's code (a virtual board is reached through its
port URL and the control endpoint, and the daemon is started as a separate process).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pytest_hilfarm.board.console import Console
from pytest_hilfarm.board.device import Device
from pytest_hilfarm.board.wiring import BoardWiring, LocalWiring, RemoteWiring, VirtualRack
from pytest_hilfarm.description.rack import (
    BoardSpec,
    RackSpec,
    builtin_virtual_rack_path,
    load_rack,
    registered_board,
)
from pytest_hilfarm.description.settings import ImageSpec
from pytest_hilfarm.drivers.flashing import FlashPlan, FlashReport
from pytest_hilfarm.drivers.transports import find_usb
from pytest_hilfarm.drivers.virtual import ControlClient
from pytest_hilfarm.errors import (
    HilfarmError,
    ImageError,
    PortError,
)
from pytest_hilfarm.farm import prepare
from pytest_hilfarm.farm.candidate import Candidate, resolve_candidate
from pytest_hilfarm.farm.session import BoardFault, HilSession, PreparedBoard
from pytest_hilfarm.reservation import LeaseProtocol, Owner, ReservationBackend, Reserver
from pytest_hilfarm.reservation.allocate import BoardInfo, BoardRequest, can_ever_satisfy
from pytest_hilfarm.store import (
    BoardHealth,
    FarmStore,
    FarmStoreProtocol,
    LeaseOutcome,
    check_due_reason,
)


def _chips_words(chips: Iterable[str]) -> str:
    names = sorted(chips)
    return names[0] + " only" if len(names) == 1 else ", ".join(names)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:150] or "session"


class Farm:
    """A rack's boards: reservation, preparation, health, release.

    ``store`` and ``reserver`` default to the single-host backends (SQLite + file locks) in the
    rack's state and lock directories.
    """

    def __init__(self, rack: RackSpec, *, log_root: Path | None = None,
                 store: FarmStoreProtocol | None = None,
                 reserver: ReservationBackend | None = None,
                 start_virtual: bool = True, baseline: ImageSpec | None = None,
                 remote_boards: Sequence[BoardSpec] = ()) -> None:
        self.rack = rack
        self.baseline_override = baseline  # --hil-baseline beats the rack file's baselines
        # Boards of this rack file, plus (multi-host) boards rig hosts registered elsewhere.
        self.boards: tuple[BoardSpec, ...] = tuple(rack.boards) + tuple(remote_boards)
        self._remote = frozenset(b.id for b in remote_boards)
        self.log_root = Path(log_root) if log_root else Path.cwd() / "hilfarm-logs"
        self.store = store or FarmStore(rack.state_dir / "farm.db")
        self.reserver = reserver or Reserver(self.boards, rack.lock_dir, self.store)
        self.virtual = VirtualRack(rack, start=start_virtual, boards=self.boards)
        self._health_changes: list[str] = []
        self._changes_lock = threading.Lock()

    @classmethod
    def open(cls, rack: RackSpec | Path | str | None = None, **kwargs: Any) -> Farm:
        """Load a rack file (default: the built-in virtual rack) and open its farm.

        A ``backend: postgresql://...`` in the rack file (or ``HILFARM_DATABASE_URL``) puts
        reservations, health and history in PostgreSQL, shared by every host, and adds the
        boards that rig hosts (``hilfarm export``) registered there.
        """
        if not isinstance(rack, RackSpec):
            rack = load_rack(rack or builtin_virtual_rack_path())
        url = rack.backend or os.environ.get("HILFARM_DATABASE_URL")
        if url and "store" not in kwargs and "reserver" not in kwargs:
            from pytest_hilfarm.farm.backends import is_database_url, open_backend
            from pytest_hilfarm.reservation.postgresql import PgReserver

            if is_database_url(url):
                store, reserver = open_backend(url, rack)
                local = {b.id for b in rack.boards}
                remote = [registered_board(r) for r in store.registered_boards().values()
                          if r.host and r.board not in local]
                if remote:
                    reserver = PgReserver(url, store, boards=(*rack.boards, *remote))
                kwargs.update(store=store, reserver=reserver, remote_boards=remote)
        return cls(rack, **kwargs)

    def board(self, board_id: str) -> BoardSpec:
        """A board of this farm by id (with a did-you-mean from the rack file on a typo)."""
        for b in self.boards:
            if b.id == board_id:
                return b
        return self.rack.board(board_id)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Farm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the virtual rack ---------------------------------------------------------------------

    def virtual_info(self) -> dict[str, Any]:
        """The running virtual rack daemon's description, started on demand."""
        return self.virtual.info()

    def control(self) -> ControlClient:
        """The virtual rack's control endpoint (power, reset lines, radio, eFuses)."""
        return self.virtual.control()

    # -- wiring rack records to drivers -------------------------------------------------------

    def wiring(self, board: BoardSpec) -> BoardWiring:
        """The board's port, console opener, power, reset and flasher (local or remote)."""
        if board.id in self._remote:
            return RemoteWiring.registered(board, self.store)
        return LocalWiring(board, self.virtual)

    def port_of(self, board: BoardSpec) -> str:
        """Where esptool and the console open this board, resolved now."""
        return self.wiring(board).port()

    def open_device(self, board_id: str, *, log_path: Path | None = None,
                    boot_timeout: float = 15.0) -> Device:
        """A Device for a board the caller holds (its console opened, nothing reset)."""
        board = self.board(board_id)
        wiring = self.wiring(board)
        port = wiring.port()
        log_path = log_path or self.log_root / "manual" / f"{board.id}.log"
        console = Console(wiring.open_console_port, log_path, name=board.id)
        return Device(
            id=board.id,
            chip=board.chip,
            port=port,
            console=console,
            reset=wiring.reset(lambda: console.port),
            power=wiring.power(),
            mac=wiring.mac(),
            resolve_port=wiring.resolver(),
            flasher=self._recording_flasher(board.id, wiring.flasher()),
            boot_timeout=boot_timeout,
            flash_baud=board.flash.baud,
        )

    def _recording_flasher(self, board_id: str, flash_fn: Any) -> Any:
        """Flash through ``flash_fn``, keeping the store's per-region digests up to date."""

        def flasher(port: str, chip: str, plan: FlashPlan, **kwargs: Any) -> FlashReport:
            try:
                report: FlashReport = flash_fn(port, chip, plan, **kwargs)
            except ImageError:
                raise  # refused before anything was written: the board holds what it held
            except BaseException:
                self.store.forget_flash(board_id)  # a failed flash leaves regions unknown
                raise
            self.store.forget_flash(board_id)  # the digests below are the whole known state
            for region in report.regions:
                self.store.record_flash(board_id, region.offset, region.sha256, region.size)
            return report

        return flasher

    # -- requests -----------------------------------------------------------------------------

    def unsatisfiable(self, count: int = 1, *, chip: str | None = None,
                      features: Iterable[str] = (),
                      candidate: Candidate | None = None) -> str | None:
        """Why the rack can never give these boards (None if it can).

        With a ``candidate``, only boards of the chips it was built for count: a request that
        names no chip means "any chip the candidate firmware exists for".
        """
        boards = [BoardInfo.of(b) for b in self.boards]
        if candidate is not None and chip is not None and chip not in candidate.chips:
            return (f"this test asks for {chip} boards, but the candidate firmware "
                    f"({candidate.source}) is built for {_chips_words(candidate.chips)}")
        request = self.request_for(count, chip=chip, features=features, candidate=candidate)
        feasible = can_ever_satisfy(boards, request)
        if feasible:
            return None
        reason = f"rack {self.rack.name!r}: {feasible.reason}"
        if candidate is not None and chip is None and can_ever_satisfy(
            boards, BoardRequest(count, None, frozenset(features))
        ):
            have = ", ".join(sorted({b.chip for b in self.boards}))
            reason = (f"rack {self.rack.name!r}: the candidate firmware ({candidate.source}) is "
                      f"built for {_chips_words(candidate.chips)}, and the rack has no board it "
                      f"can run on for {request.describe()} (the rack's chips: {have})")
        return reason

    def request_for(self, count: int = 1, *, chip: str | None = None,
                    features: Iterable[str] = (), candidate: Candidate | None = None,
                    only: Iterable[str] | None = None) -> BoardRequest:
        """The board request for a test: a chip, else the chips the candidate was built for."""
        chips = candidate.chips if candidate is not None and chip is None else None
        return BoardRequest(count, chip, frozenset(features),
                            only=None if only is None else frozenset(only), chips=chips)

    def candidate(self, firmware: object, *, source: str = "firmware argument"
                  ) -> Candidate | None:
        """Resolve and check candidate firmware once (see :mod:`pytest_hilfarm.farm.candidate`)."""
        return resolve_candidate(firmware, source=source)

    def present(self, board: BoardSpec) -> bool:
        """Whether a board's adapter is plugged in now (virtual and URL boards always are)."""
        kind, value = board.port.kind, board.port.value
        try:
            if kind == "usb_serial":
                return find_usb(serial=value) is not None
            if kind == "usb_path":
                return find_usb(path=value) is not None
        except PortError:
            return True  # ambiguous, not gone: let opening the port say what is wrong
        if kind == "path":
            return os.path.exists(value)
        return True

    def reserve(self, count: int = 1, *, chip: str | None = None,
                features: Iterable[str] = (), timeout: float = 300.0, test_id: str = "",
                reason: str = "", exclude: Iterable[str] = (),
                only: Iterable[str] | None = None,
                chips: Iterable[str] | None = None, priority: int = 0) -> LeaseProtocol:
        """Reserve ``count`` distinct boards exclusively (across threads, processes, CI jobs).

        ``chips`` limits a request without ``chip`` to those chips (the chips the candidate
        firmware was built for). Boards whose USB adapter is unplugged right now are not offered.
        ``priority``: higher is served first while requests wait (``--hil-priority``).
        """
        gone = {b.id for b in self.boards if not self.present(b)}
        excluded = set(exclude) | gone
        allowed = {b.id for b in self.boards} if only is None else set(only)
        chip_set = None if chips is None else frozenset(chips)
        if gone:
            wanted = BoardRequest(count, chip, frozenset(features), chips=chip_set)
            usable = [b for b in self.boards if b.id in allowed - excluded]
            if not can_ever_satisfy([BoardInfo.of(b) for b in usable], wanted):
                matching = [b for b in self.boards
                            if b.id in allowed and wanted.matches(BoardInfo.of(b))]
                ready = [b.id for b in matching if b.id not in excluded]
                unplugged = [f"{b.id} is unplugged (no port {self._port_words(b)})"
                             for b in matching if b.id in gone]
                left = (f"only {', '.join(ready)} {'is' if len(ready) == 1 else 'are'} left"
                        if ready else "no other such board is plugged in")
                raise PortError(
                    f"not enough boards plugged in for {wanted.describe()}: "
                    + "; ".join(unplugged or [f"{', '.join(sorted(gone))} unplugged"])
                    + f"; {left}",
                    where=str(self.rack.source),
                    hint="plug the board(s) back in; `hilfarm discover` lists what is attached",
                )
        request = BoardRequest(
            count, chip, frozenset(features),
            only=frozenset(allowed - excluded) if (excluded or only is not None) else None,
            chips=chip_set,
        )
        return self.reserver.reserve(request, Owner.current(test_id, reason), timeout,
                                     priority=priority)

    @staticmethod
    def _port_words(board: BoardSpec) -> str:
        kind, value = board.port.kind, board.port.value
        if kind == "usb_serial":
            return f"with USB serial {value}"
        if kind == "usb_path":
            return f"at USB path {value}"
        return value

    # -- preparation (farm/prepare.py) ------------------------------------------------------

    def baseline_of(self, board: BoardSpec) -> Path | None:
        """The known-good image a health check flashes onto this board, if any."""
        return prepare.baseline_of(self, board)

    def health_check(self, device: Device, *, reason: str = "") -> BoardHealth:
        """Power-cycle, flash the baseline (skipping identical regions), check that it boots."""
        return prepare.health_check(self, device, reason=reason)

    def prepare_board(self, board_id: str, *, firmware: object, needs_check: bool,
                      boot_timeout: float, log_path: Path) -> PreparedBoard:
        """Bring one reserved board to a known state and start the candidate firmware."""
        return prepare.prepare_board(self, board_id, firmware=firmware, needs_check=needs_check,
                                     boot_timeout=boot_timeout, log_path=log_path)

    def note_health_change(self, text: str) -> None:
        with self._changes_lock:
            self._health_changes.append(text)

    def health_changes(self) -> list[str]:
        with self._changes_lock:
            return list(self._health_changes)

    def start_session(self, count: int = 1, *, chip: str | None = None,
                      features: Iterable[str] = (), firmware: object = None,
                      timeout: float = 300.0, boot_timeout: float = 15.0, test_id: str = "",
                      exclude: Iterable[str] = (), priority: int = 0) -> HilSession:
        """Reserve, prepare (in parallel) and return the session; release with ``finish``.

        ``firmware`` is a :class:`Candidate` or anything :meth:`candidate` resolves (an image,
        a build directory, ``{chip: path}``...). Without ``chip`` only boards of the chips the
        candidate was built for are reserved.
        """
        candidate = self.candidate(firmware)
        if candidate is not None and chip is not None and chip not in candidate.chips:
            candidate.require(chip, where=f"request for {count} x {chip} board(s)")
        lease = self.reserve(count, chip=chip, features=features, timeout=timeout,
                             test_id=test_id, exclude=exclude,
                             chips=candidate.chips if candidate is not None and chip is None
                             else None, priority=priority)
        log_dir = self.log_root / _safe_name(test_id or lease.id)
        prepared: list[PreparedBoard] = []
        errors: list[BaseException] = []
        try:
            with ThreadPoolExecutor(max_workers=len(lease.boards)) as pool:
                futures = [
                    pool.submit(
                        self.prepare_board, board_id, firmware=candidate,
                        needs_check=board_id in lease.needs_check, boot_timeout=boot_timeout,
                        log_path=log_dir / f"{board_id}.log",
                    )
                    for board_id in lease.boards
                ]
                for fut in futures:
                    try:
                        prepared.append(fut.result())
                    except BaseException as exc:  # noqa: BLE001 - collected, re-raised below
                        errors.append(exc)
        except BaseException:
            lease.release(default=LeaseOutcome.ABORTED)
            raise
        if errors:
            for p in prepared:
                p.device.console.close()
            faulty = {b for e in errors if isinstance(e, BoardFault) for b in e.board_ids}
            outcomes = {b: (LeaseOutcome.INFRA_ERROR if b in faulty else LeaseOutcome.OK)
                        for b in lease.boards}
            lease.release(outcomes)
            first = errors[0]
            if len(errors) > 1 and isinstance(first, HilfarmError):
                raise BoardFault(
                    "; ".join(str(e).splitlines()[0] for e in errors),
                    board_ids=sorted(faulty),
                ) from first
            raise first
        return HilSession(self, lease, prepared, test_id, candidate=candidate)

    @contextmanager
    def session(self, count: int = 1, **kwargs: Any) -> Iterator[HilSession]:
        """``with farm.session(2, firmware=path) as s: s.devices[0].command("version")``."""
        s = self.start_session(count, **kwargs)
        with s:
            yield s

    # -- status -------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """Every board with chip, health, holder and since, last flashed firmware.

        ``check_due`` is True for a board that gets a health check before its next use (not
        GOOD, or left by a holder that was killed: the kernel freed its lock but the next
        reserver has not seen it yet); ``reason`` says why, who held it and when.
        """
        rows = []
        hosts: dict[str, Any] = {}
        host_status = getattr(self.reserver, "host_status", None)
        if host_status is not None:  # multi-host: which rig host, and is it online
            hosts = {r.status.board: r for r in host_status()}
        for st in self.reserver.status():
            holder = st.holder.owner.describe() if st.holder else None
            since = st.holder.since if st.holder else None
            if st.hold is not None:
                holder = f"{st.hold.person} (bench hold: {st.hold.reason})"
                since = getattr(st.hold, "since", None)
            fw = self.store.flashed_digest(st.board, 0x10000)
            health = st.health.health
            reason = st.health.reason
            if st.stale_owner is not None and st.holder is None:
                # Killed (SIGKILL, OOM, power loss): nobody released it, so whatever the store
                # last said, the board waits for a health check.
                health = BoardHealth.UNKNOWN if health is BoardHealth.GOOD else health
                reason = check_due_reason(
                    LeaseOutcome.HOLDER_DIED, holder=st.stale_owner.owner.describe(),
                    since=st.stale_owner.since)
            rows.append({
                "board": st.board,
                "chip": st.chip,
                "health": health.value,
                "check_due": health in (BoardHealth.UNKNOWN, BoardHealth.BAD),
                "failures": st.health.failures,
                "reason": reason,
                "holder": holder,
                "since": since,
                "firmware": fw.digest[:12] if fw else None,
            })
            remote = hosts.get(st.board)
            if remote is not None:
                rows[-1]["host"] = remote.host or "(rack file)"
                rows[-1]["online"] = remote.online
        return rows

    def queue(self) -> list[dict[str, Any]]:
        """Requests waiting for boards, first served first: who, what, priority, expected start.

        ``priority`` is as asked, ``effective_priority`` with ageing; ``expected_start`` (epoch
        seconds) is None for a request that waits on a person or an offline rig host.
        """
        return [asdict(entry) for entry in self.reserver.queue()]
