"""Run the ``@pytest.mark.umockdev`` tests inside a umockdev testbed, all in one inner session.

The outer pytest (any Python, no special environment) collects these tests as usual. The first
time one of them is called, every umockdev test of the session is run once, together, in an inner
``python -m pytest`` started by ``testbed.py`` (Debian's python3 + UMockdev GI) under
``LD_PRELOAD=libumockdev-preload.so.0`` with the mock devices of ``devices/``; each outer test
then reports its own inner result (pass, failure with the inner traceback, or skip). Inside the
testbed (``HILFARM_TESTBED`` set) the tests simply run. One inner session keeps this fast: about
a second for all of them, instead of a testbed and an interpreter per test.

Tests skip with a reason where umockdev, its GI typelib or Debian's python3-gi is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
DEVICES = HERE / "devices"
BIN = HERE / "bin"
SYSTEM_PYTHON = "/usr/bin/python3"
# Loaded when the testbed starts; cp210x-reenumerated is the CP2102N after a power cycle.
INITIAL = ("cp210x", "ch340", "ch9102", "ftdi-ft232r", "esp-usb-serial-jtag", "modem-other",
           "ftdi-ft2232h")
INSIDE = "HILFARM_TESTBED" in os.environ
RESULTS_ENV = "HILFARM_DISCOVERY_RESULTS"

_RESULTS = pytest.StashKey[dict[str, Any]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "umockdev: runs inside a umockdev testbed (tests/discovery)")


def umockdev_missing() -> str | None:
    """Why the testbed cannot run here, or None."""
    if not shutil.which("umockdev-run"):
        return "umockdev is not installed (apt install umockdev gir1.2-umockdev-1.0 python3-gi)"
    if not Path(SYSTEM_PYTHON).exists():
        return f"{SYSTEM_PYTHON} (Debian's python3, for python3-gi) is missing"
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import gi; gi.require_version('UMockdev', '1.0'); "
         "from gi.repository import UMockdev"], capture_output=True, text=True)
    if probe.returncode != 0:
        return ("the UMockdev GI bindings do not load in Debian's python3 (apt install "
                "gir1.2-umockdev-1.0 python3-gi): " + probe.stderr.strip()[-200:])
    return None


def _run_inner(session: pytest.Session) -> dict[str, Any]:
    nodeids = [item.nodeid for item in session.items if item.get_closest_marker("umockdev")]
    reason = umockdev_missing()
    if reason is not None:
        return {nodeid: {"outcome": "skipped", "text": reason} for nodeid in nodeids}
    workdir = Path(session.config.rootpath)
    results_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"hilfarm-discovery-{os.getpid()}.json"
    results_file.unlink(missing_ok=True)
    argv = [SYSTEM_PYTHON, str(HERE / "testbed.py")]
    for name in INITIAL:
        argv += ["--device", str(DEVICES / f"{name}.umockdev")]
    argv += ["--", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "-o", "addopts=", *nodeids]
    env = dict(os.environ, **{RESULTS_ENV: str(results_file)})
    env.pop("PYTEST_XDIST_WORKER", None)
    done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=300)
    try:
        results: dict[str, Any] = json.loads(results_file.read_text())
    except (FileNotFoundError, ValueError):
        results = {}
    finally:
        results_file.unlink(missing_ok=True)
    results["__output__"] = (done.stdout + done.stderr)[-4000:]
    return results


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if INSIDE or pyfuncitem.get_closest_marker("umockdev") is None:
        return None
    config = pyfuncitem.config
    if _RESULTS not in config.stash:
        config.stash[_RESULTS] = _run_inner(pyfuncitem.session)
    results = config.stash[_RESULTS]
    result = results.get(pyfuncitem.nodeid)
    if result is None:
        pytest.fail("the inner umockdev session did not report this test; its output:\n"
                    + results.get("__output__", ""), pytrace=False)
    if result["outcome"] == "skipped":
        pytest.skip(result["text"])
    if result["outcome"] != "passed":
        pytest.fail("inside the umockdev testbed:\n" + result["text"], pytrace=False)
    return True


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Inside the testbed: record each test's outcome (its worst phase) for the outer session."""
    target = os.environ.get(RESULTS_ENV)
    if not INSIDE or not target:
        return
    path = Path(target)
    results = json.loads(path.read_text()) if path.exists() else {}
    current = results.get(report.nodeid)
    if report.failed:
        text = f"[{report.when}] {report.longreprtext}"
        if current is not None and current["outcome"] == "failed":
            text = current["text"] + "\n" + text
        results[report.nodeid] = {"outcome": "failed", "text": text}
    elif report.skipped:
        if current is None or current["outcome"] == "passed":
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
            results[report.nodeid] = {"outcome": "skipped", "text": str(reason)}
    elif report.when == "call" and current is None:
        results[report.nodeid] = {"outcome": "passed", "text": ""}
    path.write_text(json.dumps(results))


# -- fixtures for the tests that run inside ------------------------------------------------------


class Testbed:
    """Client of testbed.py's control socket: unplug and plug mock devices."""

    def request(self, **request: object) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(os.environ["HILFARM_TESTBED"])
            conn.sendall((json.dumps(request) + "\n").encode())
            answer: dict[str, Any] = json.loads(conn.makefile("r").readline())
        assert answer.get("ok"), answer
        return answer

    def unplug(self, name: str) -> None:
        self.request(op="remove", file=str(DEVICES / f"{name}.umockdev"))

    def plug(self, name: str) -> None:
        self.request(op="add", file=str(DEVICES / f"{name}.umockdev"))


@pytest.fixture
def testbed() -> Iterator[Testbed]:
    """The running testbed (inside only); devices are put back as they started afterwards."""
    bed = Testbed()
    yield bed
    if INSIDE:
        bed.request(op="reset")


def _device(name: str) -> str:
    return str(DEVICES / f"{name}.umockdev")


HUB_1_1 = "2109:2817 VIA Labs, Inc. USB2.0 Hub, USB 2.10, 7 ports, ppps"
ROOT_HUB_1 = "1d6b:0002 Linux Foundation 2.0 root hub, USB 2.00, 2 ports, ganged"


@pytest.fixture
def fake_uhubctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, testbed: Testbed) -> Path:
    """The stand-in uhubctl first on PATH; returns its call log (one JSON argv per line).

    Hub 1-1 (per-port switching): ports 1-6 hold the CP2102N (it comes back as /dev/ttyUSB1),
    CH340, CH9102, FT232R, the C3's USB-Serial/JTAG and a modem; port 2 only pretends to switch.
    Root hub 1 (ganged) holds the FT2232H on port 2.
    """
    log = tmp_path / "uhubctl.log"
    config = {
        "log": str(log),
        "hubs": [
            {"location": "1-1", "info": HUB_1_1, "count": 7, "ports": {
                "1": {"usb_path": "1-1.1", "files": [_device("cp210x"),
                                                     _device("cp210x-reenumerated")],
                      "device": "10c4:ea60 Silicon Labs CP2102N USB to UART Bridge Controller "
                                "3c0e5a1f6b2aec11b2f0a1b2c3d4e5f6"},
                "2": {"usb_path": "1-1.2", "files": [_device("ch340")], "switches": False,
                      "device": "1a86:7523 USB Serial"},
                "3": {"usb_path": "1-1.3", "files": [_device("ch9102")],
                      "device": "1a86:55d4 USB Single Serial 5470011234"},
                "4": {"usb_path": "1-1.4", "files": [_device("ftdi-ft232r")],
                      "device": "0403:6001 FTDI FT232R USB UART A50285BI"},
                "5": {"usb_path": "1-1.5", "files": [_device("esp-usb-serial-jtag")],
                      "device": "303a:1001 Espressif USB JTAG/serial debug unit "
                                "84:F7:03:A1:B2:C3"},
                "6": {"usb_path": "1-1.6", "files": [_device("modem-other")],
                      "device": "12d1:1001 HUAWEI E169"},
            }},
            {"location": "1", "info": ROOT_HUB_1, "count": 2, "ports": {
                "2": {"usb_path": "1-2", "files": [_device("ftdi-ft2232h")],
                      "device": "0403:6010 FTDI Dual RS232-HS FT2232H01"},
            }},
        ],
    }
    path = tmp_path / "uhubctl.json"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("HILFARM_FAKE_UHUBCTL", str(path))
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return log
