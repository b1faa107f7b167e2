"""The dashboard over HTTP on the built-in virtual rack: auth, holders, holds, the queue, the
quarantine view fed by real health sweeps, the report page, ``hilfarm serve`` itself."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from nightly import generate_week

from pytest_hilfarm.cli import main
from pytest_hilfarm.errors import ConfigError
from pytest_hilfarm.farm import Farm
from pytest_hilfarm.services.dashboard import Dashboard, DashboardConfig

TOKEN = "dashboard-token-0123456789"


@pytest.fixture(scope="module")
def served(private_virtual_rack: Any) -> Iterator[tuple[Dashboard, Farm]]:
    farm = Farm.open(start_virtual=False)
    dashboard = Dashboard(farm, DashboardConfig(listen_port=0, token=TOKEN, refresh=0.5))
    dashboard.start()
    try:
        yield dashboard, farm
    finally:
        dashboard.stop()
        farm.close()


def get(dashboard: Dashboard, path: str, auth: str | None = f"Bearer {TOKEN}"
        ) -> tuple[int, dict[str, str], str]:
    port = int(dashboard.url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": auth} if auth else {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()


def status(dashboard: Dashboard) -> dict[str, Any]:
    code, _, body = get(dashboard, "/api/status.json")
    assert code == 200, body
    return {b["board"]: b for b in json.loads(body)["boards"]} | {"_": json.loads(body)}


def test_every_page_needs_the_token_browsers_send_it_as_basic(
        served: tuple[Dashboard, Farm]) -> None:
    dashboard, _ = served
    basic = "Basic " + base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    wrong = "Basic " + base64.b64encode(b"anyone:guess-guess-guess").decode()
    for path in ("/", "/boards/esp32-1", "/report", "/api/status.json", "/nothing"):
        for auth in (None, wrong, "Bearer nope", f"Token {TOKEN}"):
            code, headers, body = get(dashboard, path, auth)
            assert code == 401, (path, auth)
            assert headers["www-authenticate"].startswith("Basic realm=")
            assert "the token of `hilfarm serve --token-file`" in json.loads(body)["hint"]
    assert get(dashboard, "/", basic)[0] == 200
    code, _, body = get(dashboard, "/nothing")
    assert code == 404 and "pages: /" in json.loads(body)["hint"]
    code, _, body = get(dashboard, "/boards/nope")
    assert code == 404 and "no board 'nope'" in body


def test_a_lease_shows_its_holder_and_a_bench_hold_its_person(
        served: tuple[Dashboard, Farm]) -> None:
    dashboard, farm = served
    assert status(dashboard)["esp32-2"]["holder"] is None
    with farm.reserve(1, only=["esp32-2"], test_id="tests/test_x.py::test_holds",
                      timeout=10):
        holder = status(dashboard)["esp32-2"]["holder"]
        assert holder["kind"] == "lease" and holder["test_id"] == "tests/test_x.py::test_holds"
        assert holder["pid"] == os.getpid() and abs(holder["since"] - time.time()) < 10
        _, _, page = get(dashboard, "/")
        assert 'data-board="esp32-2" data-health' in page and \
            "<code>tests/test_x.py::test_holds</code>" in page
        # A second request waits in the queue, and the queue shows it.
        waiter = threading.Thread(target=lambda: farm.reserve(
            1, only=["esp32-2"], timeout=15, reason="waits for esp32-2").release())
        waiter.start()
        deadline = time.monotonic() + 10
        while not status(dashboard)["_"]["queue"] and time.monotonic() < deadline:
            time.sleep(0.1)
        queue = status(dashboard)["_"]["queue"]
        assert len(queue) == 1 and "waits for esp32-2" in queue[0]["owner"]
        assert "Waiting for boards (1)" in get(dashboard, "/?fragment=1")[2]
    waiter.join(15)
    assert status(dashboard)["esp32-2"]["holder"] is None
    farm.reserver.hold("esp32-1", "scope on UART0", "alice")
    try:
        holder = status(dashboard)["esp32-1"]["holder"]
        assert (holder["kind"], holder["user"], holder["reason"]) == (
            "bench", "alice", "scope on UART0")
        assert "at the bench: scope on UART0" in get(dashboard, "/?fragment=1")[2]
    finally:
        farm.reserver.unhold("esp32-1")


def test_a_board_that_fails_three_sweeps_is_quarantined_and_shows_its_log(
        served: tuple[Dashboard, Farm], capsys: pytest.CaptureFixture[str]) -> None:
    dashboard, _ = served
    with Farm.open() as live:  # starts the virtual rack: the sweep really checks boards
        live.control().unplug("esp32-3")
        try:
            for _ in range(3):
                assert main(["health", "--all", "--json"]) == 1
                result = {b["board"]: b for b in json.loads(capsys.readouterr().out)["boards"]}
                assert result["esp32-3"]["checked"] and not result["esp32-3"]["ok"]
                assert result["esp32-1"]["ok"] and result["esp32-1"]["health"] == "GOOD"
            # The fourth sweep leaves the quarantined board alone.
            assert main(["health", "--all"]) == 0
            assert "esp32-3: skipped: quarantined" in capsys.readouterr().out
        finally:
            live.control().plug("esp32-3")
    board = status(dashboard)["esp32-3"]
    assert board["health"] == "QUARANTINED" and "3 failed health checks" in board["reason"]
    (quarantined,) = status(dashboard)["_"]["quarantined"]
    assert quarantined["board"] == "esp32-3" and quarantined["log_path"]
    assert "health check FAILED (QUARANTINED)" in quarantined["log_tail"]
    page = get(dashboard, "/?fragment=1")[2]
    section = page[page.index('<section class="quarantined" data-board="esp32-3">'):]
    assert '<pre class="log">' in section and "is unplugged" in section
    assert "hilfarm board restore esp32-3" in section
    checks = status(dashboard)["_"]["checks"]
    assert sum(1 for c in checks if c["board"] == "esp32-3") == 3
    assert sum(1 for c in checks if c["reason"].startswith("check passed")) >= 4
    board_page = get(dashboard, "/boards/esp32-3")[2]
    assert 'class="state quarantined"' in board_page and "restored" not in board_page
    assert main(["board", "restore", "esp32-3"]) == 0


def test_the_report_page_renders_the_weeks_charts(served: tuple[Dashboard, Farm]) -> None:
    dashboard, farm = served
    planted = generate_week(farm.store, seed=3)
    code, _, page = get(dashboard, "/report?since=8d")
    assert code == 200
    assert page.count('<figure class="suite') == 3 and planted.flaky in page
    assert page.count("<svg") >= 5 and "sick:" in page
    code, _, body = get(dashboard, "/report?since=yesterday-ish")
    assert code == 400 and "neither a span nor a date" in body


def test_a_non_loopback_address_needs_authentication() -> None:
    with pytest.raises(ConfigError, match="without authentication"):
        DashboardConfig("0.0.0.0", 0).check()
    DashboardConfig("0.0.0.0", 0, anonymous=True).check()
    DashboardConfig("0.0.0.0", 0, token=TOKEN).check()
    DashboardConfig("127.0.0.1", 0).check()


def test_hilfarm_serve_runs_until_sigterm(private_virtual_rack: Any) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "pytest_hilfarm", "serve", "--listen",
                             "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "hilfarm serve: dashboard of rack 'virtual' at http://127.0.0.1:" in line
        assert "no authentication; read-only" in line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    refused = subprocess.run([sys.executable, "-m", "pytest_hilfarm", "serve", "--listen",
                              "0.0.0.0:0"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--token-file" in refused.stderr
