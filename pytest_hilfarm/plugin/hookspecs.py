"""Hooks a conftest or plugin can implement to take part in preparing boards.

Registered by the hilfarm plugin (``pytest_addhooks``); they run in the process that runs the
test (an xdist worker, or the main process).
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.hookspec
def pytest_hilfarm_devices_ready(item: pytest.Item, devices: list[Any]) -> None:
    """Called after the test's boards were reserved, prepared and booted, before the test.

    For per-rig provisioning a firmware needs before any test (write NVS keys, pair a radio,
    wait for a network): ``devices`` are the same Device handles the test gets. An exception
    here is an error in the test's setup.
    """


@pytest.hookspec
def pytest_hilfarm_infra_error(item: pytest.Item, error: Exception, board_ids: tuple[str, ...],
                               will_retry: bool) -> None:
    """Called when preparing a test's boards failed for a rig reason (the boards are marked
    UNKNOWN); ``will_retry`` tells whether ``--hil-infra-retries`` gives the test another try.

    For alerting or bookkeeping; the hook cannot change what happens next.
    """
