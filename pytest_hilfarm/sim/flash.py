"""File-backed NOR flash of one simulated board.

The image lives in a file (memory-mapped), so it survives daemon restarts and other parts (the
boot chain) can read what was flashed. NOR rules are modelled: erasing sets whole 4 KiB sectors
to 0xFF, programming can only clear bits (new = old AND data), which exposes a missing erase.
This module knows nothing about the serial protocol and is not thread-safe: the board that owns
it serialises access.
"""

from __future__ import annotations

import hashlib
import mmap
from pathlib import Path
from types import TracebackType

SECTOR_SIZE = 0x1000
_CHUNK = 1 << 20


class FlashRangeError(ValueError):
    """An access fell outside the flash chip."""


class FlashMemory:
    """NOR flash of ``size`` bytes kept in the file at ``path`` (created 0xFF-filled)."""

    def __init__(self, path: Path, size: int) -> None:
        if size <= 0 or size % SECTOR_SIZE:
            raise ValueError(f"flash size must be a positive multiple of 4 KiB, got {size}")
        self.path = Path(path)
        self._size = size
        # Bumped by every write and erase: what was read from the flash at one generation is
        # still what it holds while the generation is the same (see boot.parse_flash_image).
        self.generation = 0
        existing = self.path.stat().st_size if self.path.exists() else None
        if existing is not None and existing > size:
            raise ValueError(
                f"{self.path} holds {existing} bytes, more than the {size}-byte flash; "
                "delete it or configure the board's real flash size"
            )
        self._file = open(self.path, "r+b" if existing is not None else "w+b")
        try:
            current = existing or 0
            if current < size:
                # New (or short) images read as erased flash, not zeros.
                self._file.seek(current)
                while current < size:
                    step = min(_CHUNK, size - current)
                    self._file.write(b"\xff" * step)
                    current += step
                self._file.flush()
            self._mm = mmap.mmap(self._file.fileno(), size)
        except BaseException:
            self._file.close()
            raise

    @property
    def size(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return self._mm.closed

    def _check(self, addr: int, n: int) -> None:
        if n < 0 or addr < 0 or addr + n > self._size:
            raise FlashRangeError(
                f"flash access 0x{addr:x}+0x{n:x} is outside the 0x{self._size:x}-byte flash"
            )

    def read(self, addr: int, n: int) -> bytes:
        """Return ``n`` bytes at ``addr``."""
        self._check(addr, n)
        return self._mm[addr : addr + n]

    def write(self, addr: int, data: bytes) -> None:
        """Program ``data`` at ``addr``: every bit becomes old AND new, as on NOR flash."""
        n = len(data)
        self._check(addr, n)
        if not n:
            return
        self.generation += 1
        old = self._mm[addr : addr + n]
        if old.count(0xFF) == n:
            # Erased target (the normal case): programming writes the data as is.
            self._mm[addr : addr + n] = data
        elif bytes(data).count(0xFF) != n:
            # One big-integer AND instead of a per-byte loop keeps the data path in C.
            merged = int.from_bytes(old, "little") & int.from_bytes(data, "little")
            self._mm[addr : addr + n] = merged.to_bytes(n, "little")

    def erase(self, addr: int, n: int) -> None:
        """Erase ``n`` bytes at ``addr`` to 0xFF; both must be 4 KiB-sector aligned."""
        if addr % SECTOR_SIZE or n % SECTOR_SIZE:
            raise ValueError(f"erase of 0x{addr:x}+0x{n:x} is not aligned to 4 KiB sectors")
        self._check(addr, n)
        self.generation += 1
        for start in range(addr, addr + n, _CHUNK):
            step = min(_CHUNK, addr + n - start)
            self._mm[start : start + step] = b"\xff" * step

    def erase_all(self) -> None:
        """Erase the whole chip."""
        self.erase(0, self._size)

    def md5(self, addr: int, n: int) -> bytes:
        """Raw MD5 digest of ``n`` bytes at ``addr``."""
        self._check(addr, n)
        digest = hashlib.md5()
        for start in range(addr, addr + n, _CHUNK):
            digest.update(self._mm[start : min(start + _CHUNK, addr + n)])
        return digest.digest()

    def flush(self) -> None:
        """Push written data to the file."""
        self._mm.flush()

    def close(self) -> None:
        """Flush and release the file; further access raises ValueError."""
        if not self._mm.closed:
            self._mm.flush()
            self._mm.close()
        self._file.close()

    def __enter__(self) -> FlashMemory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
