"""Real tc in network namespaces the tests create: restore, crash recovery, locks, privilege,
and measured RTT/loss for each profile (when the kernel has netem).

Traffic only flows between two namespaces joined by a veth pair (10.213.x.1 <-> 10.213.x.2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from netns_helpers import VethPair, netem_missing, python_in, tbf_stand_in

from pytest_hilfarm.cli import net as cli_net
from pytest_hilfarm.description.network import BUILTIN_PROFILES, Conditions
from pytest_hilfarm.drivers.netem import NETEM_HANDLE, NetemController, read_records
from pytest_hilfarm.errors import InfrastructureError

ROOT = Path(__file__).resolve().parents[2]


def ctl_for(pair: VethPair, state: Path, **kw: object) -> NetemController:
    return NetemController(pair.if_a, pair.ns_a, runner=tbf_stand_in, state_dir=state,
                           owner="netns-test", **kw)  # type: ignore[arg-type]


def test_original_qdisc_restored_after_use(veth: VethPair, tmp_path: Path) -> None:
    before = veth.qdisc_root()
    with ctl_for(veth, tmp_path) as ctl:
        ctl.apply(Conditions(delay_ms=50, loss=0.01))
        assert veth.qdisc_root()["handle"] == NETEM_HANDLE
        ctl.outage_start()
        ctl.outage_end()
        assert veth.qdisc_root()["handle"] == NETEM_HANDLE
    assert veth.qdisc_root()["kind"] == before["kind"]
    assert read_records(tmp_path) == []


def test_restored_when_the_test_raises(veth: VethPair, tmp_path: Path) -> None:
    before = veth.qdisc_root()
    with pytest.raises(RuntimeError), ctl_for(veth, tmp_path) as ctl:
        ctl.apply(Conditions(delay_ms=50))
        raise RuntimeError("test failed mid-way")
    assert veth.qdisc_root() == before


_CHILD = r"""
import subprocess, sys, time
from pathlib import Path
from pytest_hilfarm.description.network import Conditions
from pytest_hilfarm.drivers.netem import NetemController, subprocess_runner
stand_in = sys.argv[4] == "1"
def runner(argv):
    argv = list(argv)
    if stand_in and "netem" in argv:
        argv = argv[:argv.index("netem")] + ["tbf", "rate", "10mbit", "burst", "32kbit",
                                             "latency", "400ms"]
    return subprocess_runner(argv)
ctl = NetemController(sys.argv[1], sys.argv[2], runner=runner, state_dir=Path(sys.argv[3]),
                      owner="doomed child")
ctl.apply(Conditions(delay_ms=100, loss=0.05))
print("applied", flush=True)
time.sleep(60)
"""


def _kill_impairing_child(veth: VethPair, state: Path) -> None:
    stand_in = "1" if netem_missing() else "0"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, veth.if_a, veth.ns_a, str(state),
                              stand_in], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "applied"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    assert veth.qdisc_root()["handle"] == NETEM_HANDLE  # the kill left the impairment on
    (record,) = read_records(state)
    assert record.owner == "doomed child" and record.pid == child.pid


def test_sigkilled_holder_repaired_by_net_reset(veth: VethPair, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    before = veth.qdisc_root()
    _kill_impairing_child(veth, tmp_path)
    parser = argparse.ArgumentParser(prog="hilfarm")
    cli_net.register(parser.add_subparsers())
    show = parser.parse_args(["net", "show", "--state-dir", str(tmp_path), "--json"])
    assert show.handler(show) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["interface"] == veth.if_a and "doomed child" in row["impaired_by"]
    assert row["qdiscs"][0]["handle"] == NETEM_HANDLE
    args = parser.parse_args(["net", "reset", "--state-dir", str(tmp_path)])
    assert args.handler(args) == 0
    assert "restored" in capsys.readouterr().out
    assert veth.qdisc_root()["kind"] == before["kind"]
    assert read_records(tmp_path) == []


def test_sigkilled_holder_repaired_by_next_run(veth: VethPair, tmp_path: Path) -> None:
    before = veth.qdisc_root()
    _kill_impairing_child(veth, tmp_path)
    with ctl_for(veth, tmp_path):
        assert veth.qdisc_root()["kind"] == before["kind"]


def test_second_user_of_an_interface_fails_clearly(veth: VethPair, tmp_path: Path) -> None:
    with ctl_for(veth, tmp_path) as first:
        first.apply(Conditions(delay_ms=20))
        with pytest.raises(InfrastructureError, match="impaired by someone else") as info:
            ctl_for(veth, tmp_path, lock_timeout=0.3).acquire()
        assert "netns-test" in str(info.value)


def test_two_users_of_an_interface_serialise(veth: VethPair, tmp_path: Path) -> None:
    spans: list[tuple[str, float, float]] = []

    def user(name: str) -> None:
        with ctl_for(veth, tmp_path, lock_timeout=20) as ctl:
            start = time.monotonic()
            ctl.apply(Conditions(delay_ms=10))
            time.sleep(0.4)
            ctl.clear()
            spans.append((name, start, time.monotonic()))

    threads = [threading.Thread(target=user, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    (_, s1, e1), (_, s2, e2) = sorted(spans, key=lambda s: s[1])
    assert e1 <= s2, f"impairments overlapped: {spans}"


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_without_cap_net_admin_the_error_says_what_is_missing(veth: VethPair,
                                                             tmp_path: Path) -> None:
    # A user namespace of our own: root inside it, but no CAP_NET_ADMIN over the namespaces
    # the real root created, so tc is refused exactly as for an unprivileged user.
    code = (
        "from pathlib import Path\n"
        "from pytest_hilfarm.description.network import Conditions\n"
        "from pytest_hilfarm.drivers.netem import NetemController\n"
        "from pytest_hilfarm.errors import InfrastructureError\n"
        f"ctl = NetemController({veth.if_a!r}, {veth.ns_a!r}, state_dir=Path({str(tmp_path)!r}))\n"
        "try:\n    ctl.apply(Conditions(delay_ms=10))\n"
        "except InfrastructureError as exc:\n    print(exc)\n"
        "finally:\n    ctl.release()\n"
    )
    for flags in (["-U", "-r"], ["-U"]):
        done = subprocess.run(["unshare", *flags, sys.executable, "-c", code], cwd=ROOT,
                              capture_output=True, text=True, timeout=30, check=False)
        assert "CAP_NET_ADMIN" in done.stdout, (flags, done.stdout, done.stderr)
        assert "setcap" in done.stdout or "root" in done.stdout
        assert veth.qdisc_root()["handle"] != NETEM_HANDLE


# --- measurements (need netem in the kernel) -------------------------------------------------

_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 5999)); s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
try:
    while True:
        data, peer = s.recvfrom(64)
        s.sendto(data, peer)
except socket.timeout:
    pass
"""

_PROBE = r"""
import json, socket, struct, sys, time
dst, count, gap, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
sent, rtts = {}, {}
deadline = None
i = 0
while True:
    now = time.monotonic()
    if i < count and now >= (sent.get(i - 1, now - gap) + gap):
        s.sendto(struct.pack("!I", i), (dst, 5999)); sent[i] = now; i += 1
        if i == count: deadline = now + wait
    try:
        data, _ = s.recvfrom(64)
        (k,) = struct.unpack("!I", data[:4])
        rtts.setdefault(k, (time.monotonic() - sent[k]) * 1000)
    except BlockingIOError:
        time.sleep(0.0005)
    if deadline is not None and time.monotonic() > deadline:
        break
print(json.dumps({"sent": count, "rtts": list(rtts.values())}))
"""


def measure(pair: VethPair, count: int, gap_s: float, wait_s: float) -> tuple[float, float]:
    """(median RTT ms, loss fraction) of ``count`` UDP probes from ns_a to ns_b."""
    server = subprocess.Popen(["ip", "netns", "exec", pair.ns_b, sys.executable, "-c", _ECHO,
                               pair.ip_b, str(count * gap_s + wait_s + 5)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        done = python_in(pair.ns_a, _PROBE.replace("sys.argv[1]", repr(pair.ip_b))
                         .replace("int(sys.argv[2])", str(count))
                         .replace("float(sys.argv[3])", str(gap_s))
                         .replace("float(sys.argv[4])", str(wait_s)))
        result = json.loads(done.stdout)
    finally:
        server.kill()
        server.wait(timeout=10)
    rtts = sorted(result["rtts"])
    median = rtts[len(rtts) // 2] if rtts else math.nan
    return median, 1 - len(rtts) / result["sent"]


def binomial_bound(p: float, n: int) -> float:
    """Four standard deviations of an observed loss fraction (plus one packet of slack)."""
    return 4 * math.sqrt(max(p * (1 - p), 1e-9) / n) + 1 / n


# (profile, probes, spacing s): few probes keep the run short; the bound widens to match.
MEASURED = [("lan", 100, 0.002), ("wifi-congested", 300, 0.003), ("cellular", 400, 0.003),
            ("lossy-5pct", 500, 0.002), ("rtt-500ms", 100, 0.005)]


@pytest.mark.parametrize(("name", "count", "gap"), MEASURED)
def test_profile_rtt_and_loss_within_tolerance(veth: VethPair, tmp_path: Path, name: str,
                                               count: int, gap: float,
                                               record_property: object) -> None:
    reason = netem_missing()
    if reason:
        pytest.skip(reason)
    cond = BUILTIN_PROFILES[name].conditions
    with NetemController(veth.if_a, veth.ns_a, state_dir=tmp_path) as ctl:
        ctl.apply(cond)
        rtt, loss = measure(veth, count, gap, wait_s=(cond.delay_ms + 4 * cond.jitter_ms) / 1000
                            + 0.5)
    print(f"{name}: median RTT {rtt:.1f} ms (want {cond.delay_ms} ms), loss {loss:.3f} "
          f"(want {cond.loss}) over {count} probes")
    # RTT: within +-20 % of the added delay (plus 2 ms for the namespaces' own path).
    assert abs(rtt - cond.delay_ms) <= 0.2 * cond.delay_ms + 2.0
    assert abs(loss - cond.loss) <= binomial_bound(cond.loss, count)


def test_outage_drops_everything_then_recovers(veth: VethPair, tmp_path: Path) -> None:
    reason = netem_missing()
    if reason:
        pytest.skip(reason)
    with NetemController(veth.if_a, veth.ns_a, state_dir=tmp_path) as ctl:
        ctl.apply(Conditions(delay_ms=10))
        ctl.outage_start()
        _, loss = measure(veth, 50, 0.002, wait_s=0.3)
        assert loss == 1.0
        ctl.outage_end()
        rtt, loss = measure(veth, 50, 0.002, wait_s=0.3)
        assert loss == 0.0 and abs(rtt - 10) <= 4


def test_environment_allows_namespaces_only_inside_tests() -> None:
    # Guard: nothing here may leave a namespace behind (hf* names are ours).
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=False).stdout if os.geteuid() == 0 else ""
    assert f"hfa{os.getpid() % 100000}x" not in names
