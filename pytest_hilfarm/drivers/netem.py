"""Network conditions: named profiles, and ``tc netem`` on a rig's device-facing interface.

Its job: apply network conditions (described by :mod:`pytest_hilfarm.description.network`) to
one interface with :class:`NetemController`, which saves the original root qdisc in a restore record
*before* changing anything, holds a per-interface lock while it impairs, and always puts the
original back (``hilfarm net reset`` and the next controller repair what a killed process left).

It must not touch any interface it was not given, start background threads, or import pytest or
the virtual rack. Every command goes through an injectable runner, so tests assert exact argv.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import filelock

from pytest_hilfarm.description.network import (
    CLEAR,
    Conditions,
)
from pytest_hilfarm.errors import HilfarmError, InfrastructureError, UsageError

# Our netem root carries this handle, so a leftover impairment is recognisable as ours even when
# its restore record was lost (0x4869 = "Hi").
NETEM_HANDLE = "4869:"
# tc prints this when the kernel has no netem (CONFIG_NET_SCH_NETEM unset, sch_netem not loaded).
_NO_NETEM = "Specified qdisc kind is unknown"
_NO_PRIVILEGE = ("Operation not permitted", "Permission denied")
# Linux's bit number for CAP_NET_ADMIN in /proc/self/status CapEff (linux/capability.h).
_CAP_NET_ADMIN = 12
# netem queues every delayed packet; its default limit of 1000 packets overflows (and so drops
# packets nobody asked it to drop) once rate x delay exceeds 1000 MTU-sized packets. Size the
# queue for the bandwidth-delay product, assuming at most this line rate when no rate is given.
_ASSUMED_LINE_BPS = 1_000_000_000
_MTU = 1500
_MIN_LIMIT = 1000
_MAX_LIMIT = 1_000_000
# Roots the kernel made itself carry handle 0:; deleting our root brings the same default back.
_DEFAULT_HANDLE = "0:"
RUN_TIMEOUT_S = 15.0
PRIVILEGE_HINT = (
    "run the tests as root, or give the runner CAP_NET_ADMIN "
    "(sudo setcap cap_net_admin+ep \"$(command -v tc)\", or run pytest under "
    "`sudo -E` / in a container started with --cap-add NET_ADMIN)"
)
NETEM_KERNEL_HINT = (
    "load the netem qdisc (`sudo modprobe sch_netem`; on Debian/Ubuntu cloud kernels install "
    "linux-modules-extra-$(uname -r)); the kernel needs CONFIG_NET_SCH_NETEM"
)


# --- running commands ----------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    """Runs one command (argv, no shell) and returns its outcome; never raises for rc != 0."""

    def __call__(self, argv: Sequence[str]) -> RunResult: ...


def subprocess_runner(argv: Sequence[str]) -> RunResult:
    """The real runner: ``subprocess.run`` with a timeout, output captured as text."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                              check=False)
    except FileNotFoundError:
        raise InfrastructureError(f"{argv[0]!r} is not installed", where=" ".join(argv),
                                  hint="install iproute2 (apt-get install iproute2)") from None
    except subprocess.TimeoutExpired:
        raise InfrastructureError(f"{argv[0]} did not finish within {RUN_TIMEOUT_S:g} s",
                                  where=" ".join(argv), hint="check the host's network stack") \
            from None
    return RunResult(done.returncode, done.stdout, done.stderr)


def has_net_admin(status_text: str | None = None) -> bool:
    """True when this process holds CAP_NET_ADMIN (from /proc/self/status CapEff)."""
    if status_text is None:
        try:
            status_text = Path("/proc/self/status").read_text()
        except OSError:
            return os.geteuid() == 0
    m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)", status_text, re.M)
    return bool(m and int(m.group(1), 16) >> _CAP_NET_ADMIN & 1)


# --- the controller ------------------------------------------------------------------------


def netem_argv(interface: str, c: Conditions, netns: str | None = None) -> list[str]:
    """The exact ``tc`` command that puts conditions ``c`` on ``interface``'s root."""
    argv = _tc(netns) + ["qdisc", "replace", "dev", interface, "root", "handle", NETEM_HANDLE,
                         "netem", "limit", str(netem_limit(c))]
    if c.delay_ms > 0:
        argv += ["delay", f"{_fmt(c.delay_ms)}ms"]
        if c.jitter_ms > 0:
            # A normal distribution looks like real queueing; netem then reorders packets
            # unless told otherwise, which a radio link does not do to a single flow.
            argv += [f"{_fmt(c.jitter_ms)}ms", "distribution", "normal"]
    if c.loss > 0:
        argv += ["loss", f"{_fmt(c.loss * 100)}%"]
    if c.rate_kbit is not None:
        argv += ["rate", f"{c.rate_kbit}kbit"]
    return argv


def netem_limit(c: Conditions) -> int:
    """Queue length (packets) for netem: the bandwidth-delay product, with headroom."""
    bps = c.rate_kbit * 1000 if c.rate_kbit is not None else _ASSUMED_LINE_BPS
    seconds = (c.delay_ms + 3 * c.jitter_ms) / 1000.0
    packets = math.ceil(bps / 8 * seconds / _MTU * 1.5)
    return max(_MIN_LIMIT, min(_MAX_LIMIT, packets))


def _fmt(x: float) -> str:
    return f"{x:g}" if x == int(x) else f"{x:.3f}".rstrip("0").rstrip(".")


def _tc(netns: str | None) -> list[str]:
    return ["tc"] + (["-n", netns] if netns else [])


@dataclass(frozen=True)
class RestoreRecord:
    """What an interface looked like before we touched it; written before the first change."""

    interface: str
    netns: str | None
    original: tuple[Mapping[str, Any], ...]
    pid: int
    host: str
    owner: str
    created: float
    path: Path = field(compare=False)

    @property
    def label(self) -> str:
        return f"{self.netns}:{self.interface}" if self.netns else self.interface

    def to_json(self) -> str:
        return json.dumps({
            "interface": self.interface, "netns": self.netns, "original": list(self.original),
            "pid": self.pid, "host": self.host, "owner": self.owner, "created": self.created,
        }, indent=1)


def _slot_name(interface: str, netns: str | None) -> str:
    return f"{netns or '-'}__{interface}"


def read_records(state_dir: Path) -> list[RestoreRecord]:
    """Every restore record in ``state_dir`` (unreadable ones raise, naming the file)."""
    out: list[RestoreRecord] = []
    if not state_dir.is_dir():
        return out
    for path in sorted(state_dir.glob("*.restore.json")):
        try:
            data = json.loads(path.read_text())
            out.append(RestoreRecord(data["interface"], data.get("netns"),
                                     tuple(data.get("original", ())), int(data.get("pid", 0)),
                                     str(data.get("host", "")), str(data.get("owner", "")),
                                     float(data.get("created", 0)), path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InfrastructureError(f"restore record is unreadable ({exc})", where=str(path),
                                      hint="check the interface's qdisc by hand (tc qdisc show) "
                                      "and delete the file") from None
    return out


class NetemController:
    """Impairs one interface with netem; restores its original root qdisc whatever happens.

    Use as a context manager (or ``acquire()``/``release()``). ``acquire`` takes the interface's
    lock (waiting up to ``lock_timeout`` s; another holder means another test is impairing it) and
    repairs a leftover of a dead holder. ``apply`` writes the restore record, then runs tc;
    ``clear``/``release`` put the original back and delete the record.

    Outage = 100 % loss, not ``ip link set down``: the link, its carrier, addresses, routes and
    DHCP state stay as they are (a device on a real radio keeps its association in a coverage
    gap, packets just vanish), so nothing needs re-configuring afterwards and restoring stays a
    single qdisc change. Taking the link down would also drop the host's routes on it and look
    like a cable pull, not a network gap.
    """

    def __init__(self, interface: str, netns: str | None = None, *,
                 runner: Runner = subprocess_runner, state_dir: Path | str,
                 lock_dir: Path | str | None = None, lock_timeout: float = 60.0,
                 owner: str = "", check_privilege: Callable[[], bool] | None = None) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._:@-]{1,15}", interface):
            raise UsageError(f"{interface!r} is not a network interface name",
                             where="NetemController", hint="use the name `ip link` shows")
        self.interface = interface
        self.netns = netns
        self._run = runner
        self.state_dir = Path(state_dir)
        self.lock_dir = Path(lock_dir) if lock_dir is not None else self.state_dir
        self.lock_timeout = lock_timeout
        self.owner = owner or f"pid {os.getpid()}"
        self._check_privilege = check_privilege or has_net_admin
        slot = _slot_name(interface, netns)
        self.record_path = self.state_dir / f"{slot}.restore.json"
        self._lock = filelock.FileLock(str(self.lock_dir / f"{slot}.netem.lock"))
        self._record: RestoreRecord | None = None
        self.conditions: Conditions = CLEAR
        self.in_outage = False

    @property
    def label(self) -> str:
        return f"{self.netns}:{self.interface}" if self.netns else self.interface

    # -- lifecycle

    def __enter__(self) -> NetemController:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def acquire(self) -> None:
        """Take the interface's lock and repair what a dead previous holder left behind."""
        if self.held:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=self.lock_timeout)
        except filelock.Timeout:
            holder = self._holder_text()
            raise InfrastructureError(
                f"interface {self.label} is being impaired by someone else{holder}; waited "
                f"{self.lock_timeout:g} s", where=f"lock {self._lock.lock_file}",
                hint="two tests must not impair one interface at once: run them one after "
                "the other, give each rig its own interface, or raise the lock timeout") from None
        try:
            # We hold the lock, so a record left here belongs to a holder that died.
            if self.record_path.exists():
                repair(read_one(self.record_path), self._run)
        except BaseException:
            self._lock.release()
            raise

    def release(self) -> None:
        """Restore the original qdisc (if we changed it) and drop the lock."""
        if not self.held:
            return
        try:
            self.clear()
        finally:
            self._lock.release()

    def _holder_text(self) -> str:
        try:
            rec = read_one(self.record_path)
        except (InfrastructureError, FileNotFoundError):
            return ""
        return f" ({rec.owner}, pid {rec.pid} on {rec.host})"

    # -- changes

    def apply(self, conditions: Conditions) -> None:
        """Make ``conditions`` the steady state (clear ones restore the original qdisc).

        During an outage the new steady state is kept and comes into force when it ends.
        """
        if not self.held:
            self.acquire()
        self.conditions = conditions
        self._sync()

    def outage_start(self) -> None:
        """Start a cut: 100 % loss on top of the steady conditions."""
        if not self.held:
            self.acquire()
        self.in_outage = True
        self._sync()

    def outage_end(self, *, address_change: bool = False) -> None:
        """End a cut: back to the steady conditions; ``address_change`` also cuts the host's
        TCP flows over the interface, as a device that came back with a new address would
        find them dead.
        """
        if address_change:
            self.cut_flows()
        self.in_outage = False
        self._sync()

    def clear(self) -> None:
        """Put the original root qdisc back and delete the restore record."""
        self.conditions = CLEAR
        self.in_outage = False
        self._restore()

    def cut_flows(self) -> None:
        """Abort the host's TCP connections leaving through the interface (``ss -K``)."""
        argv = cut_flows_argv(self.interface, self.netns)
        result = self._run(argv)
        if result.returncode != 0:
            raise tc_error(result, argv, self.label, "cut the interface's TCP flows")

    def _sync(self) -> None:
        effective = replace(self.conditions, loss=1.0) if self.in_outage else self.conditions
        if effective.is_clear:
            self._restore()
            return
        if self._record is None:
            self._save_original()
        self._tc(netem_argv(self.interface, effective, self.netns), "apply netem")

    def _restore(self) -> None:
        if self._record is None:
            return
        repair(self._record, self._run)
        self._record = None

    def show(self) -> list[dict[str, Any]]:
        """The interface's qdiscs as ``tc -j qdisc show`` reports them."""
        return show_qdiscs(self.interface, self.netns, self._run)

    def _save_original(self) -> None:
        if not self._check_privilege():
            # tc would fail anyway; saying so before writing anything is clearer.
            raise InfrastructureError(
                f"changing the qdisc of {self.label} needs CAP_NET_ADMIN, which this process "
                f"(uid {os.geteuid()}) does not have", where=f"interface {self.label}",
                hint=PRIVILEGE_HINT)
        original = self.show()
        root = _root(original)
        if root is not None and root.get("handle") not in (_DEFAULT_HANDLE, NETEM_HANDLE):
            raise UsageError(
                f"interface {self.label} has a custom root qdisc {root.get('kind')} "
                f"{root.get('handle')}, which hilfarm could not restore exactly",
                where=f"interface {self.label}",
                hint="impair a dedicated device-facing interface, or remove the custom qdisc "
                f"(tc qdisc del dev {self.interface} root) if it is not needed")
        record = RestoreRecord(self.interface, self.netns, tuple(original), os.getpid(),
                               socket.gethostname(), self.owner, time.time(), self.record_path)
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(record.to_json())
        # fsync before the rename and before tc runs: the record must outlive a power cut too.
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.record_path)
        self._record = record

    def _tc(self, argv: list[str], doing: str) -> None:
        result = self._run(argv)
        if result.returncode != 0:
            raise tc_error(result, argv, self.label, doing)


def read_one(path: Path) -> RestoreRecord:
    for rec in read_records(path.parent):
        if rec.path == path:
            return rec
    raise FileNotFoundError(path)


def show_qdiscs(interface: str, netns: str | None, run: Runner) -> list[dict[str, Any]]:
    argv = _tc(netns) + ["-j", "qdisc", "show", "dev", interface]
    result = run(argv)
    label = f"{netns}:{interface}" if netns else interface
    if result.returncode != 0:
        raise tc_error(result, argv, label, "read the qdiscs")
    try:
        data = json.loads(result.stdout or "[]")
    except json.JSONDecodeError:
        raise InfrastructureError(f"tc printed no JSON: {result.stdout[:200]!r}",
                                  where=" ".join(argv),
                                  hint="install iproute2 >= 4.13 (for tc -j)") from None
    return [q for q in data if isinstance(q, dict)]


def _root(qdiscs: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return next((q for q in qdiscs if q.get("root")), None)


def repair(record: RestoreRecord, run: Runner) -> None:
    """Put ``record``'s interface back to its original root qdisc; delete the record.

    Originals are kernel defaults (handle 0:), which deleting our root brings back; a vanished
    interface (USB adapter unplugged, namespace gone) has nothing to restore.
    """
    argv = _tc(record.netns) + ["qdisc", "del", "dev", record.interface, "root"]
    try:
        current = show_qdiscs(record.interface, record.netns, run)
    except InfrastructureError as exc:
        if _gone(str(exc)):
            record.path.unlink(missing_ok=True)
            return
        raise
    root = _root(current)
    if root is not None and root.get("handle") == NETEM_HANDLE:
        result = run(argv)
        if result.returncode != 0 and not _gone(result.stderr):
            raise tc_error(result, argv, record.label, "restore the original qdisc")
    original = _root(record.original)
    after = _root(show_qdiscs(record.interface, record.netns, run))
    if original is not None and after is not None and after.get("kind") != original.get("kind"):
        raise InfrastructureError(
            f"after restoring, {record.label} has root qdisc {after.get('kind')} but had "
            f"{original.get('kind')} before", where=str(record.path),
            hint=f"restore it by hand (tc qdisc replace dev {record.interface} root "
            f"{original.get('kind')}), then delete the record")
    record.path.unlink(missing_ok=True)


def _gone(text: str) -> bool:
    return any(s in text for s in ("Cannot find device", "No such device",
                                   "Cannot open network namespace", "does not exist"))


def cut_flows_argv(interface: str, netns: str | None = None) -> list[str]:
    """``ss -K`` killing every TCP socket bound to traffic over ``interface``."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return prefix + ["ss", "-K", "-t", "-n", "dev", "=", interface]


def tc_error(result: RunResult, argv: Sequence[str], label: str, doing: str
             ) -> InfrastructureError:
    err = (result.stderr or result.stdout).strip()
    where = f"interface {label}: {' '.join(argv)}"
    if _NO_NETEM in err:
        return InfrastructureError(f"cannot {doing}: this kernel has no netem qdisc ({err})",
                                   where=where, hint=NETEM_KERNEL_HINT)
    if any(s in err for s in _NO_PRIVILEGE):
        return InfrastructureError(f"cannot {doing}: missing CAP_NET_ADMIN ({err})",
                                   where=where, hint=PRIVILEGE_HINT)
    if _gone(err):
        return InfrastructureError(f"cannot {doing}: no such interface ({err})", where=where,
                                   hint="check the board's `interface:` in the rack file "
                                   "against `ip link`")
    return InfrastructureError(f"cannot {doing}: tc exited {result.returncode}: {err}",
                               where=where, hint="run the command by hand to see why")


@dataclass(frozen=True)
class ResetOutcome:
    """What ``reset_all`` did to one interface."""

    record: RestoreRecord
    outcome: str
    ok: bool


def reset_all(state_dir: Path, run: Runner = subprocess_runner, *, lock_dir: Path | None = None,
              force: bool = False) -> list[ResetOutcome]:
    """Repair every interface that has a restore record; one broken one does not stop the rest.

    An interface whose lock is held belongs to a live test and is left alone unless ``force``.
    """
    out: list[ResetOutcome] = []
    for record in read_records(state_dir):
        slot = _slot_name(record.interface, record.netns)
        lock = filelock.FileLock(str((lock_dir or state_dir) / f"{slot}.netem.lock"))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            if not force:
                out.append(ResetOutcome(record, f"skipped: in use by {record.owner} "
                                        f"(pid {record.pid}); --force resets it anyway", True))
                continue
        try:
            repair(record, run)
            out.append(ResetOutcome(record, "restored", True))
        except HilfarmError as exc:
            out.append(ResetOutcome(record, f"failed: {exc}", False))
        finally:
            if lock.is_locked:
                lock.release()
    return out
