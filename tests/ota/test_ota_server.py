"""OtaServer: publishing, Range requests, faults (drop, slow, status) and the request log."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pytest_hilfarm.errors import UsageError
from pytest_hilfarm.ota.server import OtaServer, _parse_range

DATA = bytes(range(256)) * 100  # 25600 bytes


@pytest.fixture
def server():
    with OtaServer() as srv:
        yield srv


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_listens_on_loopback_ephemeral_port(server: OtaServer) -> None:
    host, port = server.address
    assert host == "127.0.0.1" and port > 0
    assert server.url_for("a.bin") == f"http://127.0.0.1:{port}/a.bin"


def test_publish_bytes_path_and_manifest(server: OtaServer, tmp_path: Path) -> None:
    url = server.publish("fw/app.bin", DATA)
    status, headers, body = get(url)
    assert (status, body) == (200, DATA)
    assert headers["Content-Length"] == str(len(DATA)) and headers["Accept-Ranges"] == "bytes"
    f = tmp_path / "image.bin"
    f.write_bytes(b"\xe9" + b"x" * 99)
    assert get(server.publish("image.bin", f))[2] == f.read_bytes()
    status, headers, body = get(server.publish("release.json", {"version": "1.2.3"}))
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"version": "1.2.3"}
    assert server.names() == ["fw/app.bin", "image.bin", "release.json"]


def test_range_requests(server: OtaServer) -> None:
    url = server.publish("a.bin", DATA)
    status, headers, body = get(url, {"Range": "bytes=1000-"})
    assert status == 206 and body == DATA[1000:]
    assert headers["Content-Range"] == f"bytes 1000-{len(DATA) - 1}/{len(DATA)}"
    assert get(url, {"Range": "bytes=10-19"})[2] == DATA[10:20]
    assert get(url, {"Range": "bytes=-5"})[2] == DATA[-5:]
    status, headers, _ = get(url, {"Range": f"bytes={len(DATA)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(DATA)}"


@pytest.mark.parametrize("header, size, expected", [
    ("bytes=0-", 10, (0, 10)), ("bytes=3-5", 10, (3, 6)), ("bytes=8-100", 10, (8, 10)),
    ("bytes=-3", 10, (7, 10)), ("bytes=10-", 10, None), ("bytes=5-2", 10, None),
    ("bytes=0-1,4-5", 10, None), ("items=0-1", 10, None), ("bytes=-", 10, None),
])
def test_parse_range(header: str, size: int, expected: tuple[int, int] | None) -> None:
    assert _parse_range(header, size) == expected


def test_unknown_name_is_404_and_logged(server: OtaServer) -> None:
    status, _, body = get(server.url_for("nope.bin"))
    assert status == 404 and b"nope.bin" in body
    (record,) = server.wait_requests(1)
    assert (record.method, record.path, record.status, record.name) == ("GET", "/nope.bin", 404,
                                                                       None)


def test_fail_and_clear(server: OtaServer) -> None:
    url = server.publish("a.bin", DATA)
    server.fail("a.bin", 500)
    assert get(url)[0] == 500
    server.fail("a.bin", None)
    assert get(url)[0] == 200


def test_drop_after_closes_mid_body_then_serves(server: OtaServer) -> None:
    url = server.publish("a.bin", DATA)
    server.drop_after("a.bin", 5000)
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request("GET", "/a.bin")
    resp = conn.getresponse()
    got = b""
    with pytest.raises(http.client.IncompleteRead):
        got = resp.read()
    conn.close()
    assert got == b""
    status, _, body = get(url, {"Range": "bytes=5000-"})
    assert status == 206 and body == DATA[5000:]
    first, second = server.wait_requests(2, name="a.bin")
    assert first.dropped and first.bytes_sent == 5000
    assert not second.dropped and second.range == "bytes=5000-"
    assert server.bytes_served("a.bin") == len(DATA)
    with pytest.raises(UsageError, match="2 of 3 expected requests"):
        server.wait_requests(3, name="a.bin", timeout=0.1)


def test_drop_times(server: OtaServer) -> None:
    url = server.publish("a.bin", DATA)
    server.drop_after("a.bin", 100, times=2)
    for _ in range(2):
        with pytest.raises(http.client.IncompleteRead):
            urllib.request.urlopen(url, timeout=5).read()
    assert get(url)[2] == DATA


def test_slow_paces_the_body(server: OtaServer) -> None:
    url = server.publish("a.bin", DATA[:8192])
    server.slow("a.bin", 40_000)
    began = time.monotonic()
    assert get(url)[2] == DATA[:8192]
    assert time.monotonic() - began >= 0.15  # 8 KiB at 40 kB/s ~ 0.2 s


def test_head(server: OtaServer) -> None:
    server.publish("a.bin", DATA)
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request("HEAD", "/a.bin")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Length") == str(len(DATA))
    assert resp.read() == b""
    conn.close()


def test_usage_errors(server: OtaServer, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="plain file name"):
        server.publish("../etc/passwd", b"x")
    with pytest.raises(UsageError, match="cannot read"):
        server.publish("x.bin", tmp_path / "missing.bin")
    with pytest.raises(UsageError, match="nothing is published"):
        server.drop_after("missing.bin", 10)
    with pytest.raises(UsageError, match="bytes_per_s"):
        server.publish("y.bin", b"y")
        server.slow("y.bin", 0)
    stopped = OtaServer()
    with pytest.raises(UsageError, match="not running"):
        _ = stopped.base_url


def test_stop_is_idempotent_and_frees_the_port() -> None:
    srv = OtaServer().start()
    url = srv.publish("a.bin", b"abc")
    srv.stop()
    srv.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


def test_ignore_range_sends_the_whole_file(server: OtaServer) -> None:
    url = server.publish("a.bin", DATA)
    server.set_faults("a.bin", ignore_range=True)
    status, headers, body = get(url, {"Range": "bytes=100-"})
    assert status == 200 and body == DATA and "Content-Range" not in headers
