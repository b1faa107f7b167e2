"""Helpers for the network tests: two netns joined by a veth pair, nothing else touched.

Every address used here (10.213.x.y/24) lives only inside namespaces these fixtures create and
delete; no test sends a packet anywhere else. Tests that need them skip with a reason when not
root or when ``ip netns`` is unavailable; measurement tests also skip when the kernel has no
netem (CONFIG_NET_SCH_NETEM).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from pytest_hilfarm.drivers.netem import RunResult, subprocess_runner

_counter = itertools.count()


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=20, check=check)


def netns_unavailable() -> str | None:
    """Why namespace tests cannot run here (None when they can)."""
    if os.geteuid() != 0:
        return "needs root (ip netns add / veth)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc): apt-get install iproute2"
    probe = f"hfprobe{os.getpid() % 100000}"
    done = _run(["ip", "netns", "add", probe], check=False)
    if done.returncode != 0:
        return f"ip netns unavailable: {done.stderr.strip()}"
    _run(["ip", "netns", "del", probe], check=False)
    return None


NETNS_REASON = netns_unavailable()
_NETEM_REASON: list[str | None] = []


@dataclass(frozen=True)
class VethPair:
    """Two namespaces joined by veth: ``ns_a``/``if_a``/``ip_a`` and ``ns_b``/``if_b``/``ip_b``."""

    ns_a: str
    ns_b: str
    if_a: str
    if_b: str
    ip_a: str
    ip_b: str

    def qdisc_root(self) -> dict[str, object]:
        import json

        out = _run(["tc", "-n", self.ns_a, "-j", "qdisc", "show", "dev", self.if_a]).stdout
        return next(q for q in json.loads(out) if q.get("root"))


def make_pair() -> VethPair:
    n = next(_counter)
    tag = f"{os.getpid() % 100000}x{n}"
    pair = VethPair(f"hfa{tag}", f"hfb{tag}", f"hva{tag}"[:15], f"hvb{tag}"[:15],
                    f"10.213.{n % 250}.1", f"10.213.{n % 250}.2")
    _run(["ip", "netns", "add", pair.ns_a])
    _run(["ip", "netns", "add", pair.ns_b])
    _run(["ip", "link", "add", pair.if_a, "netns", pair.ns_a, "type", "veth", "peer", "name",
          pair.if_b, "netns", pair.ns_b])
    for ns, iface, ip in ((pair.ns_a, pair.if_a, pair.ip_a), (pair.ns_b, pair.if_b, pair.ip_b)):
        _run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", iface])
        _run(["ip", "-n", ns, "link", "set", iface, "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
    return pair


def drop_pair(pair: VethPair) -> None:
    for ns in (pair.ns_a, pair.ns_b):
        _run(["ip", "netns", "del", ns], check=False)


def netem_missing() -> str | None:
    """Why real netem cannot be used here (None when it can); probed once per run."""
    if NETNS_REASON:
        return NETNS_REASON
    if not _NETEM_REASON:
        pair = make_pair()
        try:
            done = _run(["tc", "-n", pair.ns_a, "qdisc", "replace", "dev", pair.if_a, "root",
                         "netem", "delay", "1ms"], check=False)
            _NETEM_REASON.append(None if done.returncode == 0 else
                                 "kernel has no netem qdisc (CONFIG_NET_SCH_NETEM / sch_netem): "
                                 + done.stderr.strip())
        finally:
            drop_pair(pair)
    return _NETEM_REASON[0]


def tbf_stand_in(argv: Sequence[str]) -> RunResult:
    """Run tc, but put a tbf where netem was asked for when the kernel lacks netem.

    The restore, lock and crash-recovery machinery does not care which qdisc it restores from;
    this lets those tests run for real on kernels without CONFIG_NET_SCH_NETEM.
    """
    argv = list(argv)
    if "netem" in argv and netem_missing():
        argv = argv[: argv.index("netem")] + ["tbf", "rate", "10mbit", "burst", "32kbit",
                                              "latency", "400ms"]
    return subprocess_runner(argv)


def python_in(ns: str, code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` inside namespace ``ns``."""
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=timeout, check=False)
