"""Table tests for pure board selection."""

from __future__ import annotations

import pytest

from pytest_hilfarm.errors import UsageError
from pytest_hilfarm.reservation.allocate import (
    BoardInfo,
    BoardRequest,
    can_ever_satisfy,
    choose,
    natural_sorted,
)
from pytest_hilfarm.store import BoardHealth

G, U, B, Q = BoardHealth.GOOD, BoardHealth.UNKNOWN, BoardHealth.BAD, BoardHealth.QUARANTINED


def board(bid: str, chip: str = "esp32", features: str = "", health: BoardHealth = G,
          failures: int = 0) -> BoardInfo:
    return BoardInfo(bid, chip, frozenset(f for f in features.split(",") if f), health, failures)


RACK = [
    board("esp32-1", features="mesh-radio"),
    board("esp32-2", features="mesh-radio,bme280"),
    board("esp32-3"),
    board("s2-1", chip="esp32s2"),
    board("c3-1", chip="esp32c3", features="bme280"),
]

CHOOSE_CASES = [
    # (free boards, request, expected boards or None, expected needs_check)
    pytest.param(RACK, BoardRequest(), ("esp32-3",), set(), id="fewest-surplus-features-first"),
    pytest.param(RACK, BoardRequest(count=2, chip="esp32"), ("esp32-3", "esp32-1"), set(),
                 id="two-esp32"),
    pytest.param(RACK, BoardRequest(chip="esp32", features=frozenset({"bme280"})),
                 ("esp32-2",), set(), id="feature-match"),
    pytest.param(RACK, BoardRequest(features=frozenset({"bme280"}), count=2),
                 ("c3-1", "esp32-2"), set(), id="feature-any-chip"),
    pytest.param(RACK, BoardRequest(count=4, chip="esp32"), None, set(), id="too-few-free"),
    pytest.param(RACK, BoardRequest(chip="esp32c6"), None, set(), id="no-such-chip"),
    pytest.param([board("a", health=U), board("b")], BoardRequest(), ("b",), set(),
                 id="good-before-unknown"),
    pytest.param([board("a", health=U), board("b", health=B, failures=1)], BoardRequest(),
                 ("a",), {"a"}, id="unknown-before-bad-and-flagged"),
    pytest.param([board("a", health=U), board("b", health=B, failures=2)],
                 BoardRequest(count=2), ("a", "b"), {"a", "b"}, id="bad-below-threshold-ok"),
    pytest.param([board("a", health=B, failures=3)], BoardRequest(), None, set(),
                 id="bad-at-threshold-never"),
    pytest.param([board("a", health=Q), board("b", health=Q)], BoardRequest(), None, set(),
                 id="quarantined-never"),
    pytest.param([board("esp32-10"), board("esp32-2"), board("esp32-9")], BoardRequest(),
                 ("esp32-2",), set(), id="natural-id-order"),
    pytest.param(RACK, BoardRequest(only=frozenset({"esp32-2"})), ("esp32-2",), set(),
                 id="only-named"),
    pytest.param([], BoardRequest(), None, set(), id="nothing-free"),
]


@pytest.mark.parametrize(("free", "request_", "expected", "needs_check"), CHOOSE_CASES)
def test_choose(free, request_, expected, needs_check) -> None:
    choice = choose(free, request_)
    if expected is None:
        assert choice is None
    else:
        assert choice is not None
        assert choice.boards == expected
        assert choice.needs_check == frozenset(needs_check)


def test_choose_is_deterministic_whatever_the_input_order() -> None:
    request = BoardRequest(count=2)
    first = choose(RACK, request)
    for shift in range(len(RACK)):
        assert choose(RACK[shift:] + RACK[:shift], request) == first
    assert choose(reversed(RACK), request) == first


FEASIBILITY_CASES = [
    pytest.param(BoardRequest(count=3, chip="esp32"), None, id="exactly-enough"),
    pytest.param(BoardRequest(count=4, chip="esp32"), "only 3 such board(s)", id="too-many"),
    pytest.param(BoardRequest(chip="esp32c6"), "no esp32c6 board", id="unknown-chip"),
    pytest.param(BoardRequest(chip="esp32s2", features=frozenset({"mesh-radio"})),
                 "no esp32s2 board has feature(s) {mesh-radio}", id="feature-on-wrong-chip"),
    pytest.param(BoardRequest(features=frozenset({"lora"})), "no board has feature(s) {lora}",
                 id="unknown-feature"),
    pytest.param(BoardRequest(count=3, features=frozenset({"bme280"})),
                 "only 2 such board(s): c3-1, esp32-2", id="feature-count"),
    pytest.param(BoardRequest(only=frozenset({"esp32-7"})), "no board named esp32-7",
                 id="unknown-board-id"),
    pytest.param(BoardRequest(count=5), None, id="whole-rack"),
]


@pytest.mark.parametrize(("request_", "reason"), FEASIBILITY_CASES)
def test_can_ever_satisfy(request_, reason) -> None:
    verdict = can_ever_satisfy(RACK, request_)
    if reason is None:
        assert verdict and verdict.reason == ""
    else:
        assert not verdict
        assert reason in verdict.reason


def test_can_ever_satisfy_ignores_health() -> None:
    # A quarantined board can be restored by a person: health never makes a request impossible.
    rack = [board("a", health=Q), board("b", health=B, failures=9)]
    assert can_ever_satisfy(rack, BoardRequest(count=2))
    assert not can_ever_satisfy([], BoardRequest())


@pytest.mark.parametrize("count", [0, -1, True, 1.5])
def test_bad_count_is_a_usage_error(count) -> None:
    with pytest.raises(UsageError, match="count of at least 1"):
        BoardRequest(count=count)


def test_request_normalises_features_and_describes_itself() -> None:
    request = BoardRequest(count=2, chip="esp32", features="mesh-radio")  # type: ignore[arg-type]
    assert request.features == frozenset({"mesh-radio"})
    assert request.describe() == "2 x esp32 board(s) with features {mesh-radio}"
    assert BoardRequest().describe() == "1 x any-chip board(s)"


def test_natural_sorted() -> None:
    assert natural_sorted(["b10", "b2", "a", "b1"]) == ["a", "b1", "b2", "b10"]
