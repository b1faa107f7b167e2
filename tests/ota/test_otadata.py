import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_hilfarm.errors import ImageError
from pytest_hilfarm.esp.otadata import (
    OTADATA_SIZE,
    OtaSelectEntry,
    OtaState,
    active_entry_index,
    decode_otadata,
    encode_otadata,
    initial_otadata,
    next_seq_for,
    ota_seq_crc,
    select_boot_slot,
    set_boot_slot,
)

E = OtaSelectEntry.make
ERASED = OtaSelectEntry.erased()


@pytest.mark.parametrize("seq,crc", [(1, 0x4743989A), (2, 0x55F63774)])
def test_crc_known_answers(seq, crc):
    assert ota_seq_crc(seq) == crc
    assert E(seq).crc == crc


def test_crc_is_not_plain_crc32_of_whole_entry():
    import zlib

    entry = E(1, OtaState.VALID)
    assert entry.crc != zlib.crc32(entry.encode()[:28])


def test_entry_layout_is_32_bytes_little_endian():
    raw = E(1, OtaState.PENDING_VERIFY).encode()
    assert len(raw) == 32
    assert raw[0:4] == b"\x01\x00\x00\x00"
    assert raw[4:24] == b"\xff" * 20
    assert struct.unpack_from("<I", raw, 24)[0] == 1
    assert struct.unpack_from("<I", raw, 28)[0] == 0x4743989A


@given(seq=st.integers(0, 0xFFFFFFFF), state=st.sampled_from(list(OtaState)))
def test_entry_round_trip(seq, state):
    entry = E(seq, state)
    assert OtaSelectEntry.decode(entry.encode()) == entry
    assert entry.crc_ok


def test_decode_short_entry_says_what():
    with pytest.raises(ImageError, match="32 bytes"):
        OtaSelectEntry.decode(b"\x00" * 10)


def test_otadata_partition_round_trip_and_initial():
    entries = (E(3, OtaState.VALID), E(4, OtaState.NEW))
    raw = encode_otadata(entries)
    assert len(raw) == OTADATA_SIZE == 0x2000
    assert raw[0x1000:0x1020] == entries[1].encode()
    assert decode_otadata(raw) == entries
    assert initial_otadata() == b"\xff" * 0x2000
    assert decode_otadata(initial_otadata()) == (ERASED, ERASED)


def test_validity_rules():
    assert not ERASED.is_valid and ERASED.is_invalid
    assert E(1, OtaState.VALID).is_valid
    assert E(1, OtaState.NEW).is_valid
    assert E(1, OtaState.PENDING_VERIFY).is_valid
    assert E(1, OtaState.UNDEFINED).is_valid
    assert not E(1, OtaState.ABORTED).is_valid
    assert not E(1, OtaState.INVALID).is_valid
    bad_crc = OtaSelectEntry(seq=1, state=OtaState.VALID, crc=0x12345678)
    assert not bad_crc.is_valid and not bad_crc.is_invalid  # "invalid" ignores the CRC


# (entry0, entry1, app_count) -> slot (None = factory / ota_0 decided by the table)
SELECT_CASES = [
    ((ERASED, ERASED), 2, None),
    ((E(1, OtaState.VALID), ERASED), 2, 0),
    ((ERASED, E(2, OtaState.VALID)), 2, 1),
    ((E(1, OtaState.VALID), E(2, OtaState.NEW)), 2, 1),
    ((E(3, OtaState.VALID), E(2, OtaState.VALID)), 2, 0),  # seq 3 -> (3-1)%2 = 0
    ((E(1, OtaState.VALID), E(2, OtaState.ABORTED)), 2, 0),  # rollback
    ((E(1, OtaState.VALID), E(2, OtaState.INVALID)), 2, 0),
    ((E(1, OtaState.ABORTED), E(2, OtaState.INVALID)), 2, None),
    ((OtaSelectEntry(seq=2, state=2, crc=0), E(1, OtaState.VALID)), 2, 0),  # bad CRC skipped
    ((E(5, OtaState.VALID), ERASED), 3, 1),  # (5-1)%3
    ((E(1, OtaState.VALID), E(2, OtaState.VALID)), 0, None),  # no OTA partitions
]


@pytest.mark.parametrize("entries,app_count,slot", SELECT_CASES)
def test_select_boot_slot(entries, app_count, slot):
    assert select_boot_slot(entries, app_count) == slot


def test_without_factory_slot_0_is_tried():
    assert select_boot_slot((ERASED, ERASED), 2, has_factory=False) == 0
    bad = OtaSelectEntry(seq=2, state=OtaState.VALID, crc=0)
    assert select_boot_slot((bad, ERASED), 2, has_factory=False) == 0
    assert select_boot_slot((bad, ERASED), 2) is None


def test_equal_seq_prefers_copy_0():
    assert active_entry_index((E(2, OtaState.VALID), E(2, OtaState.VALID))) == 0


@pytest.mark.parametrize(
    "slot,current,n,expected",
    [
        (0, None, 2, 1),
        (1, None, 2, 2),
        (1, 1, 2, 2),
        (0, 1, 2, 1),  # already slot 0: same seq
        (0, 2, 2, 3),
        (1, 3, 2, 4),
        (0, 5, 3, 7),
        (2, 5, 3, 6),
    ],
)
def test_next_seq_for(slot, current, n, expected):
    assert next_seq_for(slot, current, n) == expected


@given(slot=st.integers(0, 15), extra=st.integers(0, 15), current=st.integers(1, 10_000))
def test_next_seq_selects_slot_and_never_goes_back(slot, extra, current):
    n = slot + 1 + extra
    seq = next_seq_for(slot, current, n)
    assert seq >= current
    assert (seq - 1) % n == slot
    assert seq - current < n + 1


def test_next_seq_rejects_bad_slot():
    with pytest.raises(ValueError):
        next_seq_for(2, 1, 2)


def test_set_boot_slot_writes_inactive_copy_with_new_state():
    entries = (E(1, OtaState.VALID), ERASED)
    index, entry = set_boot_slot(entries, 1, 2)
    assert index == 1
    assert (entry.seq, entry.state, entry.crc_ok) == (2, OtaState.NEW, True)
    index, entry = set_boot_slot((E(1, OtaState.VALID), E(2, OtaState.VALID)), 0, 2,
                                 rollback_enabled=False)
    assert index == 0 and entry.seq == 3 and entry.state == OtaState.UNDEFINED
    index, entry = set_boot_slot((ERASED, ERASED), 0, 2)
    assert index == 0 and entry.seq == 1
