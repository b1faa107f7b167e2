"""Fixtures of the network tests (helpers live in netns_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from netns_helpers import NETNS_REASON, VethPair, drop_pair, make_pair


@pytest.fixture
def veth() -> Iterator[VethPair]:
    """A fresh pair of namespaces joined by veth (deleted afterwards)."""
    if NETNS_REASON:
        pytest.skip(NETNS_REASON)
    pair = make_pair()
    try:
        yield pair
    finally:
        drop_pair(pair)
