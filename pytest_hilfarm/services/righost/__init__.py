"""The rig host service (``hilfarm export``): serve one rack's boards to the whole farm.

On the machine the boards are plugged into it registers the host and its boards in the farm
database and keeps the registration alive (``host``), serves each board's serial port over RFC
2217 with DTR/RTS (``exporter``), and answers an authenticated HTTP(S) control API for attach,
power, reset and the fast flash path, where the client uploads each image once
(content-addressed) and this host runs esptool locally (``api``). Each board is driven through
the same board wiring the farm uses (``boards``); ``config`` reads its settings.

Must not: bind anywhere but the configured address; accept a power, reset or flash request
without the shared token or, when configured, a verified TLS client certificate; accept an RFC
2217 connection from an address that did not first attach through the API (``--open-serial``
lifts this on a trusted network); let two clients use one board at once; lock boards for tests
(the farm's reservation does that); import pytest.
"""

from pytest_hilfarm.services.righost.config import RigHostConfig, TlsConfig, config_from_args
from pytest_hilfarm.services.righost.host import RigHost, describe

__all__ = ["RigHost", "RigHostConfig", "TlsConfig", "config_from_args", "describe"]
