"""pytest glue for network conditions: the ``hil_network`` fixture and marker.

Its job: turn ``@pytest.mark.hil_network(...)`` and ``hil_network.apply/outage/clear`` into
conditions on the boards the test holds: netem on each board's device-facing ``interface`` on a real
rig (:mod:`pytest_hilfarm.drivers.netem`), the radio medium (control endpoint ``mesh``) and
impairment proxies (:mod:`pytest_hilfarm.drivers.netproxy`) on the virtual rack. It must not import
the virtual rack (``pytest_hilfarm.sim``) and must leave every interface and the mesh as it found
them, whatever the test does. Loaded by the main plugin (``pytest_plugins``) or ``-p
pytest_hilfarm.plugin.network``.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import filelock
import pytest

from pytest_hilfarm.description.network import (
    CLEAR,
    Conditions,
    NetworkProfile,
    load_profiles,
    parse_loss,
    parse_ms,
    parse_outages,
    parse_rate,
)
from pytest_hilfarm.drivers.netem import NetemController
from pytest_hilfarm.drivers.netproxy import ImpairmentProxy, OutageMode
from pytest_hilfarm.errors import ConfigError, HilfarmError, InfrastructureError, UsageError

if TYPE_CHECKING:
    from pytest_hilfarm.drivers.virtual import ControlClient
    from pytest_hilfarm.farm import Farm


def _marker_signature(profile: object = None, *, loss: object = None, delay: object = None,
                      jitter: object = None, rate: object = None,
                      outage: object = None) -> None:
    """Exists only for its signature: the marker's arguments are bound against it."""


def _plain_signature() -> str:
    sig = inspect.signature(_marker_signature)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


MARKER_SIGNATURE = f"hil_network{_plain_signature()}"
MARKER_HELP = (
    f"{MARKER_SIGNATURE}: network conditions for the test: a profile name (lan, wifi-congested, "
    "cellular, lossy-5pct, rtt-500ms, outage-30s, carrier-switch, or the rack file's "
    "network_profiles) and/or loss (0.02 or '2%'), delay/jitter (ms or '300ms'), rate (kbit/s or "
    "'1mbit'), outage (seconds, or {at, duration}). See docs/network-conditions.md."
)
_profiles_key = pytest.StashKey[Mapping[str, NetworkProfile]]()
_OVERRIDES = ("loss", "delay", "jitter", "rate", "outage")


# --- what a test asks for ------------------------------------------------------------------


def resolve_request(args: Sequence[object], kwargs: Mapping[str, object],
                    profiles: Mapping[str, NetworkProfile], where: str) -> NetworkProfile:
    """Check marker-style arguments (strictly) and turn them into one profile.

    A profile name (or a :class:`NetworkProfile` / :class:`Conditions`) is the starting point;
    the keyword arguments override its fields. No arguments at all means no impairment.
    """
    try:
        bound = inspect.signature(_marker_signature).bind(*args, **kwargs)
    except TypeError as exc:
        raise UsageError(f"bad hil_network arguments: {exc}", where=where,
                         hint=f"the signature is {MARKER_SIGNATURE}") from None
    given = bound.arguments
    base = given.get("profile")
    if isinstance(base, NetworkProfile):
        profile = base
    elif isinstance(base, Conditions):
        profile = NetworkProfile("custom", base, source=where)
    elif isinstance(base, str):
        if base not in profiles:
            raise UsageError(f"unknown network profile {base!r}", where=where,
                             hint=f"known profiles: {', '.join(sorted(profiles))} (add your own "
                             "under network_profiles: in the rack file)")
        profile = profiles[base]
    elif base is None:
        profile = NetworkProfile("custom", CLEAR, source=where)
    else:
        raise UsageError(f"profile {base!r} is not a profile name", where=where,
                         hint=f"the signature is {MARKER_SIGNATURE}")
    kw: dict[str, Any] = {}
    try:
        if given.get("loss") is not None:
            kw["loss"] = parse_loss(given["loss"], where)
        if given.get("delay") is not None:
            kw["delay_ms"] = parse_ms(given["delay"], "delay", where)
        if given.get("jitter") is not None:
            kw["jitter_ms"] = parse_ms(given["jitter"], "jitter", where)
        if given.get("rate") is not None:
            kw["rate_kbit"] = parse_rate(given["rate"], where)
        outages = (parse_outages(given["outage"], where) if given.get("outage") is not None
                   else profile.outages)
        conditions = replace(profile.conditions, **kw)
    except ConfigError as exc:
        raise UsageError(exc.what, where=where,
                         hint=f"{exc.hint}; the signature is {MARKER_SIGNATURE}") from None
    if kw or outages != profile.outages:
        name = f"{profile.name}+overrides" if isinstance(base, str) else profile.name
        profile = replace(profile, name=name, conditions=conditions, outages=outages,
                          source=where)
    return profile


# --- backends ------------------------------------------------------------------------------


class NetworkBackend(Protocol):
    """Where conditions land: a rig's interfaces or the virtual rack's medium."""

    def set_conditions(self, conditions: Conditions) -> None: ...
    def begin_outage(self, address_change: bool) -> None: ...
    def end_outage(self, address_change: bool) -> None: ...
    def close(self) -> None: ...
    def describe(self) -> dict[str, Any]: ...


class NetemBackend:
    """Real rigs: one NetemController per board interface the test holds."""

    def __init__(self, controllers: Sequence[NetemController]) -> None:
        self.controllers = list(controllers)
        acquired: list[NetemController] = []
        try:
            for ctl in self.controllers:
                ctl.acquire()
                acquired.append(ctl)
        except BaseException:
            for ctl in acquired:
                ctl.release()
            raise

    def set_conditions(self, conditions: Conditions) -> None:
        for ctl in self.controllers:
            ctl.apply(conditions)

    def begin_outage(self, address_change: bool) -> None:
        for ctl in self.controllers:
            ctl.outage_start()

    def end_outage(self, address_change: bool) -> None:
        for ctl in self.controllers:
            ctl.outage_end(address_change=address_change)

    def close(self) -> None:
        errors: list[BaseException] = []
        for ctl in self.controllers:
            try:
                ctl.release()
            except HilfarmError as exc:  # restore the others before reporting
                errors.append(exc)
        if errors:
            raise errors[0]

    def describe(self) -> dict[str, Any]:
        return {"backend": "netem", "interfaces": [c.label for c in self.controllers]}


class VirtualBackend:
    """Virtual rack: the mesh medium via the control endpoint, plus the test's proxies.

    The mesh's ``latency_ms`` is per radio hop and one-way, so an added round trip of
    ``delay_ms`` becomes ``delay_ms / 2`` on top of the medium's own latency; an outage is a
    partition that puts every board in a group of its own.
    """

    def __init__(self, control: ControlClient | None, lock_path: Path | None = None,
                 lock_timeout: float = 60.0) -> None:
        self.control = control
        self.proxies: list[ImpairmentProxy] = []
        self._conditions = CLEAR
        self._original: dict[str, Any] | None = None
        self._boards: list[str] = []
        self._lock: filelock.FileLock | None = None
        if control is None:
            return
        # The medium is one per daemon and every test process shares it, so two tests must
        # not change it at once (the same rule as one interface on a real rig).
        if lock_path is not None:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = filelock.FileLock(str(lock_path))
            try:
                self._lock.acquire(timeout=lock_timeout)
            except filelock.Timeout:
                raise InfrastructureError(
                    f"the virtual rack's mesh conditions are held by another test; waited "
                    f"{lock_timeout:g} s", where=f"lock {lock_path}",
                    hint="run hil_network tests of one virtual rack one after the other "
                    "(e.g. in one xdist group)") from None
        try:
            self._original = control.mesh()
            self._boards = [str(b.get("id")) for b in control.status()]
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    def set_conditions(self, conditions: Conditions) -> None:
        self._conditions = conditions
        for proxy in self.proxies:
            proxy.set_conditions(conditions)
        if self.control is not None and self._original is not None:
            base = float(self._original.get("latency_ms", 0.0))
            self.control.mesh(loss=conditions.loss, latency_ms=base + conditions.delay_ms / 2)

    def begin_outage(self, address_change: bool) -> None:
        mode: OutageMode = "cut" if address_change else "hold"
        for proxy in self.proxies:
            proxy.begin_outage(mode)
        if self.control is not None:
            self.control.mesh(partitions=[[b] for b in self._boards])

    def end_outage(self, address_change: bool) -> None:
        for proxy in self.proxies:
            proxy.end_outage()
        if self.control is not None and self._original is not None:
            self.control.mesh(partitions=self._original.get("partitions", []))

    def add_proxy(self, proxy: ImpairmentProxy) -> None:
        proxy.set_conditions(self._conditions)
        self.proxies.append(proxy)

    def close(self) -> None:
        try:
            for proxy in self.proxies:
                proxy.stop()
            if self.control is not None and self._original is not None:
                self.control.mesh(**self._original)
        finally:
            if self._lock is not None and self._lock.is_locked:
                self._lock.release()

    def describe(self) -> dict[str, Any]:
        return {"backend": "virtual", "mesh": self.control is not None,
                "proxies": [p.address for p in self.proxies]}


# --- the fixture's object ------------------------------------------------------------------


@dataclass(frozen=True)
class OutageHandle:
    """A background outage: ``wait()`` until it is over (bounded by ``timeout``)."""

    done: threading.Event
    seconds: float

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(self.seconds + 10.0 if timeout is None else timeout)


class HilNetwork:
    """Network conditions of one test (what the ``hil_network`` fixture returns).

    ``apply`` sets steady conditions and starts the profile's outage schedule in the background;
    ``outage`` cuts the network now; ``clear`` lifts everything. Closing restores the original.
    """

    def __init__(self, backend: NetworkBackend, profiles: Mapping[str, NetworkProfile],
                 where: str = "hil_network",
                 proxy_factory: Callable[..., ImpairmentProxy] = ImpairmentProxy) -> None:
        self.backend = backend
        self.profiles = profiles
        self.where = where
        self._proxy_factory = proxy_factory
        self._lock = threading.RLock()
        self._profile: NetworkProfile | None = None
        self._outages = 0
        self._cancel = threading.Event()
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._passthrough: list[ImpairmentProxy] = []

    @property
    def conditions(self) -> Conditions:
        """The steady conditions now in force (an outage in progress shows in ``in_outage``)."""
        return self._profile.conditions if self._profile else CLEAR

    @property
    def profile(self) -> NetworkProfile | None:
        return self._profile

    @property
    def in_outage(self) -> bool:
        return self._outages > 0

    def apply(self, profile: object = None, **overrides: object) -> NetworkProfile:
        """Apply a profile name, a NetworkProfile/Conditions and/or marker-style keywords."""
        if isinstance(profile, Mapping):
            overrides = {**profile, **overrides}
            profile = None
        args = () if profile is None else (profile,)
        resolved = resolve_request(args, overrides, self.profiles, self.where)
        self._stop_schedule()
        with self._lock:
            self.backend.set_conditions(resolved.conditions)
            self._profile = resolved
        if resolved.outages:
            self._cancel = threading.Event()
            self._start(self._run_schedule, resolved, self._cancel)
        return resolved

    def outage(self, seconds: float, *, background: bool = False,
               address_change: bool = False) -> OutageHandle | None:
        """Cut the network for ``seconds`` now; blocks unless ``background``."""
        if not (isinstance(seconds, (int, float)) and 0 < seconds <= 3600):
            raise UsageError(f"outage of {seconds!r} s is not within (0, 3600]",
                             where=self.where, hint="give the outage length in seconds")
        done = threading.Event()
        if background:
            self._start(self._one_outage, float(seconds), address_change, done)
            return OutageHandle(done, float(seconds))
        self._one_outage(float(seconds), address_change, done)
        return None

    def clear(self) -> None:
        """Lift every impairment (and stop the profile's outage schedule)."""
        self._stop_schedule()
        with self._lock:
            self.backend.set_conditions(CLEAR)
            self._profile = None

    def proxy(self, target: tuple[str, int], *, rng_seed: int | None = None) -> ImpairmentProxy:
        """An impairing TCP proxy in front of a server on 127.0.0.1 (started; closed with us).

        On the virtual rack it carries this test's conditions; on a real rig netem already
        impairs the boards' traffic, so it is a plain pass-through (the test stays the same).
        """
        proxy = self._proxy_factory(target, rng_seed=rng_seed).start()
        add = getattr(self.backend, "add_proxy", None)
        if add is not None:
            add(proxy)
        else:
            self._passthrough.append(proxy)
        return proxy

    def describe(self) -> dict[str, Any]:
        return {**self.backend.describe(), "profile": self._profile.name if self._profile
                else None, "conditions": self.conditions.to_dict(), "in_outage": self.in_outage}

    def close(self) -> None:
        """Stop schedules and background outages, restore everything."""
        self._stop_schedule()
        self._closing.set()
        for thread in self._threads:
            thread.join(timeout=5.0)
        for proxy in self._passthrough:
            proxy.stop()
        self.backend.close()

    # -- internals

    def _start(self, func: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=func, args=args, name="hil-network", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _stop_schedule(self) -> None:
        self._cancel.set()

    def _begin(self, address_change: bool) -> None:
        with self._lock:
            self._outages += 1
            if self._outages == 1:
                self.backend.begin_outage(address_change)

    def _end(self, address_change: bool) -> None:
        with self._lock:
            self._outages -= 1
            if self._outages == 0:
                self.backend.end_outage(address_change)

    def _one_outage(self, seconds: float, address_change: bool, done: threading.Event) -> None:
        self._begin(address_change)
        try:
            # An outage ends early only when the fixture closes (a cancelled schedule does not
            # shorten an outage the test asked for itself).
            self._closing.wait(seconds)
        finally:
            self._end(address_change)
            done.set()

    def _run_schedule(self, profile: NetworkProfile, cancel: threading.Event) -> None:
        elapsed = 0.0
        for window in profile.outages:
            if cancel.wait(max(0.0, window.start_s - elapsed)):
                return
            self._begin(profile.address_change)
            try:
                cancel.wait(window.duration_s)
            finally:
                self._end(profile.address_change)
            elapsed = window.start_s + window.duration_s


# --- pytest hooks and fixture --------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)


def _rack_path(config: pytest.Config) -> Path | None:
    # The main plugin resolves the rack once; read it from there when it is loaded.
    from pytest_hilfarm.plugin.core import hil_settings

    try:
        rack = hil_settings(config).rack
    except KeyError:
        return None
    return Path(rack) if rack is not None else None


def profiles_for(config: pytest.Config) -> Mapping[str, NetworkProfile]:
    """Built-in profiles merged with the rack file's ``network_profiles`` (cached per run)."""
    if _profiles_key not in config.stash:
        try:
            config.stash[_profiles_key] = load_profiles(_rack_path(config))
        except HilfarmError as exc:
            raise pytest.UsageError(str(exc)) from exc
    return config.stash[_profiles_key]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Check every ``hil_network`` marker at collection: a typo is one usage error."""
    for item in items:
        for mark in item.iter_markers("hil_network"):
            try:
                resolve_request(mark.args, mark.kwargs, profiles_for(config), item.nodeid)
            except HilfarmError as exc:
                raise pytest.UsageError(str(exc)) from exc


def _backend_for(request: pytest.FixtureRequest, farm: Farm) -> NetworkBackend:
    rack = farm.rack
    holds_boards = bool({"hil_devices", "hil_device"} & set(request.fixturenames))
    if rack.is_virtual:
        from pytest_hilfarm.drivers.virtual import ControlClient, read_daemon_info

        control: ControlClient | None = None
        if holds_boards:
            request.getfixturevalue("hil_devices")  # boards first: that brings the daemon up
            control = farm.control()
        else:
            # A proxy-only test must not start a rack just to configure a radio nobody uses;
            # it still acts on the mesh of a daemon that is already running.
            info = read_daemon_info()
            if info and isinstance(info.get("control"), str):
                control = ControlClient(info["control"])
        return VirtualBackend(control, rack.state_dir / "netem" / "virtual-mesh.lock")
    if not holds_boards:
        raise UsageError("hil_network on a real rig impairs the boards the test holds, but this "
                         "test holds none", where=request.node.nodeid,
                         hint="also request hil_devices (or hil_device) in the test")
    devices = request.getfixturevalue("hil_devices")
    controllers = []
    for dev in devices:
        board = rack.board(dev.id)
        if not board.interface:
            raise UsageError(f"board {board.id} has no device-facing network interface",
                             where=str(board.where),
                             hint="add `interface: <name from ip link>` to the board in the "
                             "rack file")
        controllers.append(NetemController(board.interface, state_dir=rack.state_dir / "netem",
                                           owner=request.node.nodeid))
    return NetemBackend(controllers)


@pytest.fixture
def hil_network(request: pytest.FixtureRequest, hil_farm: Farm) -> Iterator[HilNetwork]:
    """Network conditions for this test (marker ``hil_network``; ``.apply/.outage/.clear``)."""
    profiles = profiles_for(request.config)
    mark = request.node.get_closest_marker("hil_network")
    initial = (resolve_request(mark.args, mark.kwargs, profiles, request.node.nodeid)
               if mark is not None else None)
    backend = _backend_for(request, hil_farm)
    net = HilNetwork(backend, profiles, where=request.node.nodeid)
    try:
        if initial is not None:
            net.apply(initial)
        yield net
    finally:
        net.close()


def make_network(backend: NetworkBackend, profiles: Mapping[str, NetworkProfile] | None = None,
                 where: str = "hil_network") -> HilNetwork:
    """A HilNetwork outside pytest (scripts, benches): close() it when done."""
    return HilNetwork(backend, profiles or load_profiles(None), where)
