"""pytest glue for OTA tests: the ``hil_ota_server`` fixture.

Its job: give each test its own :class:`pytest_hilfarm.ota.server.OtaServer` on 127.0.0.1 (an
ephemeral port), stopped when the test ends, whatever the test did. It must not touch boards or
the farm (``Device.ota_update`` does the board side) and holds no state between tests.
Registered as a pytest11 entry point (``hilfarm_ota = "pytest_hilfarm.plugin.ota"``), or load it
with ``-p pytest_hilfarm.plugin.ota``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pytest_hilfarm.ota.server import OtaServer


@pytest.fixture
def hil_ota_server() -> Iterator[OtaServer]:
    """An OTA HTTP server for this test: ``.publish(name, bytes|path|dict) -> url``,
    ``.url_for(name)``, ``.requests``, ``.drop_after(name, n)``, ``.slow(name, bps)``,
    ``.fail(name, 404)``.
    """
    server = OtaServer().start()
    try:
        yield server
    finally:
        server.stop()
