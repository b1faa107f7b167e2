"""DemoApp: app start, boot faults, OTA self-test, every console command and its format, mesh."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import replace

import pytest
from simfakes import FakeClock, FakeScheduler

from pytest_hilfarm.sim.app import DemoApp, battery_values, panic_text, sensor_values
from pytest_hilfarm.sim.mesh import MeshMedium
from pytest_hilfarm.sim.model import AppInfo, Faults

LOG_LINE = re.compile(r"^[IWE] \(\d+\) [\w-]+: ")


class FakeHost:
    def __init__(
        self, sched: FakeScheduler, board_id: str = "esp32-1", chip: str = "esp32", mac: str = ""
    ) -> None:
        self.sched = sched
        self.board_id = board_id
        self.chip = chip
        self.mac = mac or "24:0a:c4:00:00:01"
        self.out: list[str] = []
        self.reboots: list[str] = []
        self.panics: list[str] = []
        self.valid_calls = 0
        self.invalid_calls = 0

    @property
    def text(self) -> str:
        return "".join(self.out)

    def emit(self, text: str) -> None:
        self.out.append(text)

    def reboot(self, reason: str) -> None:
        self.reboots.append(reason)

    def panic(self, text: str) -> None:
        self.panics.append(text)

    def mark_app_valid(self) -> None:
        self.valid_calls += 1

    def mark_app_invalid_and_reboot(self) -> None:
        self.invalid_calls += 1

    def now(self) -> float:
        return self.sched.clock.t

    def call_later(self, delay: float, func: Callable[[], None]) -> None:
        self.sched(delay, func)


def info(**kwargs: object) -> AppInfo:
    base = AppInfo(
        project="demo",
        version="1.2.3",
        secure_version=2,
        idf_ver="v5.2.1",
        chip="esp32",
        partition_label="ota_0",
        partition_offset=0x110000,
        partition_size=0x100000,
        image_sha256="ab" * 32,
    )
    return replace(base, **kwargs)  # type: ignore[arg-type]


def boot(
    app_info: AppInfo | None = None, medium: MeshMedium | None = None, **host_kw: str
) -> tuple[DemoApp, FakeHost]:
    sched = FakeScheduler(FakeClock(1000.0))
    host = FakeHost(sched, **host_kw)
    app = DemoApp(host, app_info or info(), medium)
    app.start()
    return app, host


def command(app: DemoApp, host: FakeHost, line: str) -> list[str]:
    """Feed one line; return the reply lines between the echo and the prompt."""
    host.out.clear()
    app.feed_line(line)
    text = host.text
    assert text.startswith(line.strip() + "\r\n"), text
    assert text.endswith("\r\n> "), text
    body = text[len(line.strip()) + 2 : -2]
    assert body.endswith("\r\n") or body == ""
    return body.split("\r\n")[:-1]


def kv(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


# ---------------------------------------------------------------------------- start


def test_start_prints_app_start_ready_and_prompt() -> None:
    _, host = boot()
    text = host.text
    lines = text.split("\r\n")
    # The ESP-IDF startup lines come from the boot chain; the app adds no second copy.
    assert not any("Calling app_main()" in line or "app_init:" in line for line in lines)
    assert "I (312) hilfarm-demo: running partition ota_0 at 0x110000, ota_state none" in lines
    assert "I (312) hilfarm-demo: demo 1.2.3 ready" in lines
    assert text.endswith("ready\r\n> ")
    assert "\n" not in text.replace("\r\n", "")  # CRLF only
    assert all(LOG_LINE.match(line) for line in lines[:-1])
    assert host.panics == [] and host.reboots == [] and host.valid_calls == 0


def test_start_twice_is_an_error() -> None:
    app, _ = boot()
    with pytest.raises(RuntimeError):
        app.start()


# ---------------------------------------------------------------------------- faults


def test_crash_at_boot_panics_after_a_few_lines() -> None:
    app, host = boot(info(faults=Faults(crash_at_boot=True), elf_sha256="5e" * 32))
    assert "hilfarm-demo: initializing" in host.text
    assert "ready" not in host.text
    (panic,) = host.panics
    assert panic.startswith(
        "Guru Meditation Error: Core  0 panic'ed (LoadProhibited). Exception was unhandled.\r\n"
    )
    assert "Core  0 register dump:" in panic and "Backtrace: 0x" in panic
    assert panic.endswith("Rebooting...\r\n")
    # The app descriptor's app_elf_sha256, not the image's hash ("ab" * 32).
    assert "ELF file SHA256: " + "5e" * 8 + "\r\n" in panic
    host.out.clear()
    app.feed_line("version")
    assert host.out == []


def test_crash_text_on_riscv_chip() -> None:
    elf = "0f" * 32
    text = panic_text("esp32c3", "cd" * 32, store=False, elf_sha256=elf)
    assert "panic'ed (Load access fault)" in text and "MEPC    : 0x42" in text
    assert "panic'ed (Store access fault)" in panic_text("esp32c3", "cd" * 32, store=True,
                                                          elf_sha256=elf)
    xtensa = panic_text("esp32", "cd" * 32, store=False, elf_sha256=elf)
    assert xtensa == panic_text("esp32", "cd" * 32, store=False,
                                elf_sha256=elf)  # one image, one crash


def test_crash_report_names_the_elf_hash_not_the_image_hash() -> None:
    # ESP-IDF's panic handler prints esp_app_desc_t.app_elf_sha256; the image's validation hash
    # (the SHA-256 appended to the .bin) is another number.
    text = panic_text("esp32", "cd" * 32, store=True, elf_sha256="0123456789abcdef" * 4)
    assert "ELF file SHA256: 0123456789abcdef\r\n" in text
    assert "cdcdcdcd" not in text.split("ELF file SHA256:")[1]


def test_hang_at_boot_stops_output_and_watchdog_fires_every_5s() -> None:
    app, host = boot(info(faults=Faults(hang_at_boot=True)))
    assert "I (312) hilfarm-demo: initializing" in host.text
    assert "ready" not in host.text and "> " not in host.text
    host.out.clear()
    app.feed_line("version")
    host.sched.advance(4.9)
    assert host.out == []
    host.sched.advance(0.2)
    assert host.text.startswith(
        "E (5312) task_wdt: Task watchdog got triggered. The following tasks/users did not "
        "reset the watchdog in time:\r\n"
    )
    assert "E (5312) task_wdt:  - IDLE0 (CPU 0)\r\n" in host.text
    host.out.clear()
    host.sched.advance(5.0)
    assert host.text.startswith("E (10312) task_wdt: Task watchdog got triggered.")
    app.stop()
    host.out.clear()
    host.sched.advance(20.0)
    assert host.out == []


def test_slow_boot_delays_ready_line() -> None:
    app, host = boot(info(faults=Faults(slow_boot=4.0)))
    assert "ready" not in host.text
    app.feed_line("version")  # console not up yet: discarded
    assert "project:" not in host.text
    host.sched.advance(3.9)
    assert "ready" not in host.text
    host.sched.advance(0.2)
    assert "I (4312) hilfarm-demo: demo 1.2.3 ready\r\n> " in host.text
    assert kv(command(app, host, "version"))["project"] == "demo"


def test_self_test_passes_and_marks_valid_when_pending_verify() -> None:
    app, host = boot(info(ota_state="PENDING_VERIFY"))
    assert "I (312) hilfarm-demo: self-test passed, marking app valid\r\n" in host.text
    assert host.valid_calls == 1 and host.invalid_calls == 0
    assert kv(command(app, host, "status"))["ota_state"] == "VALID"


def test_self_test_fails_and_rolls_back_when_pending_verify() -> None:
    app, host = boot(info(ota_state="PENDING_VERIFY", faults=Faults(fail_self_test=True)))
    assert "E (312) hilfarm-demo: self-test failed, rolling back\r\n" in host.text
    assert host.invalid_calls == 1 and host.valid_calls == 0
    assert "ready" not in host.text
    host.out.clear()
    app.feed_line("status")
    assert host.out == []


@pytest.mark.parametrize("state", [None, "VALID", "UNDEFINED"])
def test_self_test_only_runs_for_pending_verify(state: str | None) -> None:
    app, host = boot(info(ota_state=state, faults=Faults(fail_self_test=True)))
    assert "self-test" not in host.text
    assert host.invalid_calls == 0 and host.valid_calls == 0
    assert "ready\r\n> " in host.text


def test_slow_boot_self_test_happens_after_the_delay() -> None:
    _, host = boot(info(ota_state="PENDING_VERIFY", faults=Faults(slow_boot=2.0)))
    assert host.valid_calls == 0
    host.sched.advance(2.0)
    assert host.valid_calls == 1
    assert "I (2312) hilfarm-demo: self-test passed" in host.text


# ---------------------------------------------------------------------------- commands


def test_version_format() -> None:
    app, host = boot(info(partition_label="ota_1", partition_offset=0x210000))
    reply = command(app, host, "version")
    assert reply == [
        "project: demo",
        "version: 1.2.3",
        "secure_version: 2",
        "idf_ver: v5.2.1",
        "chip: esp32",
        "partition: ota_1",
        "partition_offset: 0x210000",
    ]


def test_status_format_and_uptime() -> None:
    app, host = boot(info(partition_label="factory"))
    host.sched.advance(10.0)
    reply = kv(command(app, host, "status"))
    assert list(reply) == ["uptime_s", "heap_free", "partition", "ota_state", "mesh_joined"]
    assert reply["uptime_s"] == "10.312"
    assert 200_000 < int(reply["heap_free"]) < 400_000
    assert reply["partition"] == "factory"
    assert reply["ota_state"] == "none"
    assert reply["mesh_joined"] == "no"


def test_sensor_format_plausible_and_deterministic() -> None:
    app, host = boot()
    reply = command(app, host, "sensor")
    assert [line.split(":")[0] for line in reply] == [
        "temperature_c",
        "humidity_pct",
        "pressure_hpa",
    ]
    assert all(re.fullmatch(r"[a-z_]+: -?\d+\.\d\d", line) for line in reply)
    values = {k: float(v) for k, v in kv(reply).items()}
    assert 15 < values["temperature_c"] < 30
    assert 25 < values["humidity_pct"] < 70
    assert 990 < values["pressure_hpa"] < 1035
    # Same MAC and time -> same values; another MAC -> other values.
    app2, host2 = boot()
    assert command(app2, host2, "sensor") == reply
    app3, host3 = boot(mac="24:0a:c4:00:00:02")
    assert command(app3, host3, "sensor") != reply
    host.sched.advance(600.0)
    assert command(app, host, "sensor") != reply
    for t in range(0, 100_000, 997):
        temp, hum, press = sensor_values("aa:bb:cc:dd:ee:ff", float(t))
        assert 17 <= temp <= 29 and 28 <= hum <= 66 and 997 <= press <= 1028


def test_battery_format_and_drain() -> None:
    app, host = boot()
    first = kv(command(app, host, "battery"))
    assert re.fullmatch(r"\d\.\d{3}", first["battery_v"])
    assert re.fullmatch(r"\d+", first["battery_pct"])
    assert 75 <= int(first["battery_pct"]) <= 99
    host.sched.advance(3600.0)
    later = kv(command(app, host, "battery"))
    assert int(first["battery_pct"]) - int(later["battery_pct"]) in (5, 6, 7)
    assert float(later["battery_v"]) < float(first["battery_v"])
    assert battery_values("aa:bb:cc:dd:ee:ff", 10**7) == (3.3, 0)


def test_help_lists_every_command() -> None:
    app, host = boot()
    reply = command(app, host, "help")
    usages = [line.split(" - ")[0] for line in reply]
    for name in ("version", "status", "sensor", "battery", "reboot", "crash", "help"):
        assert name in usages
    assert "mesh send <node-id|all> <text>" in usages
    assert "mesh nodes" in usages and "mesh inbox [clear]" in usages


def test_unknown_command() -> None:
    app, host = boot()
    assert command(app, host, "frobnicate now") == [
        "error: unknown command 'frobnicate' (try 'help')"
    ]
    assert command(app, host, "mesh") == [
        "error: usage: mesh nodes | mesh send <node-id|all> <text> | mesh inbox [clear]"
    ]
    assert command(app, host, "version extra") == ["error: usage: version"]


def test_empty_line_and_crlf_input() -> None:
    app, host = boot()
    host.out.clear()
    app.feed_line("")
    assert host.text == "\r\n> "
    assert kv(command(app, host, "version\r\n"))["version"] == "1.2.3"


def test_reboot_command() -> None:
    app, host = boot()
    host.out.clear()
    app.feed_line("reboot")
    assert host.reboots == ["console reboot"]
    assert host.text.startswith("reboot\r\nI (312) hilfarm-demo: restart requested from console")
    assert not host.text.endswith("> ")
    host.out.clear()
    app.feed_line("version")
    assert host.out == []


def test_crash_command() -> None:
    app, host = boot()
    host.out.clear()
    app.feed_line("crash")
    (panic,) = host.panics
    assert "Guru Meditation Error: Core  0 panic'ed (StoreProhibited)." in panic
    assert panic.endswith("Rebooting...\r\n")
    assert host.text == "crash\r\n"


def test_mesh_without_radio() -> None:
    app, host = boot()
    assert command(app, host, "mesh nodes") == ["error: no mesh radio"]
    assert command(app, host, "mesh send all hi") == ["error: no mesh radio"]


# ---------------------------------------------------------------------------- mesh


def rack(n: int = 3, faults: Faults | None = None) -> tuple[list[DemoApp], list[FakeHost]]:
    """n apps on one medium, sharing one clock/scheduler (the fake daemon)."""
    sched = FakeScheduler(FakeClock(1000.0))
    medium = MeshMedium(sched.clock, random.Random(0), sched)
    apps, hosts = [], []
    for i in range(1, n + 1):
        host = FakeHost(sched, board_id=f"esp32-{i}", mac=f"24:0a:c4:00:00:0{i}")
        app = DemoApp(host, info(faults=faults or Faults()), medium)
        app.start()
        apps.append(app)
        hosts.append(host)
    return apps, hosts


def test_mesh_nodes_before_and_after_formation() -> None:
    apps, hosts = rack(3)
    assert "I (312) hilfarm-mesh: joining mesh as esp32-1 (position 1)" in hosts[0].text
    assert command(apps[0], hosts[0], "mesh nodes") == ["nodes: 0", "ids:"]
    assert kv(command(apps[0], hosts[0], "status"))["mesh_joined"] == "no"
    assert command(apps[0], hosts[0], "mesh send esp32-2 hi") == ["error: mesh not joined"]
    hosts[0].sched.advance(4.0)
    # Total nodes in the mesh, itself included (esp_mesh_get_total_node_num()).
    assert command(apps[0], hosts[0], "mesh nodes") == ["nodes: 3",
                                                        "ids: esp32-1 esp32-2 esp32-3"]
    assert command(apps[2], hosts[2], "mesh nodes") == ["nodes: 3",
                                                        "ids: esp32-1 esp32-2 esp32-3"]
    assert kv(command(apps[0], hosts[0], "status"))["mesh_joined"] == "yes"


def test_mesh_send_and_inbox_multi_hop() -> None:
    apps, hosts = rack(3)
    sched = hosts[0].sched
    sched.advance(4.0)
    assert command(apps[0], hosts[0], "mesh send esp32-3 hello   mesh world") == [
        "sent: id=1 dst=esp32-3"
    ]
    hosts[2].out.clear()
    sched.advance(1.0)
    # Async rx log starts on a fresh line after the prompt and is not followed by a prompt.
    assert hosts[2].text == "\r\nI (4352) hilfarm-mesh: rx id=1 src=esp32-1 hops=2\r\n"
    assert command(apps[2], hosts[2], "mesh inbox") == [
        "inbox: 1",
        "msg: id=1 src=esp32-1 dst=esp32-3 hops=2 text=hello   mesh world",
    ]
    assert command(apps[1], hosts[1], "mesh inbox") == ["inbox: 0"]
    assert command(apps[2], hosts[2], "mesh inbox clear") == ["cleared: 1"]
    assert command(apps[2], hosts[2], "mesh inbox") == ["inbox: 0"]


def test_mesh_broadcast_and_send_errors() -> None:
    apps, hosts = rack(3)
    hosts[0].sched.advance(4.0)
    assert command(apps[1], hosts[1], "mesh send all ping") == ["sent: id=1 dst=all"]
    hosts[0].sched.advance(1.0)
    for i in (0, 2):
        reply = command(apps[i], hosts[i], "mesh inbox")
        assert reply[1] == "msg: id=1 src=esp32-2 dst=all hops=1 text=ping"
    assert command(apps[0], hosts[0], "mesh send esp32-9 x") == ["error: no route to esp32-9"]
    assert command(apps[0], hosts[0], "mesh send esp32-1 x") == ["error: cannot send to self"]
    assert command(apps[0], hosts[0], "mesh send esp32-2") == [
        "error: usage: mesh send <node-id|all> <text>"
    ]
    assert command(apps[0], hosts[0], "mesh nodes x") == ["error: usage: mesh nodes"]


def test_drop_mesh_fault_drops_received_packets() -> None:
    apps, hosts = rack(2, Faults(drop_mesh=1.0))
    hosts[0].sched.advance(4.0)
    for _ in range(5):
        command(apps[0], hosts[0], "mesh send esp32-2 x")
    hosts[0].sched.advance(1.0)
    assert command(apps[1], hosts[1], "mesh inbox") == ["inbox: 0"]


def test_stop_leaves_mesh_and_ignores_late_packets() -> None:
    apps, hosts = rack(3)
    hosts[0].sched.advance(4.0)
    command(apps[0], hosts[0], "mesh send esp32-3 x")
    apps[2].stop()
    hosts[0].sched.advance(1.0)
    assert "rx" not in hosts[2].text.split("mesh send")[-1]
    assert command(apps[0], hosts[0], "mesh nodes") == ["nodes: 2", "ids: esp32-1 esp32-2"]
    apps[1].stop()
    # Alone but still joined: a mesh of one.
    assert command(apps[0], hosts[0], "mesh nodes") == ["nodes: 1", "ids: esp32-1"]
    apps[1].stop()  # idempotent


def test_reboot_leaves_mesh() -> None:
    apps, hosts = rack(2)
    hosts[0].sched.advance(4.0)
    apps[1].feed_line("reboot")
    assert command(apps[0], hosts[0], "mesh nodes") == ["nodes: 1", "ids: esp32-1"]


def test_position_from_kwarg_host_or_board_id() -> None:
    sched = FakeScheduler(FakeClock(1000.0))
    medium = MeshMedium(sched.clock, None, sched)
    host = FakeHost(sched, board_id="esp32c3-7")
    DemoApp(host, info(), medium).start()
    assert "as esp32c3-7 (position 7)" in host.text
    host2 = FakeHost(sched, board_id="left")
    DemoApp(host2, info(), medium, position=4).start()
    assert "(position 4)" in host2.text
    host3 = FakeHost(sched, board_id="right")
    host3.position = 2  # type: ignore[attr-defined]
    DemoApp(host3, info(), medium).start()
    assert "(position 2)" in host3.text
