"""Nightly regression reports: the farm's history per test, board, firmware and suite.

``analysis`` turns a window of results and lease outcomes into a :class:`Report` (flaky tests,
bisect hints, sick boards, drifting suites, slower tests, the quarantine list); ``render`` lays
it out as text and as an HTML page with SVG charts. ``hilfarm report`` and the dashboard's report
page use both. Must not: write to the store or act on boards.
"""

from pytest_hilfarm.services.report.analysis import (
    HistorySource,
    Report,
    Thresholds,
    analyse,
    from_store,
    parse_since,
    to_json,
)

__all__ = ["HistorySource", "Report", "Thresholds", "analyse", "from_store", "parse_since",
           "to_json"]
