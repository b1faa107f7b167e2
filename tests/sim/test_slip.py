"""SLIP encoder and incremental decoder."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_hilfarm.sim import slip


def test_encode_escapes_both_special_bytes() -> None:
    assert slip.encode(b"\xc0\xdb\x01") == b"\xc0\xdb\xdc\xdb\xdd\x01\xc0"
    assert slip.encode(b"") == b"\xc0\xc0"


def test_unescape_rejects_broken_escapes() -> None:
    assert slip.unescape(b"\xdb\xdd\xdc") == b"\xdb\xdc"
    assert slip.unescape(b"a\xdb") is None
    assert slip.unescape(b"\xdb\x00") is None


def test_back_to_back_frames_and_garbage() -> None:
    d = slip.SlipDecoder()
    stream = b"boot log\r\n" + slip.encode(b"one") + slip.encode(b"two") + b"\xc0\xc0"
    assert d.feed(stream) == [b"one", b"two"]


def test_broken_escape_drops_only_that_frame() -> None:
    d = slip.SlipDecoder()
    assert d.feed(b"\xc0bad\xdb\x01\xc0" + slip.encode(b"ok")) == [b"ok"]
    assert d.dropped == 1


def test_oversize_frame_is_dropped_and_decoder_recovers() -> None:
    d = slip.SlipDecoder(max_frame=16)
    assert d.feed(b"\xc0" + b"x" * 10) == []
    assert d.feed(b"y" * 10 + b"\xc0") == []
    assert d.dropped == 1
    assert d.feed(slip.encode(b"fits")) == [b"fits"]


def test_reset_forgets_partial_frame() -> None:
    d = slip.SlipDecoder()
    d.feed(b"\xc0partial")
    d.reset()
    assert d.feed(b"rest\xc0" + slip.encode(b"next")) == [b"next"]


@settings(max_examples=300, deadline=None, database=None)
@given(
    frames=st.lists(st.binary(min_size=1, max_size=64), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
)
def test_roundtrip_any_split(frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(slip.encode(f) for f in frames)
    d = slip.SlipDecoder()
    got: list[bytes] = []
    start = 0
    for cut in sorted(c % (len(stream) + 1) for c in cuts) + [len(stream)]:
        got += d.feed(stream[start:cut])
        start = max(start, cut)
    assert got == frames


@settings(max_examples=1500, deadline=None, database=None)
@given(noise=st.binary(max_size=200), frame=st.binary(min_size=1, max_size=40))
def test_garbage_never_breaks_the_next_frame(noise: bytes, frame: bytes) -> None:
    d = slip.SlipDecoder(max_frame=128)
    d.feed(noise)
    assert d.feed(slip.encode(frame))[-1:] == [frame]
