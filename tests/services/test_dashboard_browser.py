"""The dashboard in a real browser (Playwright driving Debian's Chromium), as a person sees it.

``hilfarm serve`` runs as a separate process on the built-in virtual rack. The pages load; a
board a running pytest takes shows its holder within two seconds and goes back to free when the
test ends; a board that three health sweeps quarantined shows its check's log; the report page
draws its charts. Screenshots go to a temporary directory (``HILFARM_SCREENSHOTS`` to choose one),
never into the repository. Skips with the reason when Chromium or Playwright is missing; never
downloads a browser.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nightly import generate_week

from pytest_hilfarm.description.rack import builtin_virtual_rack_path, load_rack
from pytest_hilfarm.store import FarmStore

CHROMIUM = os.environ.get("HILFARM_CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set HILFARM_CHROMIUM)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed: pip install -e '.[test]'")
HOLD_SHOWN_WITHIN_S = 2.0


@pytest.fixture(scope="module")
def shots() -> Path:
    chosen = os.environ.get("HILFARM_SCREENSHOTS")
    path = Path(chosen) if chosen else Path(tempfile.mkdtemp(prefix="hilfarm-screens-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def server(private_virtual_rack: Any) -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-m", "pytest_hilfarm", "serve", "--listen",
                             "127.0.0.1:0", "--refresh", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert " at http://" in line, line + proc.stdout.read()
    try:
        yield line.split(" at ")[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.fixture(scope="module")
def page(server: str) -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        # The system Chromium: Playwright never downloads a browser here.
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            yield page
        finally:
            browser.close()


def _held(page: Any, board: str, held: str) -> str:
    return f'tr#board-{board}[data-held="{held}"]'


def test_the_pages_load(page: Any, server: str, shots: Path) -> None:
    page.goto(server + "/")
    assert page.title() == "hilfarm: virtual"
    assert page.locator("tr.board").count() == 5
    assert page.locator("tr.board svg.timeline").count() == 5
    page.screenshot(path=str(shots / "overview.png"), full_page=True)
    page.click("text=esp32c3-1")
    page.wait_for_selector("h1:has-text('esp32c3-1')")
    assert page.locator("svg.timeline").count() == 1
    page.screenshot(path=str(shots / "board.png"), full_page=True)
    page.goto(server + "/report")
    assert page.locator("h2#boards").count() == 1


TEST_MODULE = """
import os
import time
from pathlib import Path


def test_holds_a_board(hil_farm, request):
    lease = hil_farm.reserve(1, only=["esp32-1"], test_id=request.node.nodeid, timeout=30)
    Path(os.environ["HELD_MARK"]).write_text(repr(time.time()))
    deadline = time.time() + 60
    while not Path(os.environ["GO_MARK"]).exists() and time.time() < deadline:
        time.sleep(0.05)
    lease.release()
    Path(os.environ["RELEASED_MARK"]).write_text(repr(time.time()))
"""


def test_a_board_taken_by_a_running_pytest_shows_its_holder_within_two_seconds(
        page: Any, server: str, shots: Path, tmp_path: Path) -> None:
    (tmp_path / "test_holder.py").write_text(textwrap.dedent(TEST_MODULE))
    marks = {k: tmp_path / k for k in ("HELD_MARK", "GO_MARK", "RELEASED_MARK")}
    page.goto(server + "/")
    page.wait_for_selector(_held(page, "esp32-1", "no"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_holder.py"],
        cwd=tmp_path, env={**os.environ, **{k: str(v) for k, v in marks.items()}},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not marks["HELD_MARK"].exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() \
                if proc.stdout else ""
            time.sleep(0.02)
        taken = float(marks["HELD_MARK"].read_text())
        # No reload: the page's own refresh has to bring the holder in.
        row = page.wait_for_selector(_held(page, "esp32-1", "yes"),
                                     timeout=HOLD_SHOWN_WITHIN_S * 1000)
        shown_after = time.time() - taken
        holder = row.query_selector("td.holder").inner_text()
        assert "test_holder.py::test_holds_a_board" in holder and "since" in holder
        page.screenshot(path=str(shots / "held-by-pytest.png"), full_page=True)
        assert shown_after < HOLD_SHOWN_WITHIN_S
        marks["GO_MARK"].write_text("go")
        while not marks["RELEASED_MARK"].exists():
            assert proc.poll() is None or marks["RELEASED_MARK"].exists()
            time.sleep(0.02)
        page.wait_for_selector(_held(page, "esp32-1", "no"),
                               timeout=HOLD_SHOWN_WITHIN_S * 1000)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_quarantined_board_shows_its_log(page: Any, server: str, shots: Path) -> None:
    from pytest_hilfarm.farm import Farm

    with Farm.open() as farm:
        farm.control().unplug("esp32s2-1")
        try:
            for _ in range(3):  # what a systemd timer would run, three times
                subprocess.run([sys.executable, "-m", "pytest_hilfarm", "health", "--all",
                                "esp32s2-1"], capture_output=True, timeout=120, check=False)
        finally:
            farm.control().plug("esp32s2-1")
    page.goto(server + "/")
    section = page.wait_for_selector('section.quarantined[data-board="esp32s2-1"]',
                                     timeout=5000)
    log = section.query_selector("pre.log").inner_text()
    assert "health check FAILED (QUARANTINED)" in log and "unplugged" in log
    assert page.locator('tr#board-esp32s2-1[data-health="QUARANTINED"]').count() == 1
    section.scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "quarantined.png"), full_page=True)
    subprocess.run([sys.executable, "-m", "pytest_hilfarm", "board", "restore", "esp32s2-1"],
                   capture_output=True, timeout=60, check=True)


def test_the_report_page_renders_its_charts(page: Any, server: str, shots: Path) -> None:
    rack = load_rack(builtin_virtual_rack_path())
    store = FarmStore(rack.state_dir / "farm.db")
    planted = generate_week(store, seed=11)
    store.close()
    page.goto(server + "/report?since=8d")
    charts = page.locator("svg.chart")
    assert charts.count() >= 5
    for i in range(charts.count()):
        box = charts.nth(i).bounding_box()
        assert box is not None and box["width"] > 300 and box["height"] > 40
    assert page.locator("svg.chart polyline.series").count() >= 4
    assert page.locator("svg.chart rect.bar").count() >= 5
    assert page.locator("figure.suite.drifted").count() == 1
    assert planted.flaky in page.locator("table.flaky").inner_text()
    assert "sick:" in page.locator("table.boards").inner_text()
    page.screenshot(path=str(shots / "report.png"), full_page=True)
    print(f"screenshots in {shots}: {sorted(p.name for p in shots.glob('*.png'))}")
    assert shutil.which("chromium") or Path(CHROMIUM).exists()
