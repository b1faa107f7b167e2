"""SLIP framing as the ESP serial bootloader uses it (RFC 1055 with C0 on both ends of a frame).

:func:`encode` frames one payload; :class:`SlipDecoder` turns a byte stream, fed in arbitrary
pieces, into complete payloads. The decoder never raises on bad input: junk before the first
C0, frames with broken escapes and frames longer than its bound are dropped. It knows nothing
about the commands inside the frames and does no I/O.
"""

from __future__ import annotations

END = 0xC0
ESC = 0xDB
ESC_END = 0xDC
ESC_ESC = 0xDD

_END_B = b"\xc0"
_ESC_B = b"\xdb"
_ESC_END_B = b"\xdb\xdc"
_ESC_ESC_B = b"\xdb\xdd"

# Largest frame the decoder keeps, counted in escaped bytes: a 16 KiB stub FLASH_DATA block
# plus its 24 header bytes, every byte escaped, with room to spare.
DEFAULT_MAX_FRAME = 0x10000


def encode(payload: bytes) -> bytes:
    """Return ``payload`` as one SLIP frame (``C0 … C0``)."""
    # DB first: escaping C0 introduces new DB bytes that must not be escaped again.
    return _END_B + payload.replace(_ESC_B, _ESC_ESC_B).replace(_END_B, _ESC_END_B) + _END_B


def unescape(raw: bytes) -> bytes | None:
    """Undo SLIP escaping of a frame body; ``None`` if it holds an invalid escape."""
    if _ESC_B not in raw:
        return raw
    # Every DB must start DB DC or DB DD. The two pairs cannot overlap (neither ends in DB),
    # so equal counts prove the frame is well formed without a per-byte loop.
    if raw.count(_ESC_B) != raw.count(_ESC_END_B) + raw.count(_ESC_ESC_B):
        return None
    # DB DC first: replacing DB DD first would turn "DB DD DC" into a false "DB DC".
    return raw.replace(_ESC_END_B, _END_B).replace(_ESC_ESC_B, _ESC_B)


class SlipDecoder:
    """Incremental SLIP decoder: :meth:`feed` bytes, get the frames they completed.

    Every C0 ends the frame before it and starts the next one (esptool sends ``C0 … C0`` per
    packet, so back-to-back packets give empty frames, which are skipped). Bytes before the first
    C0 are dropped, as the ROM waits for a C0 before it listens. A frame over ``max_frame``
    escaped bytes is discarded up to the next C0, so garbage cannot grow memory without bound.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame < 1:
            raise ValueError(f"max_frame must be positive, got {max_frame}")
        self._max = max_frame
        self._parts: list[bytes] = []
        self._size = 0
        self._synced = False  # a C0 has been seen, so bytes now belong to a frame
        self._overflow = False
        self.dropped = 0  # frames thrown away (bad escape or oversize), for diagnostics

    def reset(self) -> None:
        """Forget any partial frame and wait for the next C0 (as after a chip reset)."""
        self._parts.clear()
        self._size = 0
        self._synced = False
        self._overflow = False

    def feed(self, data: bytes) -> list[bytes]:
        """Consume ``data``; return the payloads of the frames it completed, in order."""
        frames: list[bytes] = []
        pieces = bytes(data).split(_END_B)
        self._add(pieces[0])
        for piece in pieces[1:]:
            self._close(frames)
            self._add(piece)
        return frames

    def _add(self, piece: bytes) -> None:
        if not piece or not self._synced or self._overflow:
            return
        self._size += len(piece)
        if self._size > self._max:
            self._overflow = True
            self._parts.clear()
            return
        self._parts.append(piece)

    def _close(self, frames: list[bytes]) -> None:
        if self._overflow:
            self.dropped += 1
        elif self._parts:
            raw = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
            frame = unescape(raw)
            if frame is None:
                self.dropped += 1
            else:
                frames.append(frame)
        self._parts.clear()
        self._size = 0
        self._overflow = False
        self._synced = True
