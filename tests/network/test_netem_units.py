"""NetemController and profiles with a fake runner: exact argv, records, errors (no root)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from pytest_hilfarm.description.network import BUILTIN_PROFILES, Conditions, load_profiles
from pytest_hilfarm.drivers.netem import (
    NETEM_HANDLE,
    NetemController,
    RunResult,
    cut_flows_argv,
    has_net_admin,
    netem_argv,
    read_records,
    reset_all,
)
from pytest_hilfarm.errors import ConfigError, InfrastructureError, UsageError

DEFAULT_ROOT = [{"kind": "pfifo_fast", "handle": "0:", "root": True, "refcnt": 2, "options": {}}]


class FakeTc:
    """Answers tc like a kernel would, keeping one interface's root qdisc; records argv."""

    def __init__(self, root: list[dict[str, object]] | None = None, fail: str = "") -> None:
        self.root = list(root or DEFAULT_ROOT)
        self.original = list(self.root)
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, argv: Sequence[str]) -> RunResult:
        argv = list(argv)
        self.calls.append(argv)
        if "-j" in argv:
            return RunResult(0, json.dumps(self.root), "")
        if self.fail and ("replace" in argv or "del" in argv):
            return RunResult(2, "", self.fail)
        if "replace" in argv:
            self.root = [{"kind": "netem", "handle": NETEM_HANDLE, "root": True}]
        elif "del" in argv:
            self.root = list(self.original)
        return RunResult(0, "", "")


def controller(tmp_path: Path, tc: FakeTc, **kw: object) -> NetemController:
    return NetemController("eth1", runner=tc, state_dir=tmp_path / "state",
                           check_privilege=lambda: True, owner="test", **kw)  # type: ignore[arg-type]


def test_builtin_profiles_match_issue_9() -> None:
    assert set(BUILTIN_PROFILES) >= {"lan", "wifi-congested", "cellular", "lossy-5pct",
                                     "rtt-500ms", "outage-30s", "carrier-switch"}
    cellular = BUILTIN_PROFILES["cellular"].conditions
    assert cellular.delay_ms == 300 and cellular.loss == 0.02
    assert BUILTIN_PROFILES["outage-30s"].outages[0].duration_s == 30
    assert BUILTIN_PROFILES["carrier-switch"].address_change
    assert BUILTIN_PROFILES["lan"].conditions.is_clear


def test_netem_argv_exact() -> None:
    argv = netem_argv("eth1", Conditions(loss=0.02, delay_ms=300, jitter_ms=30, rate_kbit=1000))
    assert argv == ["tc", "qdisc", "replace", "dev", "eth1", "root", "handle", NETEM_HANDLE,
                    "netem", "limit", "1000", "delay", "300ms", "30ms", "distribution", "normal",
                    "loss", "2%", "rate", "1000kbit"]
    assert netem_argv("veth0", Conditions(loss=0.05), netns="ns1") == [
        "tc", "-n", "ns1", "qdisc", "replace", "dev", "veth0", "root", "handle", NETEM_HANDLE,
        "netem", "limit", "1000", "loss", "5%"]


def test_netem_limit_covers_bandwidth_delay_product() -> None:
    # 500 ms at an assumed 1 Gbit/s is ~42k packets in flight: the default 1000 would drop.
    argv = netem_argv("eth1", Conditions(delay_ms=500))
    assert int(argv[argv.index("limit") + 1]) >= 41_000


def test_apply_saves_record_before_changing(tmp_path: Path) -> None:
    tc = FakeTc()
    seen_record: list[bool] = []

    def runner(argv: Sequence[str]) -> RunResult:
        if "replace" in argv:
            seen_record.append(bool(read_records(tmp_path / "state")))
        return tc(argv)

    ctl = NetemController("eth1", runner=runner, state_dir=tmp_path / "state",
                          check_privilege=lambda: True)
    with ctl:
        ctl.apply(Conditions(delay_ms=100))
        assert seen_record == [True]
        (record,) = read_records(tmp_path / "state")
        assert record.interface == "eth1" and record.original[0]["kind"] == "pfifo_fast"
    assert tc.calls[-2] == ["tc", "qdisc", "del", "dev", "eth1", "root"]
    assert tc.root == DEFAULT_ROOT
    assert read_records(tmp_path / "state") == []


def test_outage_is_total_loss_and_keeps_steady_conditions(tmp_path: Path) -> None:
    tc = FakeTc()
    with controller(tmp_path, tc) as ctl:
        ctl.apply(Conditions(delay_ms=80))
        ctl.outage_start()
        assert tc.calls[-1][-4:] == ["delay", "80ms", "loss", "100%"]
        ctl.apply(Conditions(delay_ms=90))  # changed during the cut: still cut
        assert tc.calls[-1][-2:] == ["loss", "100%"]
        ctl.outage_end(address_change=True)
        assert cut_flows_argv("eth1") in tc.calls
        assert tc.calls[-1][-2:] == ["delay", "90ms"]


def test_clear_conditions_restore_original(tmp_path: Path) -> None:
    tc = FakeTc()
    with controller(tmp_path, tc) as ctl:
        ctl.apply(BUILTIN_PROFILES["cellular"].conditions)
        ctl.apply(BUILTIN_PROFILES["lan"].conditions)
        assert tc.root == DEFAULT_ROOT
        assert read_records(tmp_path / "state") == []


def test_missing_privilege_is_clear_and_changes_nothing(tmp_path: Path) -> None:
    tc = FakeTc()
    ctl = NetemController("eth1", runner=tc, state_dir=tmp_path, check_privilege=lambda: False)
    with pytest.raises(InfrastructureError, match="CAP_NET_ADMIN") as info:
        ctl.apply(Conditions(loss=0.1))
    assert "setcap" in str(info.value) and "root" in str(info.value)
    assert not any("replace" in c for c in tc.calls) and read_records(tmp_path) == []
    ctl.release()


def test_tc_permission_denied_maps_to_privilege_error(tmp_path: Path) -> None:
    tc = FakeTc(fail="RTNETLINK answers: Operation not permitted")
    with controller(tmp_path, tc) as ctl:
        with pytest.raises(InfrastructureError, match="missing CAP_NET_ADMIN"):
            ctl.apply(Conditions(loss=0.1))


def test_kernel_without_netem_says_so(tmp_path: Path) -> None:
    tc = FakeTc(fail="Error: Specified qdisc kind is unknown.")
    with controller(tmp_path, tc) as ctl:
        with pytest.raises(InfrastructureError, match="no netem") as info:
            ctl.apply(Conditions(loss=0.1))
    assert "sch_netem" in str(info.value)


def test_custom_root_qdisc_is_refused(tmp_path: Path) -> None:
    tc = FakeTc(root=[{"kind": "htb", "handle": "1:", "root": True}])
    with controller(tmp_path, tc) as ctl, pytest.raises(UsageError, match="custom root qdisc"):
        ctl.apply(Conditions(loss=0.1))


def test_has_net_admin_reads_capeff() -> None:
    assert has_net_admin("CapEff:\t000001ffffffffff\n")
    assert not has_net_admin("CapEff:\t0000000000000000\n")
    assert has_net_admin("CapEff:\t0000000000001000\n")


def test_leftover_of_dead_holder_is_repaired_on_acquire(tmp_path: Path) -> None:
    tc = FakeTc()
    first = controller(tmp_path, tc)
    first.apply(Conditions(delay_ms=100))
    # Simulate death: the lock goes (the kernel drops flocks of dead processes), record stays.
    first._lock.release()
    assert tc.root[0]["handle"] == NETEM_HANDLE
    with controller(tmp_path, tc):
        assert tc.root == DEFAULT_ROOT
    assert read_records(tmp_path / "state") == []


def test_reset_all_leaves_live_holders_alone(tmp_path: Path) -> None:
    tc = FakeTc()
    with controller(tmp_path, tc) as ctl:
        ctl.apply(Conditions(delay_ms=100))
        (outcome,) = reset_all(tmp_path / "state", tc)
        assert outcome.ok and outcome.outcome.startswith("skipped")
        assert tc.root[0]["handle"] == NETEM_HANDLE
        (outcome,) = reset_all(tmp_path / "state", tc, force=True)
        assert outcome.outcome == "restored" and tc.root == DEFAULT_ROOT


def test_rack_profiles_merge(tmp_path: Path) -> None:
    rack = tmp_path / "rack.yaml"
    rack.write_text(
        "version: 1\nname: r\nboards: []\nnetwork_profiles:\n"
        "  cellular: {loss: 3%}\n"
        "  satellite: {extends: rtt-500ms, delay: 600ms, jitter: 40ms, rate: 512kbit}\n"
        "  flaky: {outage: [{at: 1, duration: 2}, 4]}\n")
    profiles = load_profiles(rack)
    assert profiles["cellular"].conditions == Conditions(loss=0.03, delay_ms=300, jitter_ms=30,
                                                         rate_kbit=1000)
    assert profiles["satellite"].conditions == Conditions(delay_ms=600, jitter_ms=40,
                                                          rate_kbit=512)
    assert [(o.start_s, o.duration_s) for o in profiles["flaky"].outages] == [(1, 2), (5, 4)]
    assert "rack.yaml:6" in profiles["satellite"].source


@pytest.mark.parametrize(("body", "match"), [
    ("  x: {loss: 150%}\n", "loss"),
    ("  x: {delay: fast}\n", "delay"),
    ("  x: {lose: 1%}\n", "unknown keys"),
    ("  x: {extends: nope}\n", "unknown profile"),
])
def test_bad_rack_profiles_name_file_and_line(tmp_path: Path, body: str, match: str) -> None:
    rack = tmp_path / "rack.yaml"
    rack.write_text("version: 1\nnetwork_profiles:\n" + body)
    with pytest.raises(ConfigError, match=match) as info:
        load_profiles(rack)
    assert f"{rack}:3" in str(info.value)
