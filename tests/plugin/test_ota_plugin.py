"""The hil_ota_server fixture (pytest_hilfarm.plugin.ota), through pytester."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


def test_hil_ota_server_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import urllib.request

        SEEN = []

        def test_serves(hil_ota_server):
            url = hil_ota_server.publish("fw.bin", b"\\xe9abc")
            assert url == hil_ota_server.url_for("fw.bin")
            assert urllib.request.urlopen(url, timeout=5).read() == b"\\xe9abc"
            assert [r.status for r in hil_ota_server.wait_requests(1)] == [200]
            SEEN.append(hil_ota_server)

        def test_fresh_per_test(hil_ota_server):
            assert hil_ota_server.requests == []
            assert hil_ota_server.names() == []
            old = SEEN[0]
            try:
                old.base_url
            except Exception as exc:
                assert "not running" in str(exc)
            else:
                raise AssertionError("the previous test's server still runs")
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:randomly")
    result.assert_outcomes(passed=2)
