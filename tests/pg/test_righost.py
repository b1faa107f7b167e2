"""Two rig hosts on one machine (separate processes, each with its own virtual rack daemon).

Registration and liveness in the database, the authenticated control API, remote flashing with
the real esptool through the upload path and through rfc2217://, and a rig host that dies or stops.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_hilfarm.drivers.flashing import flash
from pytest_hilfarm.drivers.rigclient import RemotePower, RemoteReset, RigClient, remote_flasher
from pytest_hilfarm.errors import ConfigError, ReservationTimeout
from pytest_hilfarm.reservation.allocate import BoardRequest
from pytest_hilfarm.reservation.postgresql import PgReserver
from pytest_hilfarm.sim import manager
from pytest_hilfarm.sim.appbuild import build_app
from pytest_hilfarm.store.postgresql import PgFarmStore

pytest.importorskip("psycopg")

TOKEN = "test-token-0123456789abcdef"

RACK = """\
version: 1
name: {name}
state_dir: {state}
boards:
{boards}
"""
BOARD = """\
  - id: {id}
    chip: {chip}
    port: virtual
    reset: virtual
    power: virtual
    flash: {{size: 4MB}}
    features: [{features}]
"""


@dataclass
class Rig:
    name: str
    proc: subprocess.Popen[str]
    control_url: str
    ports: dict[str, str]
    sim_dir: Path


def _write_rack(path: Path, name: str, boards: list[tuple[str, str]]) -> None:
    text = RACK.format(name=name, state=path.parent / f"{name}-state", boards="".join(
        BOARD.format(id=i, chip=c, features="remote") for i, c in boards))
    path.write_text(text)


def _start_rig(tmp: Path, url: str, name: str, boards: list[tuple[str, str]],
               auth: list[str] | None = None) -> Rig:
    rack = tmp / f"{name}.yaml"
    _write_rack(rack, name, boards)
    sim_dir = tmp / f"{name}-sim"
    manager.up(rack, sim_dir)
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    env = {**os.environ, "HILFARM_SIM_DIR": str(sim_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest_hilfarm.cli.export", "--rack", str(rack),
         "--listen", "127.0.0.1:0", "--database", url,
         *(auth if auth is not None else ["--token-file", str(token_file)]),
         "--host-name", name, "--heartbeat", "0.5", "--offline-after", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if len([x for x in lines if "rfc2217://" in x]) == len(boards):
            break
    control = next((x.split()[-1] for x in lines if "control API" in x), None)
    assert control, "rig host did not start:\n" + "\n".join(lines)
    ports = {x.split()[0]: x.split()[-1] for x in lines if "rfc2217://" in x}
    return Rig(name, proc, control, ports, sim_dir)


@pytest.fixture(scope="module")
def farm(pg_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    url = pg_server.new_database()
    tmp = tmp_path_factory.mktemp("rigs")
    rigs = {}
    try:
        rigs["rig-a"] = _start_rig(tmp, url, "rig-a", [("a-esp32-1", "esp32"),
                                                       ("a-esp32c3-1", "esp32c3")])
        rigs["rig-b"] = _start_rig(tmp, url, "rig-b", [("b-esp32-1", "esp32")])
        yield {"url": url, "rigs": rigs, "tmp": tmp}
    finally:
        for rig in rigs.values():
            if rig.proc.poll() is None:
                rig.proc.terminate()
                try:
                    rig.proc.wait(10)
                except subprocess.TimeoutExpired:
                    rig.proc.kill()
            manager.down(rig.sim_dir)


def client(farm: dict[str, Any], rig: str, token: str | None = TOKEN) -> RigClient:
    return RigClient(farm["rigs"][rig].control_url, token, timeout=60)


def test_both_hosts_register_their_boards(farm: dict[str, Any]) -> None:
    store = PgFarmStore(farm["url"])
    hosts = store.hosts()
    assert hosts["rig-a"].online and hosts["rig-b"].online
    boards = store.registered_boards()
    assert {b: r.host for b, r in boards.items()} == {
        "a-esp32-1": "rig-a", "a-esp32c3-1": "rig-a", "b-esp32-1": "rig-b"}
    assert boards["b-esp32-1"].port_url == farm["rigs"]["rig-b"].ports["b-esp32-1"]
    # One client reserves boards of both hosts at once.
    reserver = PgReserver(farm["url"], store)
    with reserver.reserve(BoardRequest(2, "esp32", frozenset({"remote"})), timeout=5) as lease:
        assert set(lease.boards) == {"a-esp32-1", "b-esp32-1"}
        status = {s.status.board: s for s in reserver.host_status()}
        assert status["b-esp32-1"].host == "rig-b" and status["b-esp32-1"].online


def test_unauthenticated_requests_are_refused(farm: dict[str, Any]) -> None:
    rig = farm["rigs"]["rig-a"]
    assert client(farm, "rig-a").ping() == {"host": "rig-a"}
    for token in (None, "wrong-token-0123456789"):
        anonymous = client(farm, "rig-a", token)
        with pytest.raises(ConfigError, match="missing or wrong token"):
            anonymous.ping()  # even liveness: every endpoint needs the token
        with pytest.raises(ConfigError, match="missing or wrong token") as info:
            anonymous.power("a-esp32-1", False)
        assert "Authorization: Bearer" in str(info.value)
        with pytest.raises(ConfigError, match="missing or wrong token"):
            anonymous.flash("a-esp32-1", build_app("esp32", "nope", "1.0"))
    host, port = rig.control_url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/v1/boards/a-esp32-1/reset", body=b"{}")
    response = conn.getresponse()
    assert response.status == 401 and b"Bearer" in response.read()
    assert response.getheader("WWW-Authenticate")


def _board_state(rig: Any, board: str) -> dict[str, Any]:
    info = manager.status(rig.sim_dir)
    assert info is not None
    return next(b for b in info["boards"] if b["id"] == board)


def test_remote_flash_through_the_upload_path(farm: dict[str, Any]) -> None:
    rig = client(farm, "rig-a")
    image = build_app("esp32", "uploaded", "1.0")
    started = time.monotonic()
    report = rig.flash("a-esp32-1", image)
    first = time.monotonic() - started
    assert report.chip == "esp32" and report.written and report.regions[0].size == len(image)
    # Same content again: not uploaded again, and esptool skips the identical region.
    digest, sent = rig.upload(image)
    assert not sent and rig.has_image(digest)
    again = remote_flasher(rig, "a-esp32-1")("ignored", "esp32", image)
    assert again.skipped and not again.written
    assert first < 20
    RemotePower(rig, "a-esp32-1").cycle(0.05)
    RemoteReset(rig, "a-esp32-1").reset_to_download()
    assert _board_state(farm["rigs"]["rig-a"], "a-esp32-1")["mode"] == "download"
    RemoteReset(rig, "a-esp32-1").reset_to_app()


def test_remote_flash_through_rfc2217_with_dtr_rts(farm: dict[str, Any]) -> None:
    rig = farm["rigs"]["rig-a"]
    url = rig.ports["a-esp32c3-1"]
    image = build_app("esp32c3", "overrfc", "2.0")
    # Without an authenticated attach the port hangs up at once: no anonymous flashing.
    from pytest_hilfarm.errors import PortError

    with pytest.raises(PortError, match="cannot connect"):
        flash(url, "esp32c3", image, connect_attempts=1, baud=115200)
    assert client(farm, "rig-a").attach("a-esp32c3-1") == url
    # esptool's own default reset over RFC 2217: DTR/RTS must reach EN/IO0 on the rig host.
    report = flash(url, "esp32c3", image, before="default-reset", after="hard-reset",
                   baud=115200)
    assert report.written and report.port == url
    assert _board_state(rig, "a-esp32c3-1")["mode"] != "download"  # hard reset booted it


def test_a_busy_board_refuses_a_second_client(farm: dict[str, Any]) -> None:
    from pytest_hilfarm.drivers.transports import open_port
    from pytest_hilfarm.errors import InfrastructureError

    rig = farm["rigs"]["rig-b"]
    client(farm, "rig-b").attach("b-esp32-1")
    port = open_port(rig.ports["b-esp32-1"], 115200, timeout=0.1)
    try:
        time.sleep(0.3)
        with pytest.raises(InfrastructureError, match="in use by RFC 2217 client"):
            client(farm, "rig-b").flash("b-esp32-1", build_app("esp32", "busy", "1.0"))
    finally:
        port.close()


def test_rig_host_refuses_a_lease_that_no_longer_holds_the_board(farm: dict[str, Any]) -> None:
    from pytest_hilfarm.drivers.rigclient import client_for_board
    from pytest_hilfarm.errors import InfrastructureError

    store = PgFarmStore(farm["url"])
    reserver = PgReserver(farm["url"], store)
    lease = reserver.reserve(BoardRequest(1, only=frozenset({"a-esp32-1"})), timeout=5)
    rig = client_for_board(store, "a-esp32-1", TOKEN, lease=lease.id)
    rig.reset("a-esp32-1", "flash")  # the lease holds it: accepted
    lease.release()
    with pytest.raises(InfrastructureError, match="does not hold board a-esp32-1"):
        rig.reset("a-esp32-1", "flash")


def test_a_hung_rig_host_goes_offline_after_its_heartbeat_ages(farm: dict[str, Any]) -> None:
    store = PgFarmStore(farm["url"])
    rig_b = farm["rigs"]["rig-b"]
    os.kill(rig_b.proc.pid, signal.SIGSTOP)  # alive, connection open, but no heartbeat
    try:
        assert store.hosts()["rig-b"].online
        time.sleep(3.5)  # --offline-after 3
        assert not store.hosts()["rig-b"].online
    finally:
        os.kill(rig_b.proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 5
    while not store.hosts()["rig-b"].online and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.hosts()["rig-b"].online


def test_rig_hosts_that_stop_or_die_go_offline(farm: dict[str, Any]) -> None:
    store = PgFarmStore(farm["url"])
    reserver = PgReserver(farm["url"], store)
    rig_b = farm["rigs"]["rig-b"]
    os.kill(rig_b.proc.pid, signal.SIGKILL)
    rig_b.proc.wait(10)
    # The server drops its liveness lock with the process: offline at once, not after 3 s.
    deadline = time.monotonic() + 1.5
    while store.hosts()["rig-b"].online and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not store.hosts()["rig-b"].online
    with pytest.raises(ReservationTimeout, match="rig host rig-b is offline"):
        reserver.reserve(BoardRequest(1, only=frozenset({"b-esp32-1"})), timeout=0.3)
    rig_a = farm["rigs"]["rig-a"]
    rig_a.proc.send_signal(signal.SIGTERM)
    assert rig_a.proc.wait(15) == 0
    record = store.hosts()["rig-a"]
    assert not record.online and record.stopped_at is not None
    with pytest.raises(ReservationTimeout, match="offline"):
        reserver.reserve(BoardRequest(1, "esp32"), timeout=0.3)


def test_refuses_to_start_without_authentication(pg_url: str, tmp_path: Path) -> None:
    rack = tmp_path / "r.yaml"
    _write_rack(rack, "rig-x", [("x-esp32-1", "esp32")])
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_hilfarm.cli.export", "--rack", str(rack),
         "--database", pg_url], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2  # a configuration error (README exit codes)
    assert "refusing to serve power and flash control without authentication" in proc.stderr
    assert "--token-file" in proc.stderr


def _certificates(tmp: Path) -> dict[str, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    paths: dict[str, Path] = {}

    def make(name: str, issuer: Any, issuer_key: Any, ca: bool) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(issuer.subject if issuer is not None else subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())
        paths[name + ".pem"] = tmp / f"{name}.pem"
        paths[name + ".pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[name + ".key"] = tmp / f"{name}.key"
        paths[name + ".key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return cert, key

    ca, ca_key = make("ca", None, None, True)
    make("server", ca, ca_key, False)
    make("client", ca, ca_key, False)
    return paths


def test_tls_client_certificates_replace_the_token(pg_url: str, tmp_path: Path) -> None:
    import ssl

    from pytest_hilfarm.errors import InfrastructureError

    certs = _certificates(tmp_path)
    rig = _start_rig(tmp_path, pg_url, "rig-tls", [("t-esp32-1", "esp32")], auth=[
        "--tls-cert", str(certs["server.pem"]), "--tls-key", str(certs["server.key"]),
        "--tls-client-ca", str(certs["ca.pem"])])
    try:
        assert rig.control_url.startswith("https://")
        with_cert = ssl.create_default_context(cafile=str(certs["ca.pem"]))
        with_cert.load_cert_chain(str(certs["client.pem"]), str(certs["client.key"]))
        good = RigClient(rig.control_url, None, ssl_context=with_cert, timeout=20)
        assert [b["id"] for b in good.boards()] == ["t-esp32-1"]
        good.reset("t-esp32-1", "flash")
        without = ssl.create_default_context(cafile=str(certs["ca.pem"]))
        with pytest.raises(InfrastructureError, match="cannot reach the rig host"):
            RigClient(rig.control_url, None, ssl_context=without, timeout=20).power(
                "t-esp32-1", False)
    finally:
        rig.proc.terminate()
        rig.proc.wait(10)
        manager.down(rig.sim_dir)
