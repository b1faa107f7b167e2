"""Test-suite conftest: keep the project's own test runs away from a person's real farm state.

Unless HILFARM_TEST_USE_ENV=1, a run gets fresh HILFARM_STATE_DIR and HILFARM_SIM_DIR
directories (made once by the controller process; xdist workers inherit them), so tests never
touch ~/.local/state/hilfarm or a virtual rack a person started. The virtual rack daemon that
tests start there is stopped at the end of the run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_OWNED = "_HILFARM_TEST_STATE_OWNER"


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("HILFARM_TEST_USE_ENV") == "1" or hasattr(config, "workerinput"):
        return
    if os.environ.get(_OWNED):
        return  # a nested pytest (pytester subprocess) shares its parent's directories
    root = tempfile.mkdtemp(prefix="hilfarm-test-")
    os.environ["HILFARM_STATE_DIR"] = os.path.join(root, "state")
    os.environ["HILFARM_SIM_DIR"] = os.path.join(root, "sim")
    os.environ[_OWNED] = root
    config.stash[_root_key] = root


_root_key = pytest.StashKey[str]()


def pytest_unconfigure(config: pytest.Config) -> None:
    root = config.stash.get(_root_key, None)
    if root is None:
        return
    subprocess.run([sys.executable, "-m", "pytest_hilfarm", "sim", "down"],
                   capture_output=True, timeout=60, check=False)
    shutil.rmtree(root, ignore_errors=True)
    os.environ.pop(_OWNED, None)


@pytest.fixture(scope="module")
def private_virtual_rack(tmp_path_factory: pytest.TempPathFactory):
    """A virtual rack daemon and farm state of this test module's own (stopped afterwards).

    Modules that unplug boards, hold them or change their health must not meet the tests of
    another module (maybe on another xdist worker) on the same boards.
    """
    root = tmp_path_factory.mktemp("private-rack")
    saved = {k: os.environ.get(k) for k in ("HILFARM_SIM_DIR", "HILFARM_STATE_DIR")}
    os.environ["HILFARM_SIM_DIR"] = str(root / "sim")
    os.environ["HILFARM_STATE_DIR"] = str(root / "state")
    try:
        yield root
    finally:
        subprocess.run([sys.executable, "-m", "pytest_hilfarm", "sim", "down"],
                       capture_output=True, timeout=60, check=False)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def private_rack_daemon(tmp_path_factory: pytest.TempPathFactory
                        ) -> Iterator[tuple[dict[str, Any], Path]]:
    """A virtual rack daemon of this module's own, started as `hilfarm sim serve` does:
    (its daemon info, its state directory). Shut down afterwards."""
    from pytest_hilfarm.drivers.virtual import ControlClient, read_daemon_info

    state = tmp_path_factory.mktemp("rack")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest_hilfarm.sim.daemon", "--state-dir", str(state)],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 15
    info = None
    while time.monotonic() < deadline and proc.poll() is None:
        info = read_daemon_info(state)
        if info is not None:
            break
        time.sleep(0.05)
    if info is None:
        proc.kill()
        err = proc.stderr.read().decode()[-800:] if proc.stderr else ""
        pytest.fail(f"the virtual rack daemon did not start: {err}")
    yield info, state
    try:
        ControlClient(info["control"]).shutdown()
        proc.wait(5)
    except Exception:
        proc.kill()
        proc.wait(5)
